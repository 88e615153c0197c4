"""benchmarks/monai_reference.py: MONAI's sliding windows compute what our tiled inference does.

The inference benchmark times the two against each other; these pin down that they run the
same function (weights copied, context, padding, blending) wherever the tile layouts agree.
Skipped without torch and monai (pip install torch==2.13.0 monai).
"""

import pathlib
import sys

import jax
import numpy as np
import pytest

from autocontext_jax import inference
from autocontext_jax.inference import tiling
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.init import abstract_variables
from autocontext_jax.runtime import parallel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import monai_reference  # noqa: E402
    from monai.data.utils import compute_importance_map  # noqa: E402
except ImportError:
    monai_reference = None

pytestmark = pytest.mark.skipif(
    monai_reference is None, reason="needs torch and monai (pip install torch==2.13.0 monai)"
)


@pytest.mark.parametrize("tile", [8, 48, 128])
def test_our_gaussian_is_monais_but_for_the_floor(tile):
    """sigma_scale 1/8 is our sigma; MONAI floors the 3D product at 1e-3, we each axis."""
    ours = np.einsum("i,j,k->ijk", *[tiling.tile_weight_1d(tile, "gaussian")] * 3)
    theirs = compute_importance_map(
        (tile,) * 3, mode="gaussian", sigma_scale=tiling.GAUSSIAN_SIGMA_FRACTION
    ).numpy()
    np.testing.assert_allclose(theirs, np.maximum(ours, 1e-3), rtol=1e-5)


def test_tile_counts_agree_where_the_starts_do_not():
    """Same number of tiles along an axis; ours spread evenly, MONAI's stepped, last flush."""
    ours, theirs = tiling.tile_starts(128, 48, 0.5), monai_reference.monai_starts(128, 48, 0.5)
    assert ours == [0, 20, 40, 60, 80]
    assert theirs == [0, 24, 48, 72, 80]
    assert monai_reference.starts_coincide(96, 48, 0.5)


def test_pyramid_agrees_tile_for_tile():
    """Every level's blended softmax under MONAI equals ours on a grid of the same tiles."""
    config = pytest.importorskip("conftest").make_tiny_config()
    model = build_pyramid(config)
    # Random values of the variables' shapes: no initialiser to compile. Positive variances
    # and non-trivial statistics come from with_random_statistics.
    rng = np.random.default_rng(1)
    shapes = abstract_variables(model)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    variables = monai_reference.with_random_statistics(variables, seed=0)
    options = inference.TilingOptions(tile_size=8, overlap=0.5)
    shape = monai_reference.aligned_shape(model, options.tile_size, options.overlap)
    # The finest level slides along the first axis; the coarsest level is padded to a tile.
    assert shape == (24, 16, 16)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    mesh = parallel.make_mesh()
    ours = inference.predict_pyramid(model, jax.device_put(variables), image, -3.0, options, mesh)
    nets = monai_reference.level_networks(variables, model.num_levels)
    theirs = monai_reference.predict_pyramid(nets, model, image, -3.0, options)
    assert theirs.corners == monai_reference.our_corners(model, shape, 8, 0.5)
    assert [len(level) for level in theirs.corners] == [1, 2]
    for mine, monai_probs in zip(ours, theirs.probabilities, strict=True):
        np.testing.assert_allclose(monai_reference.channels_last(monai_probs), mine, atol=1e-5)
