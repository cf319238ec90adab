"""Recovery of real pretrained transformers after one-shot N:M, by distillation from the dense model.

Each run is `nmsparse finetune` in a fresh process (its peak RSS measured by the OS); quality is evaluated every
`--eval-every` steps on the general-domain `news` set and on the held-out part of the training text, so the output
is a curve of quality against minutes in both domains.

    python bench/recovery.py minilm --patterns 2:4,1:4,4:8            # MiniLM: embedding cosine to dense
    python bench/recovery.py smollm2 --data python-help --data teacher:512   # SmolLM2-135M: perplexity
    python bench/recovery.py minilm --busy        # the same run with a competing busy process per core but one

Figures are printed, not asserted. Long: run it in the background (15-30 minutes per run on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.child import run_child  # noqa: E402
from bench.contention import OtherLoad, competing, describe, idle  # noqa: E402
from bench.smollm2 import smollm2_folder  # noqa: E402
from nmcli.runtime.device import bf16_is_native  # noqa: E402
from nmcli.train.example import minilm_folder  # noqa: E402

MODELS = {
    # model -> (metric keys printed: the general-domain set first, then the training text's held-out part; default
    # finetune options; SmolLM2 adds --bf16 where this CPU computes bf16 natively, see bench/bf16_speed.py)
    "minilm": (("news/cosine", "news/sentence_cosine", "news/spearman", "news/top1_agreement", "cosine", "sentence_cosine",
                "spearman"), ["--batch-size", "16", "--lr", "3e-4", "--seq-len", "128"]),
    "smollm2": (("news/perplexity_ratio", "perplexity_ratio", "news/perplexity", "perplexity"),
                ["--batch-size", "4", "--lr", "2e-4", "--seq-len", "256"]),
}


CLOCKS = ("elapsed_s", "train_s")  # seconds since the run was prepared (evaluations included); in training steps alone


def _curve(out: Path, keys: tuple[str, ...]) -> list[dict]:
    """Each evaluation's event with both CLOCKS: the start at 0, the final evaluation (which carries no time of its
    own) at the end of training, every other at the last time logged up to it."""
    curve, clocks = [], dict.fromkeys(CLOCKS, 0.0)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        clocks.update({clock: event[clock] for clock in CLOCKS if clock in event})
        if event.get("event") in ("start", "eval", "epoch", "final") and keys[0] in event:
            curve.append({**event, **clocks})
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--patterns", default="2:4")
    parser.add_argument("--data", action="append", help="a --data value to compare (repeat; a mixture's commas stay "
                        "inside one value) [default: finetune's own default, python-help:0.3,wiki:0.7]")
    parser.add_argument("--recipe", default="fixed-mask")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="training samples per run")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--extra", default="", help="more finetune options, space-separated")
    parser.add_argument("--busy", action="store_true", help="run with a competing busy process per core but one")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ".runs")
    parser.add_argument("--folder", type=Path, default=None,
                        help="the model's folder (default: MiniLM from its wheel, SmolLM2 converted from its GGUF)")
    args = parser.parse_args()
    keys, options = MODELS[args.model]
    if args.model == "smollm2" and bf16_is_native(torch.device("cpu")):
        options = [*options, "--bf16"]
    args.out.mkdir(parents=True, exist_ok=True)
    converted = ROOT / "bench" / ".models" / "smollm2-135m"
    folder = args.folder or (minilm_folder() if args.model == "minilm" else smollm2_folder(converted))
    print(f"# {args.model} ({folder}), recipe {args.recipe}, {args.epochs} epoch(s), options {' '.join(options)} {args.extra}")
    for data in args.data or ["python-help:0.3,wiki:0.7"]:
        for pattern in args.patterns.split(","):
            tag = data.replace(":", "").replace(",", "+").replace("/", "_")
            out = args.out / f"{args.model}-{pattern.replace(':', 'of')}-{tag}-{Path(args.recipe).stem}"
            cmd = [sys.executable, "-m", "nmcli", "finetune", "--model", str(folder), "--recipe", args.recipe,
                   "--pattern", pattern, "--epochs", str(args.epochs), "--data", data, "--out", str(out), "--force",
                   "--eval-every", str(args.eval_every), *options, *args.extra.split()]
            if args.limit:
                cmd += ["--limit", str(args.limit)]
            others = OtherLoad()
            with (competing() if args.busy else idle()) as busy:
                code, _, seconds, rss = run_child(cmd)
            load = others.note()
            if code:
                print(f"{pattern} {data}: failed (exit {code})")
                continue
            summary = json.loads((out / "summary.json").read_text())
            print(f"\n## {pattern}, data {data} ({describe('busy' if busy else 'idle', busy)}{'; ' + load if load else ''}): {seconds / 60:.1f} min, peak RSS {rss:.2f} GiB, {summary['steps']} steps")
            print(f"data: {summary['data']}")
            print("  " + " | ".join(f"{k}: start {summary[f'start_{k}']:.4f}, one-shot mask of the start "
                                     f"{summary[f'one_shot_{k}']:.4f}, recovered {summary[f'final_{k}']:.4f}" for k in keys))
            print("  curve (minutes in training steps, then since the run was prepared with evaluations included: "
                  + ", ".join(keys) + "; the final evaluation at the end of training; finetune's own wall time "
                  f"{summary['wall_seconds'] / 60:.1f} min)")
            for event in _curve(out, keys):
                print(f"    step {event['step']:>5} {event['train_s'] / 60:6.1f} {event['elapsed_s'] / 60:6.1f} min  "
                      + "  ".join(f"{event[k]:.4f}" for k in keys))


if __name__ == "__main__":
    main()
