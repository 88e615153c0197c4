"""Tiled inference of a tiny pyramid on a fixed volume, saved for comparison.

Used by test_tiling.py: in a subprocess, so that XLA_FLAGS can fake several CPU devices,
and in the test's own process for one device.
    python tests/multidevice_inference.py OUT.npz
"""

import sys

import numpy as np
from conftest import make_tiny_config
from jax.sharding import Mesh

from autocontext_jax import inference
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.init import init_variables
from autocontext_jax.runtime import parallel


def blended_levels(mesh: Mesh | None = None) -> dict[str, np.ndarray]:
    """Both levels' blended softmax over `mesh` (all local devices), 3 tiles per device."""
    config = make_tiny_config()
    config.model.width = 4
    config.model.num_poolings = 2
    model = build_pyramid(config)
    variables = init_variables(model, 0)
    image = np.random.default_rng(0).normal(size=(45, 30, 21)).astype(np.float32)
    # 2 tiles at level 1 and 45 at level 2, in batches of 3 x devices: last ones partly filled.
    options = inference.TilingOptions(tile_size=8, overlap=0.5, tiles_per_batch=3)
    mesh = mesh or parallel.make_local_mesh()
    levels = inference.predict_pyramid(model, variables, image, -1.0, options, mesh)
    return {"devices": np.asarray(mesh.size), "level_1": levels[0], "level_2": levels[1]}


def main(out: str) -> None:
    """Save blended_levels() over every device of this process to OUT."""
    np.savez(out, **blended_levels())


if __name__ == "__main__":
    main(sys.argv[1])
