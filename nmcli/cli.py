"""The `nmsparse` command line: parse options, call one service, print. No math and no file logic here."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from nmcli import __version__
from nmcli.errors import NMSparseError
from nmcli.nm import CONVENTION, parse_pattern

PATTERN_HELP = f"N:M pattern, keep-N convention ({CONVENTION}), e.g. 2:4, 1:8, 1:32"

app = typer.Typer(
    name="nmsparse",
    help=f"Make pretrained models N:M sparse. Pattern convention: N:M = {CONVENTION}.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No markup or emoji in anything printed: paths, layer names and messages are shown as they are ("x[/].pt" or
# "N:M:" would otherwise be read as markup or an emoji code); the few styled words use explicit styles.
# soft_wrap: a printed line is never broken, whatever the terminal's width or where the output goes (a log, a pipe,
# a script reading it line by line); a terminal folds a long line itself. Tables still fit the width.
_PLAIN = {"markup": False, "emoji": False, "highlight": False, "soft_wrap": True}
out = Console(**_PLAIN)
if not out.is_terminal:  # piped output: wide enough that tables do not fold layer names
    out = Console(width=200, **_PLAIN)
err = Console(stderr=True, **_PLAIN)
if not err.is_terminal:
    err = Console(stderr=True, width=200, **_PLAIN)
STATE = {"debug": bool(os.environ.get("NMSPARSE_DEBUG"))}

EXIT_ERROR = 2
EXIT_CHECK_FAILED = 1

Source = Annotated[str, typer.Argument(help="safetensors file, sharded/Hugging Face folder, or timm model name")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="timm model name, for exact targets and FLOPs")]
CheckpointOpt = Annotated[
    Optional[Path], typer.Option("--checkpoint", help="weights for a timm SOURCE: .safetensors or .pth (weights only)")
]
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", help="only layers matching this glob (repeat)")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="skip layers matching this glob (repeat)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON only")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar, only the result")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed for random init of a timm SOURCE without --checkpoint")]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace an existing output")]
DeviceOpt = Annotated[str, typer.Option("--device", help="where the model computes: cpu or cuda")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """One line on stderr and a non-zero exit for bad input; the traceback only with --debug."""
    try:
        yield
    except NMSparseError as exc:
        if STATE["debug"]:
            raise
        err.print(Text.assemble(("error:", "red"), f" {exc}"), soft_wrap=True)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        err.print(Text.assemble(("interrupted", "red"), ": nothing was written"))
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback for users
        if STATE["debug"]:
            raise
        err.print(Text.assemble(("error:", "red"), f" {_describe(exc)}"), soft_wrap=True)
        raise typer.Exit(EXIT_ERROR) from None


def _describe(exc: Exception) -> str:
    """An error no check foresaw: a full disk said as such, anything else named with how to see the traceback."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {exc.filename}" if exc.filename else ""
        return f"the disk is full{where} ({exc.strerror}): free some space or write --out to another disk"
    return f"unexpected {type(exc).__name__}: {exc} (run `nmsparse --debug ...` for the traceback)"


def progress_bar(enabled: bool, unit: str = "tensors") -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if unit in ("tensors", "blocks") else TextColumn("{task.percentage:>5.1f}%"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[item]}", style="dim", markup=False),
        console=err,
        transient=True,
        disable=not (enabled and err.is_terminal),  # a log or a pipe gets no bar (not even its last newline)
    )


