"""Run a measurement twice: on an idle machine, and with busy processes competing for the cores.

Users' machines are busy (a data loader, a second job, a shared CI box): code that is fast only when every core is
free is not fast. `competing()` starts one pure-Python spinning process per core minus one, at normal priority,
and stops them on exit. `CONDITIONS` pairs a label with that context, for benches that print both.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

SPIN = "while True: pass"


@contextlib.contextmanager
def competing(processes: int | None = None) -> Iterator[int]:
    """`processes` busy loops (default: cores - 1, at least one) for the duration of the block."""
    count = max(1, (os.cpu_count() or 2) - 1) if processes is None else processes
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        time.sleep(0.3)  # let them get scheduled
        yield count
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@contextlib.contextmanager
def idle() -> Iterator[int]:
    yield 0


CONDITIONS = (("idle", idle), ("busy", competing))


def describe(label: str, busy: int) -> str:
    cores = os.cpu_count()
    return f"{label}: {cores} cores" + (f", {busy} competing busy process(es)" if busy else ", no competing process")
