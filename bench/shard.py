"""Peak memory per rank of `finetune` on SmolLM2-135M: one process, two under torchrun with DistributedDataParallel,
and two with --shard (FSDP2), for full fine-tuning and LoRA.

Each run trains `--steps` steps of batch 2 x 256 tokens per rank with no evaluation (the evaluation's logits would
set the peak) and prints each rank's own peak RSS (the OS's) and the largest RSS at the end of a step. Loading puts
the whole teacher and student in every process before they are sharded, so the peak shows the loading as well; the
RSS between steps shows what training holds (weights, gradients and optimizer state, split over the ranks when
sharded).

    python bench/shard.py                  # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.smollm2 import smollm2_folder  # noqa: E402

RECIPES = {"full": "fixed-mask", "lora": "lora"}


def rss_now_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child(folder: str, recipe: str, shard: bool, steps: int, out: str) -> None:
    """One rank: `steps` training steps, then its peak RSS and the largest RSS seen at the end of a step (weights,
    gradients and optimizer state, held between steps) into OUT.rankR.json."""
    from nmcli.methods.recipes import load_recipe
    from nmcli.train.engine import FinetuneConfig, Reporter, run_finetune

    class Sampler(Reporter):
        held = 0.0

        def step(self, step: int, values: dict) -> None:
            self.held = max(self.held, rss_now_gib())

    world = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = load_recipe(recipe).with_overrides(batch_size=2, epochs=2)
    config = FinetuneConfig(model=folder, recipe=chosen, out=Path(out), data="python-help", seq_len=256,
                            limit=2 * steps * world, stop_after=1, force=True, measure_start=False, shard=shard)
    sampler = Sampler()
    run_finetune(config, sampler)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "held_gib": sampler.held}))


def _measure(folder: Path, arm: str, processes: int, shard: bool, steps: int, runs: Path) -> list[dict]:
    out = runs / f"shard-bench-{arm}-{processes}{'-shard' if shard else ''}"
    me = [str(Path(__file__).resolve()), "--child", arm, "--folder", str(folder), "--steps", str(steps), "--out", str(out)]
    if shard:
        me.append("--shard")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    result = subprocess.run([*launch, *me], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.stderr.write(result.stderr[-2000:])
        return []
    return [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--runs", type=Path, default=ROOT / "bench" / ".runs")
    parser.add_argument("--child", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.folder or smollm2_folder(ROOT / "bench" / ".models" / "smollm2-135m")
    if args.child:
        child(str(folder), RECIPES[args.child], args.shard, args.steps, args.out)
        return
    args.runs.mkdir(parents=True, exist_ok=True)
    print(f"# {folder.name} ({folder}) 2:4, {args.steps} steps of batch 2 x 256 tokens per rank, fp32, no evaluation")
    print("arm | processes | peak RSS per rank (GiB) | RSS between steps per rank (GiB)")
    for arm in RECIPES:
        for processes, shard in ((1, False), (2, False), (2, True)):
            ranks = sorted(_measure(folder, arm, processes, shard, args.steps, args.runs), key=lambda r: r["rank"])
            how = f"{processes}" + (" --shard" if shard else " DDP" if processes > 1 else "")
            print(f"{arm} | {how} | " + " / ".join(f"{r['peak_gib']:.2f}" for r in ranks) + " | "
                  + " / ".join(f"{r['held_gib']:.2f}" for r in ranks))


if __name__ == "__main__":
    main()
