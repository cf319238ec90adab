"""Freed activations go back to the operating system: glibc's malloc serves every block of 1 MiB or more from mmap.

torch allocates CPU tensors with malloc. glibc serves a large block from its own mmap, returned to the OS when
freed, until one is freed: then it raises its threshold to that block's size (up to 32 MiB) and serves later blocks
below it from the heap, where blocks of different lifetimes interleave and a freed one rarely gets back to the OS.
The forward passes of a calibration free and allocate thousands of activations of 1-32 MiB, so the heap grows far
past what is alive at once, and so does the peak resident size a user sees. Fixing the threshold (`mallopt`, which
also stops the adjustment) keeps the resident size near what is alive.

`nmsparse prune` sets it when it runs the model (calibrated methods, --permute, --budget). Training does not: there
the small activations that now pay a page fault each time made a step slower (bench/allocator.py measures both; the
figures are in README's benchmark section). A MALLOC_MMAP_THRESHOLD_ the user set (glibc reads it at start) is left
as it is; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 1 << 20  # bytes: a block this large or larger is mmapped and unmapped when freed
USER_SETTING = "MALLOC_MMAP_THRESHOLD_"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD for this process; False where the C library is not glibc or the
    user chose a threshold."""
    if USER_SETTING in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    return ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