def with_byte_progress(label: str, infos: dict, enabled: bool, work):  # noqa: ANN001, ANN201
    """Run `work(progress)` under a bar measured in bytes of the source checkpoint."""
    with progress_bar(enabled, unit="bytes") as bar:
        task = bar.add_task(label, total=sum(i.nbytes for i in infos.values()), item="")
        return work(lambda name, n: bar.update(task, advance=n, item=name))


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        out.print(f"nmsparse {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """Make pretrained models N:M sparse (keep-N: at most N non-zeros in every M weights along K)."""
    STATE["debug"] = STATE["debug"] or debug


@app.command()
def prune(
    source: Source,
    pattern: Annotated[str, typer.Option("--pattern", "-p", help=PATTERN_HELP)] = "2:4",
    out_path: Annotated[Path, typer.Option("--out", "-o", help="output .safetensors file (or folder for a folder)")] = ...,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    method: Annotated[str, typer.Option("--method", help="magnitude (no data) | wanda | sparsegpt")] = "magnitude",
    calib: Annotated[
        Optional[str], typer.Option("--calib", help="wanda/sparsegpt calibration data: text (python-help [default], "
                                    ".txt/.md/.jsonl, folder, teacher:N) for transformers; images (folder, mnist5k) for timm models")
    ] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", min=1, help="calibration samples")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="tokens per calibration sample")] = 512,
    damp: Annotated[float, typer.Option("--damp", min=0.0, help="SparseGPT dampening, a fraction of mean(diag H)")] = 0.01,
    block_size: Annotated[int, typer.Option("--block-size", min=1, help="SparseGPT columns per lazy-update block")] = 128,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """One-shot N:M pruning: magnitude streamed tensor by tensor, or Wanda / SparseGPT calibrated layer by layer on
    the outputs of the layers already pruned (dense-shaped output with exact zeros)."""
    from nmcli.models.resolve import resolve
    from nmcli.device import run_device
    from nmcli.io.atomic import check_writable
    from nmcli.prune import plan_prune
    from nmcli.prune import prune as run_prune

    oneshot = None
    with user_errors():
        nm = parse_pattern(pattern)
        chosen = _oneshot_method(method)
        if chosen.value == "magnitude" and device != "cpu":
            raise NMSparseError(f"--device {device}: magnitude pruning streams the file on the CPU and runs no model; "
                                "--device goes with --method wanda or sparsegpt")
        compute = run_device(device)
        check_writable(out_path, force)
        resolved = resolve(source, model=model, checkpoint=checkpoint, seed=seed)
        plan = plan_prune(resolved, nm, include or (), exclude or ())
        started = time.perf_counter()
        if chosen.value == "magnitude":
            result = with_byte_progress(
                "pruning", resolved.checkpoint.infos, not (quiet or as_json),
                lambda progress: run_prune(resolved, plan, out_path, force=force, progress=progress),
            )
        else:
            from nmcli.oneshot.calibrate import SolverSettings
            from nmcli.oneshot.service import CalibrationSettings

            result, oneshot = _calibrated_prune(
                resolved, plan, out_path, CalibrationSettings(calib, calib_samples, seq_len, seed),
                SolverSettings(chosen, plan.pattern, damp, block_size), compute, force, not (quiet or as_json),
            )
        seconds = time.perf_counter() - started
    payload = {
        "out": str(result.out),
        "pattern": str(nm),
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
    if as_json:
        print_json(payload)
        return
    if not quiet:
        for name, why in plan.skipped.items():
            out.print(Text.assemble(("skipped", "yellow"), f" {name}: {why}"))
        for note in result.notes:
            out.print(f"note: {note}")
    if oneshot is not None and not quiet:
        info = payload["calibration"]
        out.print(
            f"{method}: mean reconstruction error {info['mean_reconstruction_error']:.4f} "
            f"(|WX - W'X|^2 / |WX|^2 on the calibration inputs), calibration activations {info['activation_mib']} MiB"
        )
    out.print(
        f"pruned {len(plan.targets)} layers to {nm} ({len(plan.skipped)} skipped) by {method} in {seconds:.2f}s -> {result.out}"
    )


def _oneshot_method(name: str):  # noqa: ANN202
    from nmcli.oneshot.calibrate import OneShotMethod

    try:
        return OneShotMethod(name)
    except ValueError:
        raise NMSparseError(f"--method {name!r}: choose one of {', '.join(m.value for m in OneShotMethod)}") from None


def _calibrated_prune(resolved, plan, out_path, calib, solver, device, force, show):  # noqa: ANN001, ANN202, PLR0913
    """Wanda / SparseGPT with a progress bar over the model's blocks."""
    from nmcli.oneshot.service import oneshot_prune

    with progress_bar(show, unit="blocks") as bar:
        task = bar.add_task(f"{solver.method.value} (calibrating)", total=None, item="")
        return oneshot_prune(
            resolved, plan, out_path, solver, calib, device, force=force,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )


@app.command()
def report(
    source: Source,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    check: Annotated[
        Optional[str], typer.Option("--check", help="exit 0 only if every target layer complies with this N:M")
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    no_flops: Annotated[bool, typer.Option("--no-flops", help="skip the FLOP count")] = False,
    seq_len: Annotated[int, typer.Option("--seq-len", help="sequence length for Hugging Face FLOPs")] = 128,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-layer N:M compliance, sparsity and FLOPs (dense, theoretical sparse, 2:4 tensor-core effective)."""
    from nmcli.models.resolve import resolve
    from nmcli.report import build_report, render_report

    with user_errors():
        check_pattern = parse_pattern(check) if check is not None else None
        resolved = resolve(source, model=model, checkpoint=checkpoint, seed=seed)
        with progress_bar(not (quiet or as_json)) as bar:
            task = bar.add_task("reading", total=len(resolved.layers) or None, item="")
            result = build_report(
                resolved,
                check=check_pattern,
                include=include or (),
                exclude=exclude or (),
                flops=not no_flops,
                seq_len=seq_len,
                progress=lambda name: bar.update(task, advance=1, item=name),
            )
    if as_json:
        print_json(result.to_json())
    elif quiet:
        if check_pattern is not None:
            out.print(f"check {check_pattern}: {'passed' if result.passed else 'FAILED'}")
    else:
        render_report(result, out)
    if check_pattern is not None and not result.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("eval")
def evaluate(
    source: Source,
    data: Annotated[
        Optional[str],
        typer.Option("--data", help="held-out data: python-help (default for HF), .txt/.md/.jsonl, a folder; mnist5k or an image folder"),
    ] = None,
    teacher: Annotated[
        Optional[str], typer.Option("--teacher", help="the dense model: needed for encoders (embedding agreement)")
    ] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="tokens per held-out sample (HF models)")] = 128,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quality on held-out data: perplexity (causal LMs), embedding cosine / Spearman to the teacher (encoders),
    accuracy (image classifiers)."""
    from nmcli.device import run_device
    from nmcli.eval import evaluate_source

    with user_errors():
        compute = run_device(device)
        with progress_bar(not (quiet or as_json)) as bar:
            bar.add_task("evaluating", total=None, item=source)
            result = evaluate_source(source, data=data, teacher=teacher, seq_len=seq_len, device=compute)
    if as_json:
        print_json(result.to_json())
        return
    if not quiet:
        out.print(f"{result.source} ({result.kind.value}) on {result.data}")
    for name, value in result.metrics.items():
        dense = f" (dense {result.teacher[name]:.4f})" if result.teacher and name in result.teacher else ""
        out.print(f"{name} {value:.4f}{dense}")


def main() -> None:
    app()


class RichReporter:
    """Renders training progress: a bar with loss, phase, pattern and alpha; messages on their own lines."""

    def __init__(self, enabled: bool, messages: bool):
        self.enabled = enabled and int(os.environ.get("RANK", "0")) == 0
        self.messages = messages and int(os.environ.get("RANK", "0")) == 0
        self.bar: Progress | None = None
        self.task = None

    def start(self, total_steps: int, first_step: int, description: str) -> None:
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]:.4f} | {task.fields[phase]} {task.fields[pattern]}"),
            console=err, transient=True, disable=not (self.enabled and err.is_terminal),
        )
        self.bar.start()
        self.task = self.bar.add_task(description, total=total_steps, completed=first_step, loss=0.0, phase="", pattern="")

    def step(self, step: int, values: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step + 1, loss=values["loss"], phase=values["phase"], pattern=values["pattern"])

    def message(self, text: str) -> None:
        if self.messages:
            (self.bar.console if self.bar is not None else err).print(text, highlight=False)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _json_option(text: Optional[str], name: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NMSparseError(f"{name} {text!r}: not valid JSON ({exc.msg}); e.g. '{{\"img_size\": 32}}'") from None
    if not isinstance(value, dict):
        raise NMSparseError(f"{name} {text!r}: expected a JSON object")
    return value


@app.command()
def finetune(
    model: Annotated[
        Optional[str], typer.Option("--model", help="timm model name or Hugging Face folder (none: the built-in example)")
    ] = None,
    model_kwargs: Annotated[Optional[str], typer.Option("--model-kwargs", help="JSON kwargs for timm.create_model")] = None,
    checkpoint: CheckpointOpt = None,
    data: Annotated[
        Optional[str],
        typer.Option("--data", help="timm: image folder or mnist5k (default); HF: .txt/.md/.jsonl, a folder, python-help (default) or teacher:N (causal LMs)"),
    ] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="HF models: tokens per sample")] = 128,
    start: Annotated[
        Optional[str], typer.Option("--start", help="HF models: magnitude | wanda | sparsegpt (one-shot first) or an N:M checkpoint (default: the dense model)")
    ] = None,
    prompts: Annotated[
        Optional[Path], typer.Option("--prompts", help="--data teacher:N: prompts, one per line (default: built-in)")
    ] = None,
    recipe: Annotated[
        Optional[str], typer.Option("--recipe", "-r", help="built-in recipe name or YAML path (default: sdgf-stepwise)")
    ] = None,
    example: Annotated[
        Optional[str], typer.Option("--example", help="with no --model: minilm (default) or mnist")
    ] = None,
    pattern: Annotated[Optional[str], typer.Option("--pattern", "-p", help=PATTERN_HELP + " (overrides the recipe)")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder")] = None,
    seed: Annotated[int, typer.Option("--seed", help="fixes init, masks, data order and results")] = 0,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="re-initialise the head")] = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast")] = False,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="continue the run in this folder")] = None,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", min=1, help="stop after N epochs of this run")] = None,
    grad_log_every: Annotated[int, typer.Option("--grad-log-every", help="log gradient variance / mask flips every N steps")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", min=0, help="also evaluate every N steps (default: each epoch)")] = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="use at most N train and N val samples")] = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Sparse fine-tuning with a recipe (SR-STE, MDGF, SDGF, ...); Hugging Face models learn by distillation from
    their dense selves. With no --model: a built-in example (--example minilm or mnist)."""
    from nmcli.recipes import load_recipe
    from nmcli.train.engine import FinetuneConfig, run_finetune

    reporter = RichReporter(enabled=not (quiet or as_json), messages=not (quiet or as_json))
    with user_errors():
        if model is None:
            _refuse_for_example({
                "--model-kwargs": model_kwargs, "--checkpoint": checkpoint, "--data": data, "--start": start,
                "--seq-len": None if seq_len == 128 else seq_len, "--prompts": prompts, "--batch-size": batch_size,
                "--num-classes": num_classes, "--bf16": bf16 or None, "--resume": resume, "--stop-after": stop_after,
                "--grad-log-every": grad_log_every or None, "--eval-every": eval_every or None,
                "--device": None if device == "cpu" else device,
            })
            result = _run_example(example or "minilm", recipe, pattern, epochs, lr, out_dir, seed, limit, force, reporter)
        else:
            if example is not None:
                raise NMSparseError("--example runs a built-in example: drop it, or drop --model")
            chosen = load_recipe(recipe or "sdgf-stepwise").with_overrides(
                pattern=str(parse_pattern(pattern)) if pattern is not None else None, epochs=epochs, lr=lr, batch_size=batch_size
            )
            if resume is not None and out_dir is not None and out_dir.resolve() != resume.resolve():
                raise NMSparseError(f"--resume {resume} continues in that folder; drop --out {out_dir} or make it the same")
            out_path = resume or out_dir
            if out_path is None:
                raise NMSparseError("--out is required: the folder for the checkpoint, summary and metrics")
            config = FinetuneConfig(
                model=model, model_kwargs=_json_option(model_kwargs, "--model-kwargs"), recipe=chosen, out=out_path,
                data=data, checkpoint=checkpoint, seed=seed, num_classes=num_classes, bf16=bf16, seq_len=seq_len,
                start=start, prompts=prompts, resume=resume is not None, grad_log_every=grad_log_every,
                eval_every=eval_every, stop_after=stop_after, limit=limit, force=force, device=device,
            )
            result = run_finetune(config, reporter).summary
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        print_json(result)
    else:
        out.print(_finetune_line(result, resume or out_dir))


def _finetune_line(result: dict, out_path: Optional[Path]) -> str:
    """One line for the terminal: quality before and after, compliance, cost, where the result is."""
    if result.get("example") == "minilm":
        one, rec = result["one_shot"], result["recovered"]
        return (
            f"embedding cosine to dense (held-out paragraphs / sentences): {result['start']} one-shot {result['pattern']} "
            f"{one['paragraphs']:.4f} / {one['sentences']:.4f} | {result['recipe']} {result['pattern']} distilled "
            f"{rec['paragraphs']:.4f} / {rec['sentences']:.4f} (Spearman {rec['spearman']:.4f}) | N:M compliant: "
            f"{result['all_layers_compliant']} | {result['wall_seconds']}s -> {result['sparse_checkpoint']}"
        )
    if "dense_val_accuracy" in result:
        return (
            f"dense {result['dense_val_accuracy']:.4f} | one-shot {result['pattern']} {result['one_shot_val_accuracy']:.4f} | "
            f"{result['recipe']} {result['pattern']} fine-tuned {result['sparse_val_accuracy']:.4f} | "
            f"N:M compliant: {result['all_layers_compliant']} | training FLOPs vs dense "
            f"{result['training_flops_relative_to_dense']:.3f}x | {result['wall_seconds']}s -> {result['sparse_checkpoint']}"
        )
    if "stopped_after_epoch" in result:
        return f"stopped after epoch {result['stopped_after_epoch']}; continue with --resume {out_path}"
    return (
        f"{result['recipe']} {result['pattern'] or 'dense'}: {_quality_change(result)} | "
        f"compliant: {result['all_layers_compliant']} | training FLOPs vs dense "
        f"{result['training_flops_relative_to_dense']:.3f}x | {result['wall_seconds']}s -> {out_path}"
    )


def _run_example(
    name: str, recipe: Optional[str], pattern: Optional[str], epochs: Optional[int], lr: Optional[float],
    out_dir: Optional[Path], seed: int, limit: Optional[int], force: bool, reporter: "RichReporter",
) -> dict:
    """The built-in example `name`, with the options it honours applied."""
    from nmcli.recipes import load_recipe
    from nmcli.train.example import EXAMPLES, ExampleSettings, MiniLMExample, run_example, run_minilm_example

    if name not in EXAMPLES:
        raise NMSparseError(f"--example {name!r}: choose one of {', '.join(EXAMPLES)}")
    out_path = out_dir or Path("nmsparse-example")
    if name == "minilm":
        settings = MiniLMExample(out=out_path, seed=seed, force=force)
        changes = {"recipe": recipe and load_recipe(recipe), "pattern": pattern and str(parse_pattern(pattern)),
                   "epochs": epochs, "lr": lr, "limit": limit}
        runner = run_minilm_example
    else:
        settings = ExampleSettings(out=out_path, seed=seed, force=force, limit=limit)
        changes = {"recipe": recipe and load_recipe(recipe), "pattern": pattern and str(parse_pattern(pattern)),
                   "sparse_epochs": epochs, "sparse_lr": lr}
        runner = run_example
    for key, value in changes.items():
        if value is not None:
            setattr(settings, key, value)
    return runner(settings, reporter)


def _refuse_for_example(options: dict[str, object]) -> None:
    """With no --model the built-in example runs: an option it cannot honour is an error, never ignored."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise NMSparseError(
            f"{', '.join(given)}: not used by the built-in example (no --model); give --model to fine-tune your own "
            "model, or drop them (the example takes --example, --recipe, --pattern, --epochs, --lr, --out, --seed, --limit)"
        )


