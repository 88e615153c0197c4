"""Sliding-window pyramid inference: tiling, exact blending, agreement with a full pass."""

import os
import pathlib
import subprocess
import sys

import jax
import multidevice_inference
import numpy as np
import pytest
from jax.sharding import Mesh
from scipy import ndimage

from autocontext_jax import inference
from autocontext_jax.inference import tiling, upsample
from autocontext_jax.inference.pyramid import pad_to_multiple, pyramid_volumes
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.context import upsample_and_crop
from autocontext_jax.models.init import init_variables
from autocontext_jax.runtime import parallel

TESTS = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def pyramid():
    from conftest import make_tiny_config

    config = make_tiny_config()
    config.model.width = 4
    config.model.num_poolings = 2
    model = build_pyramid(config)
    variables = jax.device_get(init_variables(model, 0))
    # Non-trivial BatchNorm statistics, so inference must use the running averages.
    rng = np.random.default_rng(1)
    variables["batch_stats"] = jax.tree.map(
        lambda leaf: leaf + rng.uniform(0.1, 0.5, leaf.shape).astype(np.float32),
        variables["batch_stats"],
    )
    return model, variables


def test_tile_starts_cover_the_grid_with_even_starts():
    for size, tile, overlap in [(96, 32, 0.5), (100, 24, 0.25), (64, 64, 0.5), (18, 32, 0.5)]:
        starts = tiling.tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == max(size - tile, 0)
        assert all(s % 2 == 0 for s in starts)
        steps = np.diff(starts)
        assert np.all(steps > 0) and np.all(steps <= tile * (1 - overlap) + 2)
    # The corners of a level: every combination of the axes' starts; a short axis, one tile.
    corners = tiling.tile_corners((16, 8, 4), 8, 0.5)
    assert corners == [(0, 0, 0), (4, 0, 0), (8, 0, 0)]


