"""One data-parallel mesh over every visible device, and the shardings built on it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1D mesh over all devices of all processes, named `data`."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


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
