"""`nmsparse prune`: one-shot N:M, magnitude streamed tensor by tensor or Wanda / SparseGPT / ALPS calibrated."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.text import Text

from nmcli.commands.common import (
    PATTERN_HELP,
    CheckpointOpt,
    DeviceOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    Source,
    out,
    print_json,
    user_errors,
)
from nmcli.commands.progress import progress_bar, with_byte_progress
from nmcli.errors import NMSparseError
from nmcli.nm import CONVENTION, parse_pattern
from nmcli.oneshot.allocation import DEFAULT_CANDIDATES

CalibOpt = Annotated[
    Optional[str], typer.Option("--calib", help="wanda/sparsegpt/alps calibration data: text (the mixture "
                                "python-help:0.3,wiki:0.7 [default], python-help, wiki, .txt/.md/.jsonl, folder, mixtures, "
                                "teacher:N) for transformers; images (folder, mnist5k) for timm models")
]


def prune(
    source: Source,
    pattern: Annotated[Optional[str], typer.Option("--pattern", "-p", help=PATTERN_HELP + " [default: 2:4]")] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="output .safetensors file (or folder for a folder)")] = ...,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    method: Annotated[str, typer.Option("--method", help="magnitude (no data) | wanda | sparsegpt | alps (ADMM: "
                                        "mask and weights chosen together; slower)")] = "magnitude",
    calib: CalibOpt = None,
    calib_samples: Annotated[int, typer.Option(
        "--calib-samples", min=1, help="calibration samples: --seq-len token chunks (LMs), paragraphs (encoders) or "
        "images; all there are when --calib holds fewer (a note says so)")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="tokens per calibration sample")] = 512,
    damp: Annotated[float, typer.Option("--damp", min=0.0, help="SparseGPT dampening, a fraction of mean(diag H)")] = 0.01,
    block_size: Annotated[int, typer.Option("--block-size", min=1, help="SparseGPT columns per lazy-update block")] = 128,
    refine: Annotated[int, typer.Option("--refine", min=0, help="wanda/sparsegpt/alps: conjugate-gradient steps that "
                                        "re-fit the kept weights to the dense outputs, mask fixed (0: none)")] = 0,
    reconstruct: Annotated[int, typer.Option(
        "--reconstruct", min=0, help="wanda/sparsegpt/alps on transformers: passes over the calibration data that "
        "train each pruned block's kept weights to the dense model's activations, masks fixed (0: none); gains "
        "more from more --calib-samples than from more passes")] = 0,
    reconstruct_lr: Annotated[Optional[float], typer.Option(
        "--reconstruct-lr", help="--reconstruct's Adam learning rate as a fraction of each matrix's RMS (its kept "
        "weights), so one rate suits models of any weight scale [default: 3.5e-3]")] = None,
    permute: Annotated[bool, typer.Option("--permute", help="reorder channels first (the model computes the same) so "
                                          "the pattern keeps more: Llama-like and BERT-like models")] = False,
    budget: Annotated[Optional[float], typer.Option(
        "--budget", help="overall sparsity of the target layers (e.g. 0.5): each layer's pattern chosen from "
        "--candidates by its measured sensitivity (Hugging Face transformers)")] = None,
    candidates: Annotated[str, typer.Option("--candidates", help="--budget's patterns per layer (dense: leave it "
                                            "dense)")] = DEFAULT_CANDIDATES,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """One-shot N:M pruning: magnitude streamed tensor by tensor, or Wanda / SparseGPT / ALPS calibrated layer by
    layer on the outputs of the layers already pruned (dense-shaped output with exact zeros)."""
    from nmcli.models.resolve import resolve
    from nmcli.oneshot.plan import plan_prune

    show = not (quiet or as_json)
    with user_errors():
        nm, budgeted = _pattern_and_budget(pattern, budget, candidates)
        chosen = _oneshot_method(method, device)
        _check_refits(chosen, refine, reconstruct)
        rate = _reconstruct_rate(reconstruct, reconstruct_lr)
        compute = _check_output_and_device(out_path, force, device)
        resolved = resolve(source, model=model, checkpoint=checkpoint, seed=seed)
        plan = plan_prune(resolved, nm, include or (), exclude or ())
        started = time.perf_counter()
        if chosen.value == "magnitude" and not permute and budgeted is None:
            result, oneshot = _magnitude(resolved, plan, out_path, force, show), None
        else:
            from nmcli.oneshot.calibrate import SolverSettings
            from nmcli.oneshot.service import CalibrationSettings

            result, oneshot = _calibrated_prune(
                resolved, plan, out_path, CalibrationSettings(calib, calib_samples, seq_len, seed),
                SolverSettings(chosen, plan.pattern, damp, block_size, refine=refine, reconstruct=reconstruct,
                               **rate), compute, force, show, permute, budgeted,
            )
        seconds = time.perf_counter() - started
    payload = _payload(result, oneshot, method, seconds)
    if as_json:
        print_json(payload)
    else:
        _print_result(payload, result.plan, seconds, quiet)


def _pattern_and_budget(pattern: str | None, budget: float | None, candidates: str):  # noqa: ANN202
    """--pattern's N:M, or with --budget the plan's base pattern (the candidate of least M, densest) and the
    budget's settings."""
    from nmcli.oneshot.allocation import parse_candidates
    from nmcli.oneshot.budget import BudgetSettings

    if budget is None:
        return parse_pattern("2:4" if pattern is None else pattern), None
    if pattern is not None:
        raise NMSparseError(f"--pattern {pattern} and --budget {budget:g}: choose one (--budget picks each layer's "
                            "pattern from --candidates)")
    if not 0 < budget < 1:
        raise NMSparseError(f"--budget {budget:g}: give the overall sparsity as a fraction between 0 and 1, e.g. 0.5")
    found = parse_candidates(candidates)
    base = min((p for p in found if not p.is_dense), key=lambda p: (p.m, -p.density))
    return base, BudgetSettings(budget, tuple(found))


