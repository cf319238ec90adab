"""Work over [0, total) split in chunks that torch's thread count of threads take one at a time.

A shared iterator hands out the chunks (next() on a range iterator is atomic under the GIL), so a slow or busy core
simply does fewer of them. The work must release the GIL (numba `nogil` kernels) to run in parallel.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch


def in_chunks(work: Callable[[int, int], None], total: int, chunk: int, *, parallel: bool = True) -> None:
    """work(start, stop) over [0, total) in chunks of `chunk`; in this thread when `parallel` is False or torch
    runs one thread."""
    starts = iter(range(0, total, chunk))

    def worker() -> None:
        for start in starts:
            work(start, min(start + chunk, total))

    threads = torch.get_num_threads()
    if threads == 1 or not parallel:
        worker()
        return
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
