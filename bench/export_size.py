"""Size of the `nm` export against the ideal (N b + N ceil(log2 M)) / (M b) of the dense size, in one run.

For each pattern and dtype, a 4096x4096 weight is pruned, exported with `nmsparse export --format nm`, and the
stored bytes of its values + positions are compared with the dense bytes and with the ideal ratio.
Target (issue 4): within 1 % of the ideal (56.25 % at 2:4 fp16, about 4.1 % at 1:32 fp16).
    python bench/export_size.py [--size 4096]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nmcli.models.resolve import resolve
from nmcli.export.service import run_export
from nmcli.nm import LINEAR, apply_nm, parse_pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    print(f"{'pattern':>7} {'dtype':>9} {'measured':>9} {'ideal':>8} {'off by':>8}  within 1 %")
    with tempfile.TemporaryDirectory() as tmp:
        for text in ("2:4", "1:4", "1:8", "1:16", "1:32"):
            pattern = parse_pattern(text)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                weight = apply_nm(torch.randn(args.size, args.size).to(dtype), pattern, LINEAR)
                src, out = Path(tmp) / "w.safetensors", Path(tmp) / "w-nm.safetensors"
                save_file({"layer.weight": weight}, str(src))
                run_export(resolve(str(src)), "nm", out, pattern=pattern, force=True)
                stored = load_file(str(out))
                size = sum(t.numel() * t.element_size() for t in stored.values())
                measured = size / (weight.numel() * weight.element_size())
                bits = dtype.itemsize * 8
                ideal = (pattern.n * bits + pattern.n * math.ceil(math.log2(pattern.m))) / (pattern.m * bits)
                off = measured / ideal - 1
                name = str(dtype).removeprefix("torch.")
                print(f"{text:>7} {name:>9} {100 * measured:8.3f}% {100 * ideal:7.3f}% {100 * off:+7.3f}%  {abs(off) <= 0.01}")


if __name__ == "__main__":
    main()
