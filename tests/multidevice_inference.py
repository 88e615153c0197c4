"""Tiled inference of a tiny pyramid on a fixed volume, saved for comparison.

Used by test_tiling.py in a subprocess, so that XLA_FLAGS can fake several CPU devices.
    python tests/multidevice_inference.py OUT.npz
"""

import sys

import jax
import numpy as np
from conftest import make_tiny_config

from autocontext_jax import inference
from autocontext_jax.models import build_pyramid


def main(out: str) -> None:
    """Both levels' blended softmax over all visible devices, 3 tiles per device and batch."""
    config = make_tiny_config()
    config.model.width = 4
    config.model.num_poolings = 2
    model = build_pyramid(config)
    variables = model.init(jax.random.key(0), [np.zeros((1, 4, 4, 4, 1), np.float32)] * 2)
    image = np.random.default_rng(0).normal(size=(45, 30, 21)).astype(np.float32)
    # 2 tiles at level 1 and 45 at level 2, in batches of 3 x devices: last ones partly filled.
    options = inference.TilingOptions(tile_size=8, overlap=0.5, tiles_per_batch=3)
    levels = inference.predict_pyramid(model, variables, image, -1.0, options)
    np.savez(out, devices=jax.device_count(), level_1=levels[0], level_2=levels[1])


if __name__ == "__main__":
    main(sys.argv[1])
