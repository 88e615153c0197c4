"""The auto-context rule is one function: the model, the separate step, tiled inference and
the diagnostics give the same finer-level input for the same coarser output."""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixed_batch, make_tiny_config

from autocontext_jax.evaluation import diagnose
from autocontext_jax.inference.pyramid import pad_to_multiple, predict_pyramid, pyramid_volumes
from autocontext_jax.inference.tiling import TilingOptions, predict_level
from autocontext_jax.models import build_pyramid, context
from autocontext_jax.runtime import parallel
from autocontext_jax.training import phases
from autocontext_jax.training.losses import segmentation_loss
from autocontext_jax.training.state import create_train_state
from autocontext_jax.training.step import make_separate_train_step


class FinerInputs:
    """context.finer_input, recording (coarser probabilities, finer input) of every call."""

    def __init__(self):
        self.calls = []
        self.rule = context.finer_input

    def __call__(self, image, coarser_probs, dropped=None):
        result = self.rule(image, coarser_probs, dropped)
        self.calls.append((np.asarray(coarser_probs), np.asarray(result)))
        return result


@pytest.fixture
def recorder(monkeypatch):
    """Every call of the rule, concrete (nothing is compiled while it records)."""
    spy = FinerInputs()
    monkeypatch.setattr(context, "finer_input", spy)
    with jax.disable_jit():
        yield spy


@pytest.fixture(scope="module")
def pyramid():
    """A two-level pyramid of the tiny config, and its initial variables."""
    config = make_tiny_config()
    model = build_pyramid(config)
    optimizer = phases.make_run_optimizer(config)
    state = create_train_state(model, optimizer, 0)
    return config, model, {"params": state.params, "batch_stats": state.batch_stats}


def _whole_volume(seed=0, edge=16):
    return np.random.default_rng(seed).normal(size=(edge, edge, edge)).astype(np.float32)


def test_the_model_and_tiled_inference_give_the_same_finer_input(pyramid, recorder):
    _, model, variables = pyramid
    volume = pad_to_multiple(_whole_volume(), model.padding_multiple, 0.0)
    volumes = pyramid_volumes(volume, model.num_levels)
    model.apply(variables, [jnp.asarray(v) for v in volumes], train=False)
    (model_probs, model_input), *_ = recorder.calls

    # Tiles of level 1's whole grid, weighted 1: level 1's blended softmax is its softmax,
    # the coarser output the model's level 2 took; level 2 is cut into 2 x 2 x 2 tiles.
    tile = volumes[0].shape[1]
    options = TilingOptions(tile_size=tile, overlap=0.0, weighting="constant")
    mesh = parallel.make_local_mesh()
    predict_pyramid(model, variables, volume, 0.0, options, mesh)
    corners = list(itertools.product(*[range(0, volumes[1].shape[1], tile)] * 3))
    assert len(recorder.calls) == 1 + len(corners)
    for corner, (tile_probs, tile_input) in zip(corners, recorder.calls[1:], strict=True):
        region = tuple(slice(c, c + tile) for c in corner)
        # The tile's context is the coarser output around the tile, with a one-voxel margin.
        half = tuple(slice(c // 2, c // 2 + tile // 2) for c in corner)
        inner = tile_probs[:, 1:-1, 1:-1, 1:-1]
        np.testing.assert_allclose(inner, model_probs[(slice(None), *half)], atol=1e-6)
        np.testing.assert_allclose(tile_input, model_input[(slice(None), *region)], atol=1e-6)


def test_the_diagnostics_chain_the_levels_as_inference_does(pyramid, recorder):
    _, model, variables = pyramid
    volume = pad_to_multiple(_whole_volume(seed=1), model.padding_multiple, 0.0)
    volumes = pyramid_volumes(volume, model.num_levels)
    options = TilingOptions(tile_size=volumes[0].shape[1], overlap=0.0, weighting="constant")
    mesh = parallel.make_local_mesh()
    inferred = predict_pyramid(model, variables, volume, 0.0, options, mesh)

    run = types.SimpleNamespace(model=model, plan=types.SimpleNamespace(pad_value=0.0))
    diagnosis = diagnose.Diagnosis(live_variables={}, options=options)
    coarser = diagnose.coarser_outputs(run, diagnosis, variables, volumes, options, mesh)
    np.testing.assert_array_equal(coarser[-1], inferred[0])
    # The finest level of the diagnostics (its `real` context) is predict_level on that output.
    recorder.calls.clear()
    finest = predict_level(
        model, variables_of(variables, 2), volumes[1][0], coarser[-1], 0.0, options, mesh
    )
    np.testing.assert_array_equal(finest, inferred[1])
    assert len(recorder.calls) == 8


def variables_of(variables, level):
    """The variables of one level, as the tiled predictor takes them."""
    name = f"level_{level}"
    return {"params": variables["params"][name], "batch_stats": variables["batch_stats"][name]}


def test_the_separate_step_trains_level_2_on_the_models_finer_input(pyramid, recorder):
    config, model, variables = pyramid
    config = config.copy_and_resolve_references()
    config.pyramid.mode = "separate"
    config.train.ema_decay = 0.0  # level 1 is frozen at its parameters, not an average
    config.augment.probability = 0.0  # the step sees the batch's images unchanged
    model = build_pyramid(config)
    batch = fixed_batch(config)
    images = [jnp.asarray(batch["image"][:, s]) for s in range(2)]

    state = create_train_state(model, phases.make_run_optimizer(config), 0)
    state = state.replace(params=variables["params"], ema_params=variables["params"])
    recorder.calls.clear()  # the initialisation ran the model too

    model.apply(variables, images, train=False)
    (_, model_input), *_ = recorder.calls
    recorder.calls.clear()
    step = make_separate_train_step(model, phases.make_run_optimizer(config), config, phase=1)
    _, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0))
    assert len(recorder.calls) == 1

    # Level 2 learns in training mode on the model's finer input: the same loss.
    logits, _ = model.level_network().apply(
        variables_of(variables, 2), jnp.asarray(model_input), train=True, mutable=["batch_stats"]
    )
    expected = segmentation_loss(
        config.loss.name, logits, jnp.asarray(batch["label"][:, 1]), config.loss.dice_background
    )
    np.testing.assert_allclose(metrics["loss_level_2"], expected, rtol=1e-6)


def test_the_rule_is_softmax_upsampled_cropped_and_concatenated():
    rng = np.random.default_rng(2)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, 4, 4, 4, 3))), axis=-1)
    image = jnp.asarray(rng.normal(size=(1, 6, 6, 6, 1)), jnp.float32)
    result = np.asarray(context.finer_input(image, probs))
    # Half-voxel trilinear x2 keeps each coarse value on the pair of fine voxels it covers
    # up to interpolation; the crop keeps the centre 6 of 8.
    up = np.asarray(jax.image.resize(probs, (1, 8, 8, 8, 3), "trilinear"))[:, 1:7, 1:7, 1:7]
    np.testing.assert_array_equal(result[..., :1], image)
    np.testing.assert_allclose(result[..., 1:], up, atol=1e-7)
    assert context.takes_context(2, "end_to_end") and not context.takes_context(2, "none")
    assert not context.takes_context(1, "end_to_end")