@pytest.mark.slow
def test_one_tile_per_level_equals_a_full_pass_of_the_level_padded_to_the_tile(pyramid):
    model, variables = pyramid
    tile = 32
    # Level 2's grid is one tile; level 1's, half as large, is padded up to one.
    image = np.random.default_rng(0).normal(size=(62, 60, 50)).astype(np.float32)
    options = inference.TilingOptions(tile_size=tile, weighting="constant")
    tiled = inference.predict_pyramid(model, variables, image, -5.0, options)

    coarse, fine = (v[0] for v in pyramid_volumes(pad_to_multiple(image, 16, -5.0), 2))
    assert fine.shape[:3] == (tile,) * 3 and coarse.shape[:3] == (tile // 2,) * 3
    net = model.level_network()
    padded = np.pad(coarse, [(0, tile // 2)] * 3 + [(0, 0)], constant_values=-5.0)
    logits = net.apply(tiling.level_variables(variables, 1), padded[None], train=False)
    level_1 = np.asarray(jax.nn.softmax(logits[0], axis=-1))[: tile // 2, : tile // 2, : tile // 2]
    context = upsample_and_crop(level_1[None], fine.shape[:3])
    x = np.concatenate([fine[None], np.asarray(context)], axis=-1)
    logits = net.apply(tiling.level_variables(variables, 2), x, train=False)
    level_2 = np.asarray(jax.nn.softmax(logits[0], axis=-1))
    for level_tiled, expected in zip(tiled, (level_1, level_2), strict=True):
        assert level_tiled.shape == expected.shape
        np.testing.assert_allclose(level_tiled, expected, atol=1e-5)


def _constant_output(variables, logits):
    """The pyramid's variables with every weight zero and final biases `logits`."""
    params = jax.tree.map(np.zeros_like, variables["params"])
    for level in params.values():
        level["Conv_0"]["bias"] = np.asarray(logits, np.float32)
    return {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.mark.slow
@pytest.mark.parametrize("weighting,mirror", [("gaussian", False), ("constant", True)])
def test_blending_is_normalised_exactly_up_to_the_borders(pyramid, weighting, mirror):
    model, variables = pyramid
    logits = np.linspace(-1.0, 2.0, model.num_classes)
    constant = _constant_output(variables, logits)
    image = np.random.default_rng(0).normal(size=(50, 37, 21)).astype(np.float32)
    # Small tiles: many overlapping tiles per level, the last ones flush with the far end.
    options = inference.TilingOptions(
        tile_size=8, overlap=0.4, weighting=weighting, mirror=mirror, tiles_per_batch=3
    )
    expected = np.asarray(jax.nn.softmax(logits))
    for level in inference.predict_pyramid(model, constant, image, 0.0, options):
        np.testing.assert_allclose(level, np.broadcast_to(expected, level.shape), rtol=1e-5)


@pytest.mark.slow
def test_mirroring_keeps_a_flip_equivariant_input_symmetric(pyramid):
    model, variables = pyramid
    rng = np.random.default_rng(2)
    image = rng.normal(size=(32, 32, 32)).astype(np.float32)
    image = image + image[::-1]  # symmetric about the centre of the first axis
    options = inference.TilingOptions(tile_size=16, overlap=0.5, mirror=True)
    for level in inference.predict_pyramid(model, variables, image, 0.0, options):
        np.testing.assert_allclose(level, level[::-1], atol=1e-5)


def test_upsampling_slab_by_slab_equals_one_whole_resize(monkeypatch):
    monkeypatch.setattr(upsample, "SLAB_VALUES", 3 * 22 * 19 * 4)
    rng = np.random.default_rng(0)
    probs = jax.nn.softmax(rng.normal(size=(11, 6, 5, 4)) * 3, axis=-1)
    probs = np.asarray(probs, np.float32)
    native = (41, 22, 19)  # the coarse grid covers a padded (44, 24, 20)
    whole = jax.image.resize(probs, (44, 24, 20, 4), "trilinear")[:41, :22, :19]
    labels = inference.upsample_to_native(probs, 4, native)
    np.testing.assert_array_equal(labels, np.argmax(np.asarray(whole), axis=-1))
    soft = inference.upsample_to_native(probs, 4, native, labels_only=False)
    assert soft.dtype == np.float16
    np.testing.assert_allclose(soft, whole, atol=1e-3)


def test_upsampling_onto_another_grid_interpolates_the_probabilities_once(monkeypatch):
    # The scan's own grid, finer along x and coarser along y than the native grid.
    monkeypatch.setattr(upsample, "SLAB_VALUES", 4 * 15 * 19 * 4)
    rng = np.random.default_rng(1)
    probs = jax.nn.softmax(rng.normal(size=(11, 6, 5, 4)) * 3, axis=-1)
    probs = np.asarray(probs, np.float32)
    native, grid, factor = (41, 22, 19), (57, 15, 19), 4
    scale = np.asarray(native) / np.asarray(grid) / factor
    expected = np.stack(
        [
            ndimage.affine_transform(
                probs[..., k], scale, 0.5 * scale - 0.5, output_shape=grid, order=1, mode="nearest"
            )
            for k in range(4)
        ],
        axis=-1,
    )
    soft = inference.upsample_to_native(probs, factor, native, False, grid_shape=grid)
    np.testing.assert_allclose(soft, expected, atol=1e-3)
    labels = inference.upsample_to_native(probs, factor, native, grid_shape=grid)
    assert labels.shape == grid and labels.dtype == np.uint8
    # Argmax of the interpolated probabilities, up to float32 near-ties.
    assert (labels == np.argmax(expected, axis=-1)).mean() > 0.999


def test_batches_are_split_over_the_mesh(pyramid):
    model, variables = pyramid
    mesh = parallel.make_mesh()
    predictor = tiling.make_tile_predictor(model, (8, 8, 8), "gaussian", False, False, mesh)
    images = np.zeros((2 * mesh.size, 8, 8, 8, 1), np.float32)
    out = predictor(tiling.level_variables(variables, 1), images, None)
    assert out.shape == (2 * mesh.size, 8, 8, 8, model.num_classes)
    assert out.sharding.is_equivalent_to(parallel.batch_sharded(mesh), out.ndim)


def _run_inference_script(tmp_path, devices: int) -> dict:
    """multidevice_inference.py's levels with `devices` fake CPU devices, in a subprocess."""
    out = tmp_path / f"devices_{devices}.npz"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    script = TESTS / "multidevice_inference.py"
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True)
    return dict(np.load(out))


@pytest.mark.slow
def test_one_and_four_devices_blend_the_same_probabilities(tmp_path):
    # One device here, in this process; four in a process of four fake devices.
    one = multidevice_inference.blended_levels(
        Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
    )
    four = _run_inference_script(tmp_path, 4)
    assert int(one["devices"]) == 1 and int(four["devices"]) == 4
    for level in ("level_1", "level_2"):
        np.testing.assert_allclose(one[level], four[level], atol=1e-5)
