"""A function over many cases, in worker processes when asked, with a progress bar."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable

import tqdm


def parallel_map(function: Callable, jobs: list, workers: int, desc: str) -> list:
    """`function` over `jobs` in `workers` processes, in order, with a progress bar."""
    # Only on a terminal: captured, a bar's redraws leave control codes in the log.
    disabled = len(jobs) < 2 or not sys.stderr.isatty()
    progress = dict(desc=desc, total=len(jobs), leave=False, disable=disabled)
    if workers <= 1 or len(jobs) <= 1:
        return [function(job) for job in tqdm.tqdm(jobs, **progress)]
    # Spawn, not fork: the caller may already run JAX threads, which fork would corrupt.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs))) as pool:
        return list(tqdm.tqdm(pool.imap(function, jobs), **progress))
