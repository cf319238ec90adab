"""Tokens/s and peak RSS of one distillation training step of SmolLM2-135M, fp32 and bf16, in one run.

A step is what `nmsparse finetune --model <SmolLM2>` runs: the dense teacher's forward, the student's forward and
backward with the recipe's masks, the AdamW update; bf16 as with `--bf16` (the teacher in bf16, the student under
bf16 autocast, fp32 master weights). Each precision runs in a fresh process, so its peak RSS (from the OS) is its own;
tokens/s counts the batch's real tokens per step (the fastest of `--steps` steps after a warm-up step). Both
conditions: idle, and with a competing busy process per core minus one (bench/contention.py).
    python bench/lm_step.py [--folder bench/.models/smollm2-135m] [--batch 4] [--seq-len 256] [--steps 3]
bf16 runs by default only where it is native (bench/bf16_speed.py: emulated, a step takes over 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from child import run_child
from contention import CONDITIONS, describe
from nmcli.runtime.openmp import setting, spin_briefly

HERE = Path(__file__).resolve().parent


def rss_gib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 2**20
    raise LookupError(field)


def child(args: argparse.Namespace) -> None:
    from smollm2 import smollm2_folder
    from step_overhead import hf_subject, make_runner

    subject = hf_subject(smollm2_folder(Path(args.folder)), args.batch, args.seq_len, replay=False, bf16=args.child == "bf16")
    run = make_runner(args.recipe, args.pattern, subject)
    loaded = rss_gib("VmRSS:")
    run(1)  # warm-up
    step_s = min(run(1) for _ in range(args.steps))
    tokens = int(subject.batch["attention_mask"].sum())
    print(json.dumps({"description": subject.description, "step_s": step_s, "tokens": tokens, "loaded_gib": loaded}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(HERE / ".models" / "smollm2-135m"), help="made on first use")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--recipe", default="sr-ste")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--precisions", default=None,
                        help="fp32,bf16 or one of them [default: fp32, and bf16 where this CPU computes it natively]")
    parser.add_argument("--child", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    spin_briefly()  # the children inherit it, as the nmsparse command's would
    import torch

    from nmcli.runtime.device import bf16_is_native

    native = bf16_is_native(torch.device("cpu"))
    precisions = args.precisions.split(",") if args.precisions else ["fp32", *(["bf16"] if native else [])]
    print(f"recipe {args.recipe} at {args.pattern}, batch {args.batch} x {args.seq_len} tokens; {setting()}")
    for label, condition in CONDITIONS:
        with condition() as busy:
            print(f"\n{describe(label, busy)}")
            for precision in precisions:
                code, stdout, _, peak_gib = run_child([sys.executable, __file__, "--child", precision, *sys.argv[1:]])
                if code:
                    raise SystemExit(f"{precision} step failed (exit {code})")
                r = json.loads(stdout.splitlines()[-1])
                if label == "idle":
                    print(f"  {r['description']}")
                print(f"  {precision}: step {r['step_s']:.2f} s, {r['tokens'] / r['step_s']:.0f} tokens/s; "
                      f"RSS {r['loaded_gib']:.2f} GiB loaded, peak {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
