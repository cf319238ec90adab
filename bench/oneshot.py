"""One-shot N:M quality, time and memory: magnitude vs Wanda vs SparseGPT, each without and with --permute and
--refine / --reconstruct, uniform patterns and per-layer patterns under --budget, on the two real checkpoints, side
by side in one run.

Each prune and each evaluation is a fresh `nmsparse` process (peak RSS from the OS); calibration on prune's default
text (the general-use mixture python-help:0.3,wiki:0.7) unless --calib says otherwise; quality with `nmsparse eval
--teacher DENSE` on two held-out domains: Python help's held-out part and the general-English news set (MiniLM:
cosine to dense, paragraphs / sentences; SmolLM2: perplexity as a ratio to dense).

    python bench/oneshot.py minilm --patterns 2:4,4:8,1:4
    python bench/oneshot.py smollm2 --patterns 2:4 --methods wanda,sparsegpt
    python bench/oneshot.py minilm --patterns 2:4 --budget 0.5 --candidates "2:4,1:4,dense;4:8,2:4,1:4,dense"
    python bench/oneshot.py minilm --patterns 2:4 --methods sparsegpt,wanda --refine 0,20 --permute off --budget 0.5
    python bench/oneshot.py minilm --patterns 2:4 --methods sparsegpt --permute off --reconstruct 0,1,4
    python bench/oneshot.py minilm --patterns 2:4 --methods alps --permute on --reconstruct 1 --calib-samples 512
    python bench/oneshot.py smollm2 --patterns 2:4 --methods alps --permute on --reconstruct 1 --reconstruct-lr 5e-3

Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.child import run_child  # noqa: E402
from bench.contention import OtherLoad  # noqa: E402
from bench.smollm2 import smollm2_folder  # noqa: E402
from nmcli.train.example import minilm_folder  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")


def _nmsparse(*args: str) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS GiB) of one nmsparse process."""
    code, stdout, seconds, rss = run_child([sys.executable, "-m", "nmcli", *args])
    if code:
        raise SystemExit(f"nmsparse {' '.join(args)} failed (exit {code})")
    return stdout, seconds, rss


def _quality(out: str, folder: Path, key: str) -> str:
    metrics = json.loads(_nmsparse("eval", out, "--teacher", str(folder), "--json")[0])["metrics"]
    if key == "cosine":
        return " | ".join(f"{metrics[p + 'cosine']:.4f} / {metrics[p + 'sentence_cosine']:.4f}" for p in ("", "news/"))
    return " | ".join(f"{metrics[p + 'perplexity_ratio']:.3f}x ({metrics[p + 'perplexity']:.2f})" for p in ("", "news/"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("minilm", "smollm2"))
    parser.add_argument("--patterns", default="2:4,4:8,1:4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--permute", default="off,on", help="arms without and with --permute")
    parser.add_argument("--calib", default=None, help="prune's --calib (default: prune's own default)")
    parser.add_argument("--calib-samples", default="128")
    parser.add_argument("--seq-len", default=None, help="calibration tokens per sample (default 128 MiniLM, 512 SmolLM2)")
    parser.add_argument("--budget", default=None, help="also prune --budget at this overall sparsity")
    parser.add_argument("--candidates", default="2:4,1:4,dense", help="--budget's candidate sets, ';' between sets")
    parser.add_argument("--refine", default="0", help="prune --refine steps per arm, e.g. 0,20 (calibrated methods)")
    parser.add_argument("--reconstruct", default="0", help="prune --reconstruct passes per arm, e.g. 0,2 (calibrated "
                        "methods)")
    parser.add_argument("--reconstruct-lr", default=None, help="prune --reconstruct-lr for the --reconstruct arms "
                        "(default: prune's own)")
    args = parser.parse_args()
    folder = minilm_folder() if args.model == "minilm" else smollm2_folder(ROOT / "bench" / ".models" / "smollm2-135m")
    seq_len = args.seq_len or ("128" if args.model == "minilm" else "512")
    key = "cosine" if args.model == "minilm" else "perplexity"
    calib = ["--calib", args.calib] if args.calib else []
    print(f"# {args.model}: calibration {args.calib_samples} x {seq_len} tokens of {args.calib or 'prune default'}; "
          f"CPU threads {os.cpu_count()}")
    shown = "cosine to dense, paragraphs / sentences" if key == "cosine" else "perplexity / dense (perplexity)"
    print(f"| pattern | method | refine | reconstruct | permute: groups, kept importance, search s | python-help held-out: {shown} | "
          f"news: {shown} | prune wall s | prune peak RSS GiB | cores other processes kept busy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    arms = [["--pattern", p] for p in args.patterns.split(",") if p]
    if args.budget:
        arms += [["--budget", args.budget, "--candidates", c] for c in args.candidates.split(";")]
    with tempfile.TemporaryDirectory() as scratch:
        for index, arm in enumerate(arms):
            for method, refine, passes, permute in itertools.product(
                    args.methods.split(","), args.refine.split(","), args.reconstruct.split(","), args.permute.split(",")):
                if method == "magnitude" and (refine, passes) != ("0", "0"):
                    continue  # --refine and --reconstruct fit to calibration data: the calibrated methods only
                out = Path(scratch) / f"{method}-{index}-{refine}-{passes}-{permute}"
                extra = ["--permute"] if permute == "on" else []
                extra += ["--refine", refine] if refine != "0" else []
                extra += ["--reconstruct", passes] if passes != "0" else []
                extra += ["--reconstruct-lr", args.reconstruct_lr] if passes != "0" and args.reconstruct_lr else []
                data = ["--calib-samples", args.calib_samples, "--seq-len", seq_len, *calib]
                calibration = data if method != "magnitude" or "--budget" in arm else []
                others = OtherLoad()
                stdout, seconds, rss = _nmsparse("prune", str(folder), *arm, "--method", method,
                                                 *calibration, *extra, "--out", str(out), "--json")
                info = json.loads(stdout).get("calibration", {})
                done = info.get("permutation")
                permuted = f"{done['groups']}, {100 * done['kept_gain']:+.2f}%, {done['seconds']:.0f}" if done else "off"
                print(f"| {_arm_label(arm, info.get('budget'))} | {method} | {refine} | {passes} | {permuted} | "
                      f"{_quality(str(out), folder, key)} | {seconds:.1f} | {rss:.2f} | {_cores(others)} |", flush=True)


def _cores(others: OtherLoad) -> str:
    cores = others.cores()
    return "?" if cores is None else f"{cores:.2f}"


def _arm_label(arm: list[str], budget: dict | None) -> str:
    """`2:4`, or `--budget 0.5 of 2:4,1:4,dense: 2:4 x 34, 1:4 x 2, dense x 1 (0.5000, 15 s)`."""
    if budget is None:
        return arm[1]
    counts = ", ".join(f"{p} x {n}" for p, n in budget["counts"].items())
    return f"budget {arm[1]} of {arm[3]}: {counts} ({budget['reached']:.4f}, {budget['seconds']:.0f} s)"


if __name__ == "__main__":
    main()
