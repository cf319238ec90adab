"""Peak RSS and speed with glibc's mmap threshold fixed (what `nmsparse prune` does when it runs the model) against
glibc left to adjust it, SmolLM2-135M, in one run; every measurement in a fresh process, so its peak RSS (from the
OS) is its own.

- norms: the input norms of every target Linear over 2 x 8 x 512 calibration tokens, the first thing `prune --permute`
  and `prune --budget` compute (forward hooks on every layer of the base model);
- step: one fp32 distillation training step of SmolLM2 (bench/lm_step.py's) and of MiniLM (16 x 128), tokens/s the
  fastest of `--steps` after a warm-up, idle and with a competing busy process per core minus one (why `finetune`
  leaves the threshold to glibc);
- prune (`--prune "ARGS"`): a whole `nmsparse prune SMOLLM2 ARGS --out TMP`, wall time and peak RSS.

    python bench/allocator.py [--folder bench/.models/smollm2-135m] [--steps 3] [--prune "--budget 0.5 --method sparsegpt"]

nmcli/runtime/allocator.py says why; figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from child import run_child
from contention import CONDITIONS, describe
from nmcli.runtime.allocator import return_large_blocks
from nmcli.runtime.openmp import setting, spin_briefly

HERE = Path(__file__).resolve().parent
ARMS = ("glibc", "fixed")  # glibc's own adjusting threshold; the threshold prune fixes
STEP_BATCH = {"SmolLM2": (4, 256), "MiniLM": (16, 128)}  # bench/lm_step.py's, bench/step_overhead.py's


def norms_child(folder: Path) -> dict:
    import torch

    from nmcli.models.architecture import ModelKind
    from nmcli.models.resolve import load_model, resolve
    from nmcli.oneshot.permute import NORM_BATCHES, input_column_norms
    from nmcli.oneshot.service import CalibrationSettings, calibration_batches

    resolved = resolve(str(folder))
    model = load_model(resolved).eval()
    batches = calibration_batches(resolved, model, CalibrationSettings(samples=16).for_model(ModelKind.CAUSAL_LM))
    layers = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    input_column_norms(model, layers, batches[:NORM_BATCHES])
    return {"layers": len(layers)}


def step_child(model: str, folder: Path, steps: int) -> dict:
    from step_overhead import hf_subject, make_runner

    from nmcli.train.example import minilm_folder

    subject = hf_subject(minilm_folder() if model == "MiniLM" else folder, *STEP_BATCH[model], replay=False, bf16=False)
    run = make_runner("sr-ste", "2:4", subject)
    run(1)  # warm-up
    step_s = min(run(1) for _ in range(steps))
    return {"tokens_per_s": int(subject.batch["attention_mask"].sum()) / step_s}


def prune_child(folder: Path, options: str, arm: str) -> dict:
    import nmcli.runtime.allocator
    from nmcli.cli import main as cli

    if arm == "glibc":  # the command would fix the threshold itself
        nmcli.runtime.allocator.return_large_blocks = lambda: False
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["nmsparse", "prune", str(folder), *shlex.split(options), "--out", f"{tmp}/out", "--quiet"]
        try:
            cli()
        except SystemExit as done:
            if done.code:
                raise
    return {}


def _measure(args: argparse.Namespace, work: str, arm: str) -> tuple[dict, float, float]:
    cmd = [sys.executable, __file__, "--child", work, "--arm", arm, *sys.argv[1:]]
    code, stdout, seconds, peak = run_child(cmd)
    if code:
        raise SystemExit(f"{work} ({arm}) failed (exit {code})")
    return json.loads(stdout.splitlines()[-1]), seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=HERE / ".models" / "smollm2-135m", help="made on first use")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prune", default=None, help="prune options to measure as a whole command too")
    parser.add_argument("--child", choices=("norms", "step", "minilm-step", "prune"), help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    spin_briefly()  # the children inherit it, as the nmsparse command's would
    if args.child:
        if args.arm == "fixed" and not return_large_blocks():
            raise SystemExit("the mmap threshold could not be fixed (not glibc, or MALLOC_MMAP_THRESHOLD_ is set)")
        from smollm2 import smollm2_folder

        folder = smollm2_folder(args.folder)
        work = {"norms": lambda: norms_child(folder), "step": lambda: step_child("SmolLM2", folder, args.steps),
                "minilm-step": lambda: step_child("MiniLM", folder, args.steps),
                "prune": lambda: prune_child(folder, args.prune, args.arm)}[args.child]
        print(json.dumps(work()))
        return
    print(f"SmolLM2-135M; {setting()}; arms: glibc's adjusting mmap threshold, and fixed as prune runs")
    for arm in ARMS:
        out, seconds, peak = _measure(args, "norms", arm)
        print(f"norms ({out['layers']} layers, 2 x 8 x 512 tokens), {arm}: peak RSS {peak:.2f} GiB, {seconds:.1f} s in all")
    for label, condition in CONDITIONS:
        with condition() as busy:
            print(describe(label, busy))
            for work, model in (("step", "SmolLM2"), ("minilm-step", "MiniLM")):
                batch, seq_len = STEP_BATCH[model]
                for arm in ARMS:
                    out, _, peak = _measure(args, work, arm)
                    print(f"  {model} fp32 distillation step (batch {batch} x {seq_len}), {arm}: "
                          f"{out['tokens_per_s']:.0f} tokens/s, peak RSS {peak:.2f} GiB")
    if args.prune:
        for arm in ARMS:
            _, seconds, peak = _measure(args, "prune", arm)
            print(f"prune {args.prune}, {arm}: peak RSS {peak:.2f} GiB, {seconds:.0f} s")


if __name__ == "__main__":
    main()
