"""The separately trained pyramid: level 1 first, then frozen while level 2 trains."""

import jax
import numpy as np
import optax
import pytest
from conftest import make_tiny_config

from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.config.schema import ConfigError, validate_config
from autocontext_jax.models import build_pyramid
from autocontext_jax.runtime import checkpointing
from autocontext_jax.training import phases
from autocontext_jax.training.state import abstract_train_state, create_train_state


def _separate_config(data_dir, steps=4, level_steps=(2,)):
    config = make_tiny_config(data_dir)
    config.eval.at_end = False
    config.pyramid.mode = "separate"
    config.pyramid.level_steps = level_steps
    config.train.steps = steps
    config.train.checkpoint_every = 2
    config.train.keep_checkpoints = 5
    return config


def _restore(workdir, config, step):
    """The whole train state saved at `step`, in the structure training uses."""
    model = build_pyramid(config)
    optimizer = phases.make_run_optimizer(config)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = abstract_train_state(model, optimizer, config.seed, sharding)
    manager = checkpointing.make_manager(workdir, config)
    args = checkpointing.ocp.args.Composite(state=checkpointing.ocp.args.StandardRestore(target))
    state = manager.restore(step, args=args).state
    manager.close()
    return state


def _leaves(tree, level):
    """{path: array} of the leaves of `tree` that belong to pyramid `level`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in flat
        if f"'level_{level}'" in jax.tree_util.keystr(path)
    }


def _assert_equal(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _differs(a, b):
    return any(not np.array_equal(a[key], b[key]) for key in a)


def test_phases_split_the_steps_between_the_levels(tiny_config):
    tiny_config.pyramid.mode = "separate"
    tiny_config.pyramid.levels = 3
    tiny_config.train.steps = 10
    assert phases.phase_bounds(tiny_config) == [(0, 3), (3, 6), (6, 10)]
    tiny_config.pyramid.level_steps = (5, 1)
    assert phases.phase_bounds(tiny_config) == [(0, 5), (5, 6), (6, 10)]
    bounds = phases.phase_bounds(tiny_config)
    indices = [int(phases.phase_index(np.int32(s), bounds)) for s in (0, 4, 5, 6, 9)]
    assert indices == [0, 0, 1, 2, 2]
    # The host picks the compiled step of a step number the same way.
    assert [phases.phase_of(tiny_config, s) for s in (0, 4, 5, 6, 9)] == indices
    # Each phase warms up and decays over its own length, as a run of its own.
    tiny_config.train.warmup_steps = 1
    rates = [float(phases.phase_learning_rate(tiny_config.train, bounds, s)) for s in (0, 1, 5, 6)]
    peak = tiny_config.train.learning_rate
    assert rates[0] == 0 and rates[1] == pytest.approx(peak)
    assert rates[2] == pytest.approx(peak) and rates[3] == 0


@pytest.mark.parametrize("level_steps", [(0,), (4,), (1, 1), (1.5,)])
def test_bad_level_steps_are_refused(tiny_config, level_steps):
    tiny_config.pyramid.mode = "separate"
    tiny_config.pyramid.level_steps = level_steps
    with pytest.raises(ConfigError, match=r"config\.pyramid\.level_steps="):
        validate_config(tiny_config, 1)


def test_a_frozen_level_gets_neither_updates_nor_new_moments():
    params = {"level_1": {"w": np.ones(3, np.float32)}, "level_2": {"w": np.ones(2, np.float32)}}
    config = make_tiny_config()
    optimizer = phases.separate_optimizer(config.train, [(0, 2), (2, 4)])
    state = optimizer.init(params)
    grads = jax.tree.map(np.ones_like, params)
    for step in range(4):
        updates, new_state = optimizer.update(grads, state, params)
        new_params = optax.apply_updates(params, updates)
        frozen, trained = ("level_2", "level_1") if step < 2 else ("level_1", "level_2")
        _assert_equal(_leaves(new_params, frozen[-1]), _leaves(params, frozen[-1]))
        _assert_equal(_leaves(new_state, frozen[-1]), _leaves(state, frozen[-1]))
        if step > 0 and step != 2:  # the first step of a warm-up has learning rate 0
            assert _differs(_leaves(new_params, trained[-1]), _leaves(params, trained[-1]))
        params, state = new_params, new_state


@pytest.mark.slow
def test_level_1_is_frozen_during_level_2s_phase(tiny_phantom, tmp_path):
    config = _separate_config(tiny_phantom, steps=4, level_steps=(2,))
    train_and_evaluate(config, str(tmp_path / "run"))
    initial = create_train_state(build_pyramid(config), phases.make_run_optimizer(config), 0)
    end_of_phase_1 = _restore(tmp_path / "run", config, 2)
    end = _restore(tmp_path / "run", config, 4)
    for field in ("params", "batch_stats", "ema_params", "opt_state"):
        before, after = getattr(end_of_phase_1, field), getattr(end, field)
        # Level 1 learned in its phase and not a bit after it.
        assert _differs(_leaves(getattr(initial, field), 1), _leaves(before, 1)), field
        _assert_equal(_leaves(before, 1), _leaves(after, 1))
        # Level 2 did not move in level 1's phase, and learned in its own.
        _assert_equal(_leaves(getattr(initial, field), 2), _leaves(before, 2))
        assert _differs(_leaves(before, 2), _leaves(after, 2)), field
    # A resume that would move level 2's phase (to start at step 3) is refused.
    config.pyramid.level_steps = ()
    config.train.steps = 6
    with pytest.raises(checkpointing.CheckpointError, match=r"phases .* start at steps \[0, 2\]"):
        train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_a_resume_across_the_phase_boundary_equals_an_uninterrupted_run(tiny_phantom, tmp_path):
    # A constant schedule: train.steps, changed below to stop the run early, then moves
    # only the end of the run, not its learning rates.
    config = _separate_config(tiny_phantom, steps=5, level_steps=(2,))
    config.train.schedule = "constant"
    train_and_evaluate(config, str(tmp_path / "straight"))
    config.train.steps = 3  # stops one step into level 2's phase
    train_and_evaluate(config, str(tmp_path / "resumed"))
    config.train.steps = 5
    train_and_evaluate(config, str(tmp_path / "resumed"))
    straight = _restore(tmp_path / "straight", config, 5)
    resumed = _restore(tmp_path / "resumed", config, 5)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
