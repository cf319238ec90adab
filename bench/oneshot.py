"""One-shot N:M quality, time and memory: magnitude vs Wanda vs SparseGPT on the two real checkpoints.

Each prune and each evaluation is a fresh `nmsparse` process (peak RSS from the OS); calibration on the built-in
Python help text, quality with `nmsparse eval` on its held-out part.

    python bench/oneshot.py minilm --patterns 2:4,4:8,1:4
    python bench/oneshot.py smollm2 --patterns 2:4 --calib-samples 128 --seq-len 512

Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.child import run_child  # noqa: E402
from bench.smollm2 import smollm2_folder  # noqa: E402
from nmcli.train.example import minilm_folder  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")


def _nmsparse(*args: str) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS GiB) of one nmsparse process."""
    code, stdout, seconds, rss = run_child([sys.executable, "-m", "nmcli", *args])
    if code:
        raise SystemExit(f"nmsparse {' '.join(args)} failed (exit {code})")
    return stdout, seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("minilm", "smollm2"))
    parser.add_argument("--patterns", default="2:4,4:8,1:4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calib-samples", default="128")
    parser.add_argument("--seq-len", default=None, help="calibration tokens per sample (default 128 MiniLM, 512 SmolLM2)")
    args = parser.parse_args()
    folder = minilm_folder() if args.model == "minilm" else smollm2_folder(ROOT / "bench" / ".models" / "smollm2-135m")
    seq_len = args.seq_len or ("128" if args.model == "minilm" else "512")
    key = "cosine" if args.model == "minilm" else "perplexity"
    teacher = ["--teacher", str(folder)] if key == "cosine" else []  # perplexity needs no teacher; dense is measured once
    dense, _, _ = _nmsparse("eval", str(folder), "--teacher", str(folder), "--json")
    print(f"# {args.model}: dense {key} {json.loads(dense)['metrics'][key]:.4f}; calibration {args.calib_samples} x {seq_len} tokens "
          f"of python-help; CPU threads {os.cpu_count()}")
    print("| pattern | method | held-out " + key + (" (paragraphs / sentences)" if key == "cosine" else "") +
          " | prune wall s | prune peak RSS GiB |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for pattern in args.patterns.split(","):
            for method in args.methods.split(","):
                out = Path(scratch) / f"{method}-{pattern.replace(':', 'of')}"
                _, seconds, rss = _nmsparse("prune", str(folder), "--pattern", pattern, "--method", method,
                                            "--calib-samples", args.calib_samples, "--seq-len", seq_len,
                                            "--out", str(out), "--quiet")
                metrics = json.loads(_nmsparse("eval", str(out), *teacher, "--json")[0])["metrics"]
                shown = f"{metrics['cosine']:.4f} / {metrics['sentence_cosine']:.4f}" if key == "cosine" else f"{metrics[key]:.2f}"
                print(f"| {pattern} | {method} | {shown} | {seconds:.1f} | {rss:.2f} |", flush=True)


if __name__ == "__main__":
    main()
