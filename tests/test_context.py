"""The auto-context rule is one function: the model, the separate step, tiled inference and
the diagnostics give the same finer-level input for the same coarser output; and the
context options: context dropout and per-level loss weights."""

import functools
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixed_batch, make_tiny_config

from autocontext_jax.config.schema import ConfigError, validate_config
from autocontext_jax.evaluation import diagnose
from autocontext_jax.inference.pyramid import pad_to_multiple, predict_pyramid, pyramid_volumes
from autocontext_jax.inference.tiling import TilingOptions, predict_level
from autocontext_jax.models import build_pyramid, context
from autocontext_jax.models.context import context_dropout_mask, context_probabilities, finer_input
from autocontext_jax.models.init import init_variables
from autocontext_jax.models.pyramid import AutoContextPyramid
from autocontext_jax.runtime import checkpointing, parallel
from autocontext_jax.training import phases
from autocontext_jax.training.losses import dice_loss, segmentation_loss
from autocontext_jax.training.state import create_train_state, make_optimizer
from autocontext_jax.training.step import jit_train_step, make_separate_train_step, make_train_step


class FinerInputs:
    """context.finer_input, recording (coarser probabilities, finer input) of every call."""

    def __init__(self):
        self.calls = []
        self.rule = context.finer_input

    def __call__(self, image, coarser_probs, dropped=None):
        result = self.rule(image, coarser_probs, dropped)
        # Traced for a compiled function, the values are recorded when it runs.
        jax.debug.callback(self.record, coarser_probs, result)
        return result

    def record(self, coarser_probs, result):
        """Keep one call's coarser probabilities and finer input."""
        self.calls.append((np.asarray(coarser_probs), np.asarray(result)))


@pytest.fixture
def spy(monkeypatch):
    """Every call of the rule, with its values, compiled or not."""
    recording = FinerInputs()
    monkeypatch.setattr(context, "finer_input", recording)
    return recording


@pytest.fixture
def recorder(spy):
    """Every call of the rule, concrete (nothing is compiled while it records)."""
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


@pytest.mark.slow
def test_the_separate_step_trains_level_2_on_the_models_finer_input(pyramid, spy):
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
    jax.effects_barrier()
    spy.calls.clear()  # the initialisation ran the model too

    jax.jit(functools.partial(model.apply, train=False))(variables, images)
    jax.effects_barrier()
    (_, model_input), *_ = spy.calls
    spy.calls.clear()
    # Compiled, as training runs it.
    step = jax.jit(
        make_separate_train_step(model, phases.make_run_optimizer(config), config, phase=1)
    )
    _, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0))
    jax.effects_barrier()
    ((_, step_input),) = spy.calls  # the rule ran once: level 2's input, from the frozen level 1
    # The same input, up to the order in which two compiled programs add.
    np.testing.assert_allclose(step_input, model_input, rtol=1e-6, atol=1e-7)

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


def test_a_dropped_example_gets_exactly_the_uniform_context_and_the_others_their_own():
    image = jax.random.normal(jax.random.key(0), (2, 4, 4, 4, 1))
    logits = jax.random.normal(jax.random.key(1), (2, 2, 2, 2, 3)) * 3
    probs = context_probabilities(logits)
    kept = finer_input(image, probs)
    mixed = finer_input(image, probs, dropped=jnp.array([True, False]))
    np.testing.assert_array_equal(mixed[0, ..., 1:], np.full((4, 4, 4, 3), 1 / 3, np.float32))
    np.testing.assert_array_equal(mixed[1], kept[1])
    np.testing.assert_array_equal(mixed[..., :1], kept[..., :1])  # the image is untouched


def test_the_dropout_mask_drops_each_example_with_its_probability():
    assert context_dropout_mask(jax.random.key(0), 4, 0.0) is None
    mask = np.asarray(context_dropout_mask(jax.random.key(0), 20_000, 0.3))
    assert mask.dtype == bool and abs(mask.mean() - 0.3) < 0.015


def _pyramid(rate):
    return AutoContextPyramid(
        num_levels=2, num_classes=3, width=2, num_poolings=1, context_dropout=rate
    )


