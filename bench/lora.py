"""Mask-preserving LoRA against full fine-tuning of SmolLM2-135M at 2:4, from one SparseGPT start, in one run.

1. The start: `nmsparse prune --method sparsegpt --calib python-help:0.3,wiki:0.7` once (reused from bench/.runs).
2. Training memory and speed of four arms: full fine-tuning (recipe fixed-mask) and LoRA (recipe lora), each as
   is and lean: with `--gradient-checkpointing`, and for LoRA the frozen target weights held in bf16
   (bench/lora-lean.yaml). Each trains `--memory-steps` steps in a fresh process with no evaluation at all (the
   evaluation's logits would otherwise set the peak), reporting its own peak RSS (the OS's) and tokens/s of the
   steps after the first.
3. Quality: `nmsparse finetune` for `--steps` steps with full fine-tuning and for `--lora-factor` times as many with
   the `--lora-arm` LoRA arm, evaluated every `--eval-every` steps on the held-out Python help and the
   general-domain news (the LoRA arm every `--lora-eval-every` steps, to find the equal-time point closely); LoRA is
   compared at equal steps and at equal training time: seconds spent in training steps (metrics.jsonl's `train_s`,
   evaluations left out: their number is the bench's choice, not a cost of either method), its last evaluation no
   later than full fine-tuning's end.

    python bench/lora.py                      # 2:4, 60 steps of batch 4 x 256 tokens, bf16 autocast
    python bench/lora.py --skip-quality       # the memory and speed table alone (about 10 minutes)
    python bench/lora.py --skip-memory        # full fine-tuning against lean LoRA, quality alone (about 30 minutes)

Figures are printed, not asserted. Long (about 40 minutes on 2 CPU cores): run it in the background.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.child import run_child  # noqa: E402
from bench.recovery import _curve  # noqa: E402
from bench.smollm2 import smollm2_folder  # noqa: E402
from nmcli.runtime.device import bf16_is_native  # noqa: E402


@dataclass(frozen=True)
class Arm:
    recipe: str
    lr: str
    checkpointing: bool  # --gradient-checkpointing


ARMS = {
    "full": Arm("fixed-mask", "2e-4", False),
    "full-lean": Arm("fixed-mask", "2e-4", True),
    "lora": Arm("lora", "1e-3", False),
    "lora-lean": Arm(str(ROOT / "bench" / "lora-lean.yaml"), "1e-3", True),  # + frozen target weights in bf16
}
KEYS = ("perplexity_ratio", "news/perplexity_ratio", "perplexity", "news/perplexity")
TRAIN = ["--batch-size", "4", "--seq-len", "256", "--bf16"]
CALIB = "python-help:0.3,wiki:0.7"  # calibrated on Python help alone, the start is far worse on news (README)


def memory_child(model: str, start: str, arm: Arm, steps: int, out: str) -> None:
    """In a fresh process: `steps` training steps, no evaluation; print peak RSS and tokens/s as JSON."""
    from nmcli.methods.recipes import load_recipe
    from nmcli.train.engine import FinetuneConfig, Reporter, run_finetune

    class Clock(Reporter):
        def __init__(self) -> None:
            self.times: list[float] = []

        def step(self, step: int, values: dict) -> None:
            self.times.append(time.perf_counter())

    chosen = load_recipe(arm.recipe).with_overrides(batch_size=4, epochs=2, lr=float(arm.lr))
    config = FinetuneConfig(model=model, recipe=chosen, out=Path(out), start=start, seq_len=256, bf16=True,
                            limit=4 * steps, stop_after=1, force=True, measure_start=False,
                            gradient_checkpointing=arm.checkpointing)
    clock = Clock()
    run_finetune(config, clock)
    seconds = clock.times[-1] - clock.times[0]
    print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "tokens_per_s": (len(clock.times) - 1) * 4 * 256 / seconds, "steps": len(clock.times)}))


def _start(folder: Path, runs: Path) -> Path:
    base = runs / f"{folder.name}-sparsegpt-2of4-mixture"
    if not (base / "model.safetensors").is_file():
        code, _, seconds, rss = run_child([sys.executable, "-m", "nmcli", "prune", str(folder), "--method", "sparsegpt",
                                           "--pattern", "2:4", "--calib", CALIB, "--out", str(base), "--force", "--quiet"])
        if code:
            sys.exit(f"prune failed (exit {code})")
        print(f"start: SparseGPT 2:4 in {seconds / 60:.1f} min (peak RSS {rss:.2f} GiB) -> {base}")
    return base


def _memory(folder: Path, runs: Path, steps: int) -> None:
    print(f"\n## training memory and speed ({steps} steps of batch 4 x 256 tokens, bf16 autocast, no evaluation)")
    peaks = {}
    for name, arm in ARMS.items():
        cmd = [sys.executable, __file__, "--memory-child", name, "--folder", str(folder), "--memory-steps", str(steps),
               "--runs", str(runs)]
        code, out, seconds, _ = run_child(cmd)
        if code:
            print(f"{name}: failed (exit {code})")
            continue
        measured = json.loads(out.strip().splitlines()[-1])
        peaks[name] = measured["peak_rss_gib"]
        print(f"{name:>9} ({Path(arm.recipe).stem}{', gradient checkpointing' if arm.checkpointing else ''}): peak RSS "
              f"{measured['peak_rss_gib']:.2f} GiB, {measured['tokens_per_s']:.0f} tokens/s ({measured['steps']} steps, "
              f"{seconds:.0f} s in all)")
    for lora in ("lora", "lora-lean"):
        for full in ("full", "full-lean"):
            if lora in peaks and full in peaks:
                print(f"  {lora} / {full}: {peaks[lora] / peaks[full]:.0%} of the peak")


def _quality(folder: Path, base: Path, runs: Path, arms: tuple[str, str], steps: int, factor: float,
             every: tuple[int, int]) -> dict[str, list]:
    curves = {}
    for name, arm_every in zip(arms, every):
        arm = ARMS[name]
        arm_steps = steps if name.startswith("full") else round(steps * factor)
        out = runs / f"lora-bench-{name}"
        cmd = [sys.executable, "-m", "nmcli", "finetune", "--model", str(folder), "--start", str(base), "--recipe", arm.recipe,
               "--epochs", "1", "--limit", str(4 * arm_steps), "--eval-every", str(arm_every), "--lr", arm.lr, *TRAIN,
               "--out", str(out), "--force", "--quiet"] + (["--gradient-checkpointing"] if arm.checkpointing else [])
        code, _, seconds, rss = run_child(cmd)
        if code:
            print(f"{name}: failed (exit {code})")
            continue
        curves[name] = _curve(out, KEYS)
        print(f"\n## {name} ({Path(arm.recipe).stem}, lr {arm.lr}): {arm_steps} steps, {seconds / 60:.1f} min in all, "
              f"peak RSS {rss:.2f} GiB (evaluation included)")
        print("  step  train min  " + "  ".join(KEYS))
        for event in curves[name]:
            print(f"  {event['step']:>4} {event['train_s'] / 60:10.1f}  " + "  ".join(f"{event[k]:.4f}" for k in KEYS))
    return curves


def _compare(curves: dict[str, list], arms: tuple[str, str], steps: int) -> None:
    full_arm, lora_arm = arms
    if set(curves) != set(arms):
        return
    full = curves[full_arm][-1]
    full_end = full["train_s"]
    at_steps = next((e for e in curves[lora_arm] if e["step"] == steps), None)
    at_time = [e for e in curves[lora_arm] if e["train_s"] <= full_end][-1]
    print(f"\n## {lora_arm} against {full_arm} ({full['step']} steps, {full_end / 60:.1f} min in training steps)")
    for label, event in (("equal steps", at_steps), (f"equal time ({lora_arm} step {at_time['step']})", at_time)):
        if event is not None:
            print(f"  {label}: " + ", ".join(f"{k} {event[k]:.4f} vs {full[k]:.4f} ({event[k] / full[k] - 1:+.1%})"
                                             for k in KEYS[:2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lora-factor", type=float, default=1.5, help="LoRA trains this many times --steps")
    parser.add_argument("--lora-arm", choices=[a for a in ARMS if a.startswith("lora")], default="lora-lean",
                        help="the LoRA arm whose quality is measured against full fine-tuning")
    parser.add_argument("--eval-every", type=int, default=30, help="full fine-tuning's evaluations")
    parser.add_argument("--lora-eval-every", type=int, default=10, help="the LoRA arm's evaluations")
    parser.add_argument("--memory-steps", type=int, default=8)
    parser.add_argument("--skip-quality", action="store_true", help="measure memory and speed only")
    parser.add_argument("--skip-memory", action="store_true", help="measure quality only")
    parser.add_argument("--folder", type=Path, default=None, help="SmolLM2's folder (default: converted from its GGUF)")
    parser.add_argument("--runs", type=Path, default=ROOT / "bench" / ".runs")
    parser.add_argument("--memory-child", choices=sorted(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.folder or smollm2_folder(ROOT / "bench" / ".models" / "smollm2-135m")
    args.runs.mkdir(parents=True, exist_ok=True)
    base = _start(folder, args.runs)
    if args.memory_child:
        memory_child(str(folder), str(base), ARMS[args.memory_child], args.memory_steps,
                     str(args.runs / f"lora-memory-{args.memory_child}"))
        return
    print(f"# SmolLM2-135M 2:4 from SparseGPT ({base}): LoRA (rank 16, alpha 32, every target layer) against full "
          "fine-tuning (recipe fixed-mask); data: finetune's default mixture")
    if not bf16_is_native(torch.device("cpu")):
        print(f"note: this CPU ({torch.backends.cpu.get_cpu_capability()}) emulates bf16, which every arm trains in "
              "(autocast, and lora-lean's frozen weights): expect each arm to run many times slower than on a CPU "
              "with bf16 (python bench/bf16_speed.py measures by how much)")
    if not args.skip_memory:
        _memory(folder, args.runs, args.memory_steps)
    if not args.skip_quality:
        arms = ("full", args.lora_arm)
        _compare(_quality(folder, base, args.runs, arms, args.steps, args.lora_factor,
                          (args.eval_every, args.lora_eval_every)), arms, args.steps)


if __name__ == "__main__":
    main()
