"""How long torch's OpenMP threads spin at a barrier before they sleep: briefly, so a busy machine stays usable.

torch's CPU kernels run on GNU OpenMP (libgomp). A thread that reaches the end of a parallel region first spins,
by default for up to 300,000 iterations (milliseconds), waiting for the others. When another process keeps a core
busy, the thread it waits for is often the one not scheduled, and the spinning one holds the core it needs. With
3,000 spins a waiting thread soon sleeps and gives the core back: training steps get faster and steadier under
contention and stay about the same idle (bench/step_overhead.py and bench/lm_step.py measure both; figures in
README's benchmark section).

libgomp reads the setting once, when torch loads it, so the entry point sets it before anything imports torch. A
GOMP_SPINCOUNT or OMP_WAIT_POLICY the user set is left as it is.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 3000
USER_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def spin_briefly() -> bool:
    """Set GOMP_SPINCOUNT for this process and its children; False when it cannot apply (torch is already loaded)
    or the user chose a wait policy."""
    if "torch" in sys.modules or any(name in os.environ for name in USER_SETTINGS):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True


def setting() -> str:
    """The wait settings OpenMP runs with in this process, for benchmark headers."""
    chosen = [f"{name}={os.environ[name]}" for name in USER_SETTINGS if name in os.environ]
    return ", ".join(chosen) or "OpenMP defaults"
