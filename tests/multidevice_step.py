"""Run two train steps of a tiny pyramid on a fixed global batch and save the result.

Used by test_step.py: in a subprocess, so that XLA_FLAGS can fake several CPU devices,
and in the test's own process for one device.
    python tests/multidevice_step.py OUT.npz
"""

import sys

import jax
import numpy as np
from conftest import make_tiny_config
from jax.sharding import Mesh

from autocontext_jax.models import build_pyramid
from autocontext_jax.runtime import parallel
from autocontext_jax.training.state import create_train_state, make_optimizer
from autocontext_jax.training.step import jit_train_step, make_train_step


def two_steps(mesh: Mesh | None = None) -> dict[str, np.ndarray]:
    """Two steps over `mesh` (all devices): loss, level losses and parameters."""
    config = make_tiny_config()
    config.train.batch_size = 8
    rng = np.random.default_rng(0)
    shape = (8, 2, 8, 8, 8)
    batch = {
        "image": rng.normal(size=(*shape, 1)).astype(np.float32),
        "label": np.eye(8, dtype=np.float32)[rng.integers(0, 8, size=shape)],
    }
    model = build_pyramid(config)
    optimizer = make_optimizer(config.train)
    mesh = mesh or parallel.make_mesh()
    state = jax.device_put(create_train_state(model, optimizer, 0), parallel.replicated(mesh))
    step = jit_train_step(make_train_step(model, optimizer, config), mesh, model.conv_impl)
    key = jax.random.key(7)
    losses = []
    for _ in range(2):
        state, metrics = step(state, parallel.put_batch(batch, parallel.batch_sharded(mesh)), key)
        losses.append([float(metrics["loss"]), float(metrics["loss_level_2"])])
    flat = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            {"params": state.params, "batch_stats": state.batch_stats}
        )
    }
    return {"devices": np.asarray(mesh.size), "losses": np.asarray(losses), **flat}


def main(out: str) -> None:
    """Save two_steps() over every device to OUT."""
    np.savez(out, **two_steps())


if __name__ == "__main__":
    main(sys.argv[1])
