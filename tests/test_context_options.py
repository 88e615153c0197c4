"""The pyramid's context options: context dropout and per-level loss weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixed_batch, make_tiny_config

from autocontext_jax.config.schema import ConfigError, validate_config
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.context import context_dropout_mask, context_probabilities, finer_input
from autocontext_jax.models.init import init_variables
from autocontext_jax.models.pyramid import AutoContextPyramid
from autocontext_jax.runtime import checkpointing, parallel
from autocontext_jax.training import phases
from autocontext_jax.training.losses import dice_loss
from autocontext_jax.training.state import create_train_state, make_optimizer
from autocontext_jax.training.step import jit_train_step, make_train_step


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
    step = jit_train_step(make_train_step(model, optimizer, config), mesh)
    batch = parallel.put_batch(fixed_batch(config), parallel.batch_sharded(mesh))
    results = []
    for _ in range(times):
        state = jax.device_put(create_train_state(model, optimizer, 0), parallel.replicated(mesh))
        _, metrics = step(state, batch, jax.random.key(0))
        results.append({k: float(v) for k, v in metrics.items()})
    return results


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