def _inputs():
    images = [jax.random.normal(jax.random.key(s), (2, 8, 8, 8, 1)) for s in (1, 2)]
    targets = jax.nn.one_hot(jax.random.randint(jax.random.key(3), (2, 8, 8, 8), 0, 3), 3)
    return images, targets


@pytest.mark.slow
def test_context_dropout_acts_in_training_only_and_a_dropped_context_carries_nothing_back():
    images, targets = _inputs()
    variables = init_variables(_pyramid(0.0), 0)
    # Inference: the same function with or without dropout.
    plain, dropout = (jax.jit(_pyramid(r).apply)(variables, images) for r in (0.0, 0.5))
    for a, b in zip(plain, dropout, strict=True):
        np.testing.assert_array_equal(a, b)

    def level_1_gradient(rate):
        def level_2_loss(params):
            logits, _ = _pyramid(rate).apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"context": jax.random.key(7)},
            )
            return dice_loss(logits[1], targets)

        grads = jax.jit(jax.grad(level_2_loss))(variables["params"])["level_1"]
        return max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))

    assert level_1_gradient(0.0) > 1e-8
    # Every example dropped (the draw of key 7 at 0.999): level 2's loss no longer reaches level 1.
    assert level_1_gradient(0.999) == 0.0


def _step_metrics(config, times=1):
    model, optimizer, mesh = (
        build_pyramid(config),
        make_optimizer(config.train),
        parallel.make_mesh(),
    )
    step = jit_train_step(make_train_step(model, optimizer, config), mesh, model.conv_impl)
    batch = parallel.put_batch(fixed_batch(config), parallel.batch_sharded(mesh))
    results = []
    for _ in range(times):
        state = jax.device_put(create_train_state(model, optimizer, 0), parallel.replicated(mesh))
        _, metrics = step(state, batch, jax.random.key(0))
        results.append({k: float(v) for k, v in metrics.items()})
    return results


@pytest.mark.slow
def test_the_step_sums_the_weighted_level_losses_and_its_dropout_is_reproducible():
    config = make_tiny_config()
    config.pyramid.level_loss_weights = (0.25, 1.0)
    config.pyramid.context_dropout = 0.5
    first, again = _step_metrics(config, times=2)
    assert first == again  # the dropout's draws follow from the step's key
    assert first["loss"] == pytest.approx(
        0.25 * first["loss_level_1"] + first["loss_level_2"], rel=1e-6
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("context_dropout", 1.0),
        ("context_dropout", -0.1),
        ("level_loss_weights", (1.0,)),
        ("level_loss_weights", (1.0, -1.0)),
        ("level_loss_weights", (0.0, 0.0)),
        ("level_loss_weights", (1.0, float("nan"))),
    ],
)
def test_bad_context_options_are_refused_naming_the_field(tiny_config, field, value):
    tiny_config.pyramid[field] = value
    with pytest.raises(ConfigError, match=rf"config\.pyramid\.{field}="):
        validate_config(tiny_config, 1)


def _separate(steps, level_steps=()):
    config = make_tiny_config()
    config.pyramid.mode = "separate"
    config.train.steps = steps
    config.pyramid.level_steps = level_steps
    return config


def test_a_separate_run_may_extend_its_finest_phase_but_never_move_a_phase(tmp_path):
    assert phases.moved_phases(_separate(10, (4,)), _separate(20, (4,))) is None
    assert phases.moved_phases(_separate(10), _separate(10, (5,))) is None  # the same starts
    moved = phases.moved_phases(_separate(10), _separate(20))
    assert "start at steps [0, 5], this config's at [0, 10]" in moved
    assert "pyramid.level_steps=(5,)" in moved
    joint = make_tiny_config()
    joint.train.steps = 10
    assert phases.moved_phases(joint, make_tiny_config()) is None

    # The refusal comes before the new config replaces the run's.
    checkpointing.write_config(tmp_path, _separate(10))
    (tmp_path / checkpointing.CHECKPOINTS_DIR).mkdir()
    with pytest.raises(checkpointing.CheckpointError, match="config.json: the levels' phases"):
        checkpointing.write_config(tmp_path, _separate(20), refuse=phases.moved_phases)
    saved = checkpointing.read_run_config(tmp_path)
    assert saved.train.steps == 10
    checkpointing.write_config(tmp_path, _separate(20, (5,)), refuse=phases.moved_phases)
