"""Run one command in a child process and measure it: wall time and the child's own peak RSS (os.wait4)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def run_child(cmd: list[str]) -> tuple[int, str, float, float]:
    """(exit code, stdout, wall seconds, peak RSS GiB of this child alone); stderr is echoed on failure."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if code:
            sys.stderr.write(err.read()[-2000:])
        return code, out.read(), seconds, usage.ru_maxrss / 2**20
