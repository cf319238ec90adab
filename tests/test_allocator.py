"""glibc's mmap threshold: `nmsparse prune` fixes it when it runs the model, so that a freed block of 1 MiB or more
goes back to the OS, and never overrides the user's. Observed through glibc itself, in a fresh interpreter:
mallinfo2's bytes in mmapped blocks."""

import os
import platform
import subprocess
import sys

import pytest

from nmcli.runtime.allocator import MMAP_THRESHOLD, USER_SETTING

GLIBC = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# After an 8 MiB block is freed, glibc (left to itself) raises its threshold to 8 MiB: a 2 MiB block then comes from
# the heap. With the threshold fixed at 1 MiB it is mmapped.
PROBE = """
import ctypes
if {fix}:
    from nmcli.runtime.allocator import return_large_blocks
    print(return_large_blocks())
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(2 << 20)
print(libc.mallinfo2().hblkhd - before >= 2 << 20)
"""


def _probe(fix: bool, **settings: str) -> list[str]:
    """[what return_large_blocks answered (when called), whether the 2 MiB block was mmapped]"""
    env = {k: v for k, v in os.environ.items() if k != USER_SETTING} | settings
    done = subprocess.run([sys.executable, "-c", PROBE.format(fix=fix)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@GLIBC
def test_fixed_it_serves_large_blocks_from_mmap():
    assert MMAP_THRESHOLD <= 2 << 20
    assert _probe(fix=True) == ["True", "True"]


@GLIBC
def test_left_to_itself_glibc_serves_them_from_the_heap():
    """The probe can tell the two apart: without the call the 2 MiB block stays on the heap."""
    assert _probe(fix=False) == ["False"]


@GLIBC
def test_a_threshold_of_the_user_is_kept():
    assert _probe(fix=True, **{USER_SETTING: str(32 << 20)}) == ["False", "False"]


@pytest.mark.parametrize("options, fixed", [
    (("--method", "sparsegpt", "--calib-samples", "8", "--seq-len", "32"), True),
    (("--method", "magnitude", "--permute"), True),
    (("--method", "magnitude",), False),  # streamed tensor by tensor, no model run
])
def test_prune_fixes_it_when_it_runs_the_model(cli, tmp_path, tiny_llama, allocator_calls, options, fixed):
    r = cli("prune", tiny_llama, "--pattern", "2:4", *options, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert allocator_calls == ([True] if fixed else [])