def _quality_change(result: dict) -> str:
    """`val accuracy 0.2000 (one-shot 0.1000) -> 0.8990`, one entry per quality metric of the summary (start and
    one-shot are unknown after --resume)."""
    def value(key: str) -> str:
        return "(resumed)" if result.get(key) is None else format(result[key], ".4f")

    names = [key.removeprefix("final_") for key in result if key.startswith("final_")]
    return ", ".join(
        f"{name.replace('_', ' ')} {value('start_' + name)}"
        + (f" (one-shot {value('one_shot_' + name)})" if result.get("one_shot_" + name) is not None else "")
        + f" -> {result['final_' + name]:.4f}"
        for name in names
    )


@app.command("recipes")
def list_recipes(as_json: JsonOpt = False) -> None:
    """List the built-in recipes."""
    from nmcli.recipes import builtin_names, load_recipe

    with user_errors():
        recipes = [load_recipe(name) for name in builtin_names()]
    if as_json:
        print_json([{"name": r.name, "method": r.method, "pattern": r.pattern, "description": r.description} for r in recipes])
        return
    from rich.table import Table

    table = Table("name", "method", "default pattern", "description")
    for r in recipes:
        table.add_row(r.name, r.method, r.pattern, r.description)
    out.print(table)


recipe_app = typer.Typer(help="Inspect one recipe.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("show")
def recipe_show(
    name: Annotated[str, typer.Argument(help="built-in recipe name or YAML path")],
    pattern: Annotated[Optional[str], typer.Option("--pattern", "-p", help=PATTERN_HELP)] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="total training steps")] = 1000,
    model: Annotated[Optional[str], typer.Option("--model", help="timm model, for whole-model training FLOPs")] = None,
    model_kwargs: Annotated[Optional[str], typer.Option("--model-kwargs", help="JSON kwargs for timm.create_model")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write the schedule as a PNG")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The schedule a recipe follows: phases, stages, alpha at key points, training FLOPs vs dense."""
    from nmcli.io.atomic import atomic_output
    from nmcli.models.architecture import ModelRef
    from nmcli.recipes import load_recipe
    from nmcli.schedule_report import describe_schedule, plot_schedule

    with user_errors():
        chosen = load_recipe(name).with_overrides(pattern=str(parse_pattern(pattern)) if pattern is not None else None)
        ref = ModelRef("timm", model, _json_option(model_kwargs, "--model-kwargs")) if model else None
        described = describe_schedule(chosen, chosen.target, steps, ref)
        if plot is not None:
            with atomic_output(plot, force=force) as tmp:
                plot_schedule(described, tmp.with_suffix(".png"))
                tmp.with_suffix(".png").replace(tmp)
    if as_json:
        print_json({k: v for k, v in described.items() if k != "curve"})
        return
    out.print(Text.assemble((chosen.name, "bold"), f" ({chosen.method}) -> {described['pattern']} over {steps} steps: {chosen.description}"))
    for segment in described["segments"]:
        out.print(f"  steps {segment['start']:>6}-{segment['end'] - 1:<6} {segment['phase']:<8} {segment['pattern']}")
    if any(a["alpha"] for a in described["alpha"]):
        out.print("  alpha: " + ", ".join(f"step {a['step']}: {a['alpha']:.4f}" for a in described["alpha"]))
    out.print(
        f"  training FLOPs relative to dense: {described['training_flops_relative_to_dense']:.3f}x "
        f"({described['training_flops_scope']})"
    )
    if plot is not None:
        out.print(f"  plot -> {plot}")


def _size(paths: list[Path]) -> int:
    """Bytes written: files, and every file inside folders."""
    files = [f for p in paths for f in ([q for q in p.rglob("*") if q.is_file()] if p.is_dir() else [p])]
    return sum(f.stat().st_size for f in files)


@app.command()
def export(
    source: Source,
    fmt: Annotated[str, typer.Option("--format", "-f", help="nm | compressed-tensors | onnx | dense")] = "nm",
    out_path: Annotated[Path, typer.Option("--out", "-o", help="output file (.safetensors / .onnx) or folder")] = ...,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    pattern: Annotated[
        Optional[str], typer.Option("--pattern", "-p", help=PATTERN_HELP + "; default: the one the file declares")
    ] = None,
    prune_first: Annotated[bool, typer.Option("--prune", help="prune to --pattern on the way")] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    external_data: Annotated[
        Optional[bool], typer.Option("--external-data/--no-external-data", help="ONNX: weights in a .data file (auto over 2 GB)")
    ] = None,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a sparse checkpoint as nm (compressed, any N:M), compressed-tensors (2:4), ONNX, or dense."""
    from nmcli.models.resolve import resolve
    from nmcli.export.service import run_export

    with user_errors():
        nm = parse_pattern(pattern) if pattern is not None else None
        resolved = resolve(source, model=model, checkpoint=checkpoint, seed=seed)
        infos = resolved.checkpoint.infos
        result = with_byte_progress(
            "exporting", infos, not (quiet or as_json),
            lambda progress: run_export(
                resolved, fmt, out_path, pattern=nm, include=include or (), exclude=exclude or (), prune=prune_first,
                force=force, external_data=external_data, progress=progress,
            ),
        )
        dense_bytes = sum(i.nbytes for i in infos.values())
        written = _size([result.out, *result.extra_files])
    payload = {
        "out": str(result.out), "format": result.format, "nm_layers": result.nm_layers, "dense_layers": result.dense_layers,
        "bytes": written, "dense_bytes": dense_bytes, "notes": result.notes, "convention": CONVENTION,
    }
    if as_json:
        print_json(payload)
        return
    for note in result.notes if not quiet else []:
        out.print(f"note: {note}")
    out.print(
        f"exported {len(result.nm_layers)} N:M layers as {result.format} -> {result.out} "
        f"({written / 2**20:.2f} MiB, {100 * written / max(dense_bytes, 1):.1f}% of the dense checkpoint)"
    )


@app.command()
def study(
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="folder for README.md, plots and results.json (default docs/results, "
                                     "or docs/results/<model> with --model)")
    ] = None,
    model: Annotated[
        Optional[str], typer.Option("--model", help="a pretrained Hugging Face folder: study recovery of it (default: the MNIST study)")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="MNIST study: the whole pipeline on a tiny model and data, in about a minute")] = False,
    seeds: Annotated[int, typer.Option("--seeds", min=1)] = 3,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="MNIST study: fine-tuning epochs per run")] = None,
    patterns: Annotated[Optional[str], typer.Option("--patterns", help="--model: comma-separated N:M patterns [2:4,1:4,1:8]")] = None,
    recipes: Annotated[Optional[str], typer.Option("--recipes", help="--model: comma-separated recipe names "
                                                   "[ste,sr-ste,fixed-mask,mdgf-exponential,sdgf-geometric,mdgf-sdgf]")] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", help="--model: training steps per run [100] or minutes of SR-STE training per run (20min)")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="--model: training/held-out text, as finetune takes it (default python-help)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="--model: samples per step")] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="--model: tokens per sample")] = 128,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="--model: learning rate of every arm")] = 3e-4,
    sparsegpt_start: Annotated[bool, typer.Option("--sparsegpt-start/--no-sparsegpt-start",
                                                  help="--model: fixed-mask also from a SparseGPT start")] = True,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="runs at a time (one thread each)")] = 2,
    quiet: QuietOpt = False,
) -> None:
    """Compare the recipes over seeds: the MNIST study (2:4 ... 1:32 on a small ViT), or with --model the recovery of
    a pretrained Hugging Face model at equal steps and equal FLOPs; writes a results page with tables and plots."""
    say = (lambda text: None) if quiet else (lambda text: err.print(text, highlight=False))
    with user_errors():
        if model is not None:
            data_out = _pretrained_study(model, out_dir, quick, epochs, seeds, patterns, recipes, budget, data, batch_size,
                                         seq_len, lr, sparsegpt_start, jobs, say)
        elif any(v is not None for v in (patterns, recipes, budget, data)):
            raise NMSparseError("--patterns, --recipes, --budget and --data go with --model HF_FOLDER (the MNIST study has fixed ones)")
        else:
            data_out = _mnist_study(out_dir or Path("docs/results"), quick, seeds, epochs, jobs, say)
    out.print(f"{len(data_out['runs'])} runs in {data_out['wall_minutes']} min -> {data_out['page']}")


def _mnist_study(out_dir: Path, quick: bool, seeds: int, epochs: int | None, jobs: int, say) -> dict:  # noqa: ANN001
    from nmcli.study.mnist import StudySettings, run_study

    settings = StudySettings(out=out_dir, seeds=seeds, jobs=jobs)
    if quick:
        settings = StudySettings(
            out=out_dir, seeds=min(seeds, 2), jobs=jobs, patterns=("2:4", "1:8"), dense_epochs=2, epochs=1, limit=192,
            grad_log_every=2, curve_pattern="1:8",
            model_kwargs={"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2},
        )
    if epochs:
        settings.epochs = epochs
    return {**run_study(settings, say=say), "page": out_dir / "README.md"}


def _pretrained_study(model, out_dir, quick, epochs, seeds, patterns, recipes, budget, data, batch_size, seq_len, lr,  # noqa: ANN001, ANN202, PLR0913
                      sparsegpt_start, jobs, say):
    from nmcli.study.pretrained import PATTERNS, RECIPES, PretrainedStudySettings, StudyBudget, run_pretrained_study
    from nmcli.study.pretrained_page import display_name

    if quick or epochs:
        raise NMSparseError("--quick and --epochs belong to the MNIST study; with --model the budget is --budget STEPS|MINUTESmin")
    out_dir = out_dir or Path("docs/results") / display_name(model)
    settings = PretrainedStudySettings(
        model=model, out=out_dir, budget=StudyBudget.parse(budget or "100"), data=data,
        patterns=tuple(patterns.split(",")) if patterns else PATTERNS, recipes=tuple(recipes.split(",")) if recipes else RECIPES,
        seeds=seeds, batch_size=batch_size, seq_len=seq_len, lr=lr, sparsegpt_start=sparsegpt_start, jobs=jobs,
    )
    return {**run_pretrained_study(settings, say=say), "page": out_dir / "README.md"}
