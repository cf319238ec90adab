"""How long `prune --permute`'s channel search takes (issue 27: <= 5 CPU-minutes for SmolLM2), idle and busy.

Each arm is one `nmsparse prune MODEL --pattern P --method magnitude --permute` in a fresh process (magnitude: the
importance is |W|, so the search itself is timed without a calibration pass; Wanda's / SparseGPT's importance adds
one input-norm pass, timed in bench/oneshot.py). Printed per pattern and condition: the channel groups reordered,
the importance kept by the pattern against the original order, the search's own seconds (from prune's --json), the
whole prune's wall time and its peak RSS. Conditions: idle, and with a competing busy process per core minus one
(bench/contention.py).
    python bench/permute.py [smollm2|minilm] [--patterns 2:4,4:8,1:4]
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
from bench.contention import CONDITIONS, describe  # noqa: E402
from bench.smollm2 import smollm2_folder  # noqa: E402
from nmcli.train.example import minilm_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2", choices=("smollm2", "minilm"))
    parser.add_argument("--patterns", default="2:4,4:8,1:4")
    args = parser.parse_args()
    folder = minilm_folder() if args.model == "minilm" else smollm2_folder(ROOT / "bench" / ".models" / "smollm2-135m")
    print(f"# {args.model}: prune --method magnitude --permute; {os.cpu_count()} cores")
    print("| pattern | condition | groups reordered | kept importance | search s | prune wall s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for pattern in args.patterns.split(","):
            for label, condition in CONDITIONS:
                with condition() as busy:
                    out = Path(scratch) / f"{pattern.replace(':', '-')}-{label}"
                    code, stdout, seconds, rss = run_child(
                        [sys.executable, "-m", "nmcli", "prune", str(folder), "--pattern", pattern, "--method",
                         "magnitude", "--permute", "--out", str(out), "--json", "--quiet"])
                if code:
                    raise SystemExit(f"prune --pattern {pattern} --permute failed (exit {code})")
                done = json.loads(stdout)["calibration"]["permutation"]
                print(f"| {pattern} | {describe(label, busy)} | {done['groups']} | {100 * done['kept_gain']:+.2f} % | "
                      f"{done['seconds']:.1f} | {seconds:.1f} | {rss:.2f} |", flush=True)


if __name__ == "__main__":
    main()
