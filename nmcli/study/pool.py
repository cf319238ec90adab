"""Training runs for the studies: each in a worker process on one thread, several at a time, stopped cleanly."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import signal
import statistics
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from nmcli.train.engine import METRICS_FILE, FinetuneConfig, run_finetune


def run_one(config: FinetuneConfig) -> dict[str, Any]:
    """One training run in a worker process (one thread each, so results do not depend on --jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_finetune(config).summary
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (config.out / METRICS_FILE).read_text().splitlines()]
    flows = [(r["step"], r["gradient_flow"]) for r in records if "gradient_flow" in r]
    summary["grad_var_curve"] = [[s, statistics.fmean(v["grad_var"] for v in f.values())] for s, f in flows]
    summary["mask_flip_curve"] = [
        [s, statistics.fmean(v["mask_flip_rate"] for v in f.values())] for s, f in flows
        if all("mask_flip_rate" in v for v in f.values())
    ]
    return summary


def map_runs(jobs: int, configs: list[FinetuneConfig], done: Callable[[FinetuneConfig, dict], None],
             work: Callable[[FinetuneConfig], dict] = run_one) -> list[dict]:
    """`work` on every config, `jobs` processes at a time, `done` called in order as results arrive."""
    if jobs <= 1:
        results = []
        for config in configs:
            results.append(work(config))
            done(config, results[-1])
        return results
    # spawn, not fork: forking a process whose OpenMP threads already ran can deadlock the child. Leaving the
    # `with` for any reason (an error, Ctrl-C, SIGTERM) terminates the workers, never waits for their runs.
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        results = []
        for config, result in zip(configs, pool.imap(work, configs)):
            results.append(result)
            done(config, result)
        return results


@contextlib.contextmanager
def terminated_cleanly() -> Iterator[None]:
    """SIGTERM (a `kill`, a CI timeout) ends the study the way Ctrl-C does: the worker pool is terminated and the
    scratch folder removed on the way out, instead of both being left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
