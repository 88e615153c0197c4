"""A function over many cases, in worker processes when asked, with a progress bar."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable

import tqdm


def parallel_map(function: Callable, jobs: list, workers: int, desc: str) -> list:
    """`function` over `jobs` in `workers` processes, in order, with a progress bar."""
    progress = dict(desc=desc, total=len(jobs), leave=False, disable=len(jobs) < 2)
    if workers <= 1 or len(jobs) <= 1:
        return [function(job) for job in tqdm.tqdm(jobs, **progress)]
    # Spawn, not fork: the caller may already run JAX threads, which fork would corrupt.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs))) as pool:
        return list(tqdm.tqdm(pool.imap(function, jobs), **progress))