def _oneshot_method(name: str, device: str):  # noqa: ANN202
    from nmcli.oneshot.calibrate import OneShotMethod

    try:
        chosen = OneShotMethod(name)
    except ValueError:
        raise NMSparseError(f"--method {name!r}: choose one of {', '.join(m.value for m in OneShotMethod)}") from None
    if chosen is OneShotMethod.MAGNITUDE and device != "cpu":
        raise NMSparseError(f"--device {device}: magnitude pruning streams the file on the CPU and runs no model; "
                            "--device goes with --method wanda, sparsegpt or alps")
    return chosen


def _check_refits(method, refine: int, reconstruct: int) -> None:  # noqa: ANN001
    """--refine and --reconstruct fit the kept weights to calibration data: not with magnitude, which reads none."""
    for flag, value in (("--refine", refine), ("--reconstruct", reconstruct)):
        if value and method.value == "magnitude":
            raise NMSparseError(f"{flag} {value}: fits the kept weights to calibration data; it goes with --method "
                                "wanda, sparsegpt or alps")


def _reconstruct_rate(reconstruct: int, rate: float | None) -> dict[str, float]:
    """--reconstruct-lr as SolverSettings' keyword ({} for its default): a finite rate > 0, with --reconstruct."""
    if rate is None:
        return {}
    if not reconstruct:
        raise NMSparseError(f"--reconstruct-lr {rate:g} sets the learning rate of --reconstruct's passes: add "
                            "--reconstruct 1, or leave --reconstruct-lr out")
    if not (math.isfinite(rate) and rate > 0):
        raise NMSparseError(f"--reconstruct-lr {rate:g}: give a learning rate above 0, e.g. 3.5e-3")
    return {"reconstruct_lr": rate}


def _check_output_and_device(out_path: Path, force: bool, device: str):  # noqa: ANN202
    from nmcli.runtime.device import run_device
    from nmcli.io.atomic import check_writable

    compute = run_device(device)
    check_writable(out_path, force)
    return compute


def _magnitude(resolved, plan, out_path: Path, force: bool, show: bool):  # noqa: ANN001, ANN202
    from nmcli.oneshot.magnitude import prune as run_prune

    return with_byte_progress(
        "pruning", resolved.checkpoint.infos, show,
        lambda progress: run_prune(resolved, plan, out_path, force=force, progress=progress),
    )


def _calibrated_prune(resolved, plan, out_path, calib, solver, device, force, show, permute, budget):  # noqa: ANN001, ANN202, PLR0913
    """Wanda / SparseGPT / ALPS (or magnitude after --permute / --budget) on the model in memory, with a progress bar over
    its blocks. The model's forward passes free and allocate large activations all along: glibc's threshold is
    fixed first so that freed ones go back to the OS (nmcli/runtime/allocator.py)."""
    from nmcli.oneshot.service import oneshot_prune
    from nmcli.runtime.allocator import return_large_blocks

    return_large_blocks()
    steps = "".join(("permuting, " if permute else "", "measuring sensitivity, " if budget else ""))
    with progress_bar(show, unit="probes, then blocks" if budget else "blocks") as bar:
        task = bar.add_task(f"{solver.method.value} ({steps}calibrating)", total=None, item="")
        return oneshot_prune(
            resolved, plan, out_path, solver, calib, device, permute=permute, budget=budget, force=force,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )


def _payload(result, oneshot, method: str, seconds: float) -> dict[str, Any]:  # noqa: ANN001
    plan = result.plan
    payload = {
        "out": str(result.out),
        "pattern": str(plan.pattern),
        "patterns": {name: str(plan.pattern_of(name)) for name in plan.targets},
        "convention": CONVENTION,
        "pruned_layers": list(plan.targets),
        "skipped_layers": plan.skipped,
        "tensors": result.tensors,
        "bytes": result.bytes,
        "seconds": round(seconds, 3),
        "notes": result.notes,
        "method": method,
    }
    if oneshot is not None:
        from nmcli.oneshot.calibrate import describe

        payload["calibration"] = {**describe(oneshot), "reconstruction_error": oneshot.errors}
    return payload


def _print_result(payload: dict[str, Any], plan, seconds: float, quiet: bool) -> None:  # noqa: ANN001
    if not quiet:
        for name, why in plan.skipped.items():
            out.print(Text.assemble(("skipped", "yellow"), f" {name}: {why}"))
        for note in payload["notes"]:
            out.print(f"note: {note}")
        info = payload.get("calibration", {})
        if info.get("mean_reconstruction_error") is not None:
            out.print(
                f"{payload['method']}: mean reconstruction error {info['mean_reconstruction_error']:.4f} "
                f"(|WX - W'X|^2 / |WX|^2 on the calibration inputs), calibration activations {info['activation_mib']} MiB"
            )
        fits = info.get("block_output_error")
        if fits:
            shown = [f"{block} {before:.4f} -> {after:.4f}" for block, (before, after) in fits.items()]
            out.print(f"reconstructed {len(fits)} blocks to the dense activations (|y - y_dense|^2 / |y_dense|^2): "
                      + (", ".join(shown) if len(shown) <= 2 else f"{shown[0]}, ..., {shown[-1]}"))
    patterns = " / ".join(map(str, plan.patterns()))
    out.print(
        f"pruned {len(plan.targets)} layers to {patterns} ({len(plan.skipped)} skipped) by {payload['method']} in "
        f"{seconds:.2f}s -> {payload['out']}"
    )
