"""Is `--bf16` faster than fp32 on this machine? One SmolLM2-sized projection, in one run, idle and busy.

Times a [1024 x 576] @ [576 x 1536] product (a batch of 4 x 256 tokens through SmolLM2-135M's MLP up-projection)
in fp32, in plain bf16 (how `--bf16` holds the teacher) and as an fp32 Linear under bf16 autocast (how `--bf16`
trains the student), the median of `--repeats` calls after a warm-up, and says whether torch has a native bf16 path
here (`nmcli.runtime.device.bf16_is_native`). On a CPU without one, `nmsparse finetune --bf16` prints a warning.
    python bench/bf16_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from nmcli.runtime.openmp import setting, spin_briefly

spin_briefly()  # as the nmsparse command does, before torch loads OpenMP

import torch  # noqa: E402

from contention import CONDITIONS, describe  # noqa: E402
from nmcli.runtime.device import bf16_is_native  # noqa: E402

TOKENS, FEATURES, HIDDEN = 1024, 576, 1536


def median_ms(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def arms() -> dict[str, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    x, w = torch.randn(TOKENS, FEATURES), torch.randn(FEATURES, HIDDEN)
    xb, wb = x.bfloat16(), w.bfloat16()
    linear = torch.nn.Linear(FEATURES, HIDDEN)

    def autocast() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return linear(x)

    return {"fp32": lambda: x @ w, "bf16": lambda: xb @ wb, "fp32 Linear, bf16 autocast": autocast}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    native = bf16_is_native(torch.device("cpu"))
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {native}; {setting()}; [{TOKENS} x {FEATURES}] @ [{FEATURES} x {HIDDEN}]")
    for label, condition in CONDITIONS:
        with condition() as busy:
            print(f"\n{describe(label, busy)}")
            times = {name: median_ms(call, args.repeats) for name, call in arms().items()}
            for name, ms in times.items():
                print(f"  {name}: {ms:.1f} ms ({ms / times['fp32']:.1f}x fp32)")


if __name__ == "__main__":
    main()
