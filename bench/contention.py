"""Run a measurement twice: on an idle machine, and with busy processes competing for the cores.

Users' machines are busy (a data loader, a second job, a shared CI box): code that is fast only when every core is
free is not fast. `competing()` starts one pure-Python spinning process per core minus one, at normal priority,
and stops them on exit. `CONDITIONS` pairs a label with that context, for benches that print both.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # /proc/stat's cpu line: user, nice, system, irq, softirq, steal (guest is in user)


def _busy_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds all processes spent, CPU seconds of this process and its waited-for children), or
    None off Linux."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
    machine = sum(fields[i] for i in BUSY_FIELDS if i < len(fields)) / os.sysconf("SC_CLK_TCK")
    ours = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))
    return time.monotonic(), machine, ours


class OtherLoad:
    """How many cores processes outside this bench kept busy, on average, from its creation to `cores()`: the
    machine's busy time less this process's and its children's (a child counts once it has been waited for), so
    that a run labelled idle shows whether it was."""

    def __init__(self) -> None:
        self._start = _busy_seconds()

    def cores(self) -> float | None:
        end = _busy_seconds()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        wall, machine, ours = (b - a for a, b in zip(self._start, end))
        return max(0.0, machine - ours) / wall

    def note(self) -> str:
        cores = self.cores()
        return "" if cores is None else f"other processes kept {cores:.2f} of {os.cpu_count()} cores busy"


def describe(label: str, busy: int) -> str:
    cores = os.cpu_count()
    return f"{label}: {cores} cores" + (f", {busy} competing busy process(es)" if busy else ", no competing process")
