"""Streaming `prune` against a plain safetensors load + save copy of the same multi-GB file, in one run.

A third job, `stream`, runs prune's own pipeline with nothing to prune, so every tensor is copied unchanged:
stream/copy is the pipeline's own cost, prune/stream what masking the targets on the way adds. Each job runs in its
own fresh interpreter (best of the repeats; the range of all runs is printed too) so that its peak RSS (VmHWM) is
its own; the baseline is the RSS after imports. Both conditions: idle, and with a competing busy process per core
minus one (bench/contention.py).
Targets (issues 2, 12): prune time at most 1.5x the copy's in both; prune peak RSS above baseline at most about
2x the largest tensor.
    python bench/prune.py [--gb 2] [--repeats 4] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nmcli.runtime.openmp import setting, spin_briefly

spin_briefly()  # as the nmsparse command does, before torch loads OpenMP

import torch  # noqa: E402

from contention import CONDITIONS, describe  # noqa: E402
from nmcli.io.safetensors_stream import write_streaming  # noqa: E402

CHILD = r"""
import json, sys, time
from pathlib import Path

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

job, src, dst = sys.argv[1:4]
from safetensors.torch import load_file, save_file
from nmcli.models.resolve import resolve
from nmcli.nm import parse_pattern
from nmcli.oneshot.plan import plan_prune
from nmcli.oneshot.magnitude import prune
imported, loading = rss("VmRSS:"), time.perf_counter()
if job not in ("copy", "stream"):  # the mask kernel's one-time load (numba cache) is measured apart from streaming
    import torch
    from nmcli.nm import LINEAR, apply_nm_
    apply_nm_(torch.ones(4, 8), parse_pattern(job), LINEAR)
base, loaded = rss("VmRSS:"), time.perf_counter() - loading
start = time.perf_counter()
if job == "copy":
    save_file(load_file(src), dst)
elif job == "stream":  # prune's own pipeline with nothing to prune: every tensor copied unchanged
    from nmcli.io.rewrite import copy_item, rewrite
    ckpt = resolve(src).checkpoint
    rewrite(ckpt, lambda names: [copy_item(ckpt, n) for n in names], Path(dst), {}, force=True)
else:
    resolved = resolve(src)
    prune(resolved, plan_prune(resolved, parse_pattern(job)), Path(dst), force=True)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_above_base": rss("VmHWM:") - base, "kernel_load": base - imported, "kernel_seconds": loaded}))
"""


def make_checkpoint(path: Path, gigabytes: float, rows: int = 4096, cols: int = 8192) -> int:
    """Linear weights of rows x cols fp32 plus biases, written tensor by tensor; returns the largest tensor size."""
    count = max(1, round(gigabytes * 2**30 / (rows * cols * 4)))
    layout = []
    for i in range(count):
        layout += [(f"blocks.{i}.fc.weight", (rows, cols), torch.float32), (f"blocks.{i}.fc.bias", (rows,), torch.float32)]
    gen = torch.Generator().manual_seed(0)
    tensors = (torch.randn(shape, generator=gen) for _, shape, _ in layout)
    write_streaming(path, layout, tensors)
    return rows * cols * 4


def run(job: str, src: Path, dst: Path) -> dict:
    """One job in a fresh interpreter writing a new file, after flushing dirty pages so no job pays for another's
    writes. The output never exists beforehand: replacing a file (by rename or by truncation) makes ext4 flush
    the new data to disk on the spot (auto_da_alloc), which measured 1.0-1.5 s per 2 GiB here and differs between
    the two ways of replacing, so it would measure the disk rather than the tool."""
    dst.unlink(missing_ok=True)
    os.sync()
    out = subprocess.run([sys.executable, "-c", CHILD, job, str(src), str(dst)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = Path(tmp) / "model.safetensors"
        started = time.perf_counter()
        largest = make_checkpoint(src, args.gb)
        size = src.stat().st_size
        print(f"checkpoint {size / 2**30:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB "
              f"(made in {time.perf_counter() - started:.1f}s); pattern {args.pattern}; {setting()}")
        compare(src, Path(tmp), args.pattern, 1)  # not counted: the first runs after making the file were 5x slower
        for label, condition in CONDITIONS:
            with condition() as busy:
                print(f"\n{describe(label, busy)}")
                summarize(compare(src, Path(tmp), args.pattern, args.repeats), args.pattern, largest)


def compare(src: Path, tmp: Path, pattern: str, repeats: int) -> dict[str, list[dict]]:
    """Each job `repeats` times, the order rotated every round so that no job always runs first."""
    jobs = ["copy", "stream", pattern]
    results: dict[str, list[dict]] = {job: [] for job in jobs}
    for i in range(repeats):
        for job in jobs[i % len(jobs) :] + jobs[: i % len(jobs)]:
            results[job].append(run(job, src, tmp / f"{job.replace(':', 'of')}.safetensors"))
    return results


def spread(results: list[dict]) -> str:
    """All runs' range, so that the reader sees how far one best-of figure can be trusted."""
    times = [r["seconds"] for r in results]
    return f"(runs {min(times):5.2f}-{max(times):5.2f}s)"


def summarize(results: dict[str, list[dict]], pattern: str, largest: int) -> None:
    best = {job: min(r["seconds"] for r in runs) for job, runs in results.items()}
    labels = {"copy": "copy   (load_file + save_file)", "stream": "stream (prune's pipeline, no target)",
              pattern: f"prune  {pattern}"}
    for job, runs in results.items():
        rss = max(r["peak_above_base"] for r in runs)
        print(f"{labels[job]:36s}: {best[job]:6.2f}s {spread(runs)}  peak RSS above baseline {rss / 2**20:5.0f} MiB")
    prunes = results[pattern]
    kernel, kernel_s = max(r["kernel_load"] for r in prunes), max(r["kernel_seconds"] for r in prunes)
    print(f"  not counted above: loading the compiled mask kernel once per process, {kernel_s:.2f}s and "
          f"{kernel / 2**20:.0f} MiB (like the imports)")
    ratio, mem = best[pattern] / best["copy"], max(r["peak_above_base"] for r in prunes) / largest
    print(f"time ratio prune/copy: {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'MISSED'}); "
          f"prune/stream {best[pattern] / best['stream']:.2f}x (what masking adds), "
          f"stream/copy {best['stream'] / best['copy']:.2f}x (the pipeline itself)")
    print(f"prune peak RSS / largest tensor: {mem:.2f}x (target about <= 2x: {'met' if mem <= 2.2 else 'MISSED'})")


if __name__ == "__main__":
    main()
