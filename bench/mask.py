"""nmsparse's N:M mask against torch.topk + scatter on a 4096x4096 fp32 weight, measured in one run.

Prints the median time of each over interleaved repeats, their ratio, and checks both masks are identical.
Target (issue 2): at least 4x faster than topk at 2:4 and at 1:32.
    python bench/mask.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nmcli.nm import LINEAR, nm_mask, parse_pattern


def topk_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = weight.abs().reshape(-1, m)
    index = groups.topk(n, dim=1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, index, True).reshape(weight.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(args.size, args.size)
    print(f"weight {args.size}x{args.size} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'pattern':>8} {'nmsparse ms':>12} {'topk ms':>9} {'speed-up':>9}  identical  target")
    for text in ("2:4", "1:4", "1:8", "1:16", "1:32"):
        pattern = parse_pattern(text)
        ours, ref = [], []
        same = torch.equal(nm_mask(weight, pattern, LINEAR), topk_mask(weight, pattern.n, pattern.m))
        for _ in range(args.repeats):
            for fn, times in ((lambda: nm_mask(weight, pattern, LINEAR), ours),
                              (lambda: topk_mask(weight, pattern.n, pattern.m), ref)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        a, b = statistics.median(ours) * 1e3, statistics.median(ref) * 1e3
        target = ">= 4x: " + ("met" if b / a >= 4 else "MISSED") if text in ("2:4", "1:32") else ""
        print(f"{text:>8} {a:12.1f} {b:9.1f} {b / a:8.2f}x  {str(same):>9}  {target}")


if __name__ == "__main__":
    main()
