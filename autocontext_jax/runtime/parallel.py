"""One data-parallel mesh over every visible device, and the shardings built on it."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1D mesh over all devices of all processes, named `data`."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def make_local_mesh() -> Mesh:
    """A 1D mesh over this process's own devices, named `data` (work each process does alone)."""
    return Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))


def local_copy(value: Any) -> Any:
    """A replicated array that spans other processes' devices, as this process's own copy."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(value.addressable_data(0))
    return value


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split across the devices."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble the global batch from this process's local slice of it."""
    return {
        key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()
    }


def replicated_key(seed: int, mesh: Mesh) -> jax.Array:
    """A PRNG key on every device of `mesh`, those of other processes included.

    Made by a computation over the mesh: device_put cannot place a key array on devices
    this process does not address.
    """
    return jax.jit(lambda: jax.random.key(seed), out_shardings=replicated(mesh))()
