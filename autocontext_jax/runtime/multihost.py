"""Joining the processes of a multi-host run (TPU slice, SLURM job, or given by flags)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax


def launched_by_slurm(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is one of several tasks of a SLURM job step (srun)."""
    return int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in environ


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    multihost: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> bool:
    """Call jax.distributed.initialize when the run spans processes; True if it did.

    Explicit flags win; otherwise `multihost` (a TPU slice: JAX finds its workers) or a
    SLURM job step with several tasks lets JAX detect the cluster. Must run before anything
    touches a device, so that jax.devices() lists the devices of every process.
    """
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if num_processes is not None or process_id is not None:
        raise ValueError("--num_processes and --process_id need --coordinator_address")
    if multihost or launched_by_slurm(environ):
        jax.distributed.initialize()
        return True
    return False
