"""Where a benchmark's training runs go: a fresh spawned process for every run.

On a CPU a run's peak memory is its process's resident high-water mark, which a reset cannot bring below what the
process still holds: in a process reused for a second run it reads the first run's peak too (a base-model run
after DoRA read DoRA's 10.5 GB). Every run therefore gets a process of its own, and records with
:func:`runs_before` how many runs its process had trained before it, so a table can trust only the peaks of first
runs. Runs are independent and seeded, so a run's result does not depend on which process trains it; its wall
time does (runs that share a GPU or the cores slow each other).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any

_RUNS_IN_PROCESS = 0


def runs_before() -> int:
    """How many runs this process started before the calling one (0 in a fresh worker); counts the call."""
    global _RUNS_IN_PROCESS
    before, _RUNS_IN_PROCESS = _RUNS_IN_PROCESS, _RUNS_IN_PROCESS + 1
    return before


def own_peak_mb(runs: Iterable[dict[str, Any]]) -> float | None:
    """The highest ``peak_memory_bytes`` (in MB) among ``runs`` that were the first in their process; None when
    none was (a run written before the count was kept may have shared its process)."""
    own = [r["peak_memory_bytes"] for r in runs if r.get("earlier_runs_in_process") == 0]
    return max(own) / 2**20 if own else None


def executor(workers: int, threads: int) -> Executor:
    """``workers`` spawned processes (CUDA needs spawn), each with ``threads`` torch threads (0: torch's default),
    and a fresh one for every run."""
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(threads, os.getpid()),
        max_tasks_per_child=1,
    )


def _start_worker(threads: int, parent: int) -> None:
    """A worker's set-up: its torch threads, and a watchdog that ends it once the runner is gone (killed, say):
    an orphaned worker would otherwise train its run to the end on cores nobody reads the result of."""
    if threads:
        import torch

        torch.set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="runner-watchdog").start()
