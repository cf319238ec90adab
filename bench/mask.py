"""nmsparse's N:M mask against torch.topk + scatter on a 4096x4096 fp32 weight, idle and with a competing process.

Prints, for each condition, the median time of each over interleaved repeats, their ratio, and checks that both
masks are identical (the weight is seeded and has no ties that topk could break differently).
Targets (issues 2, 12): at least 4x topk at 2:4 and 1:32 in both conditions; at least 10x at 2:4 when idle.
With `--device cuda` both run on the GPU (synchronised around each call; the CPU targets do not apply), and the
time is also given as the bandwidth of one pass: the weight read once and the bool mask written once.
    python bench/mask.py [--repeats 15] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

from nmcli.runtime.openmp import setting, spin_briefly

spin_briefly()  # as the nmsparse command does, before torch loads OpenMP

import torch  # noqa: E402

from contention import CONDITIONS, describe  # noqa: E402
from nmcli.nm import LINEAR, nm_mask, parse_pattern  # noqa: E402

PATTERNS = ("2:4", "1:4", "1:8", "1:16", "1:32")


def topk_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = weight.abs().reshape(-1, m)
    index = groups.topk(n, dim=1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, index, True).reshape(weight.shape)


def target(pattern: str, ours_ms: float, ref_ms: float, condition: str, weight: torch.Tensor) -> str:
    if weight.is_cuda:
        one_pass = weight.numel() * (weight.element_size() + 1)  # read the weight, write a bool per element
        return f"{one_pass / (ours_ms * 1e-3) / 1e9:.0f} GB/s as one pass"
    ratio = ref_ms / ours_ms
    need = 10 if (pattern == "2:4" and condition == "idle") else 4 if pattern in ("2:4", "1:32") else None
    return "" if need is None else f">= {need}x: " + ("met" if ratio >= need else "MISSED")


def measure(weight: torch.Tensor, text: str, repeats: int) -> tuple[float, float, bool]:
    pattern = parse_pattern(text)
    ours, ref = [], []
    same = torch.equal(nm_mask(weight, pattern, LINEAR), topk_mask(weight, pattern.n, pattern.m))
    for _ in range(repeats):
        for fn, times in ((lambda: nm_mask(weight, pattern, LINEAR), ours),
                          (lambda: topk_mask(weight, pattern.n, pattern.m), ref)):
            start = time.perf_counter()
            fn()
            if weight.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(ours) * 1e3, statistics.median(ref) * 1e3, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(args.size, args.size).to(args.device)
    where = torch.cuda.get_device_name(args.device) if weight.is_cuda else f"{torch.get_num_threads()} torch threads"
    print(f"weight {args.size}x{args.size} fp32 on {args.device}, torch {torch.__version__}, {where}, {setting()}")
    for _ in range(3):  # compile (or load the cached kernel), warm the GPU, before timing
        nm_mask(weight, parse_pattern("2:4"), LINEAR)
    for label, condition in CONDITIONS:
        with condition() as busy:
            print(f"\n{describe(label, busy)}")
            print(f"{'pattern':>8} {'nmsparse ms':>12} {'topk ms':>9} {'speed-up':>9}  identical  target")
            for text in PATTERNS:
                ours, ref, same = measure(weight, text, args.repeats)
                print(f"{text:>8} {ours:12.2f} {ref:9.2f} {ref / ours:8.2f}x  {str(same):>9}  {target(text, ours, ref, label, weight)}")


if __name__ == "__main__":
    main()
