"""The pure train step: it learns, donates its state, agrees over devices; the parameter average."""

import os
import pathlib
import subprocess
import sys

import jax
import multidevice_step
import numpy as np
import pytest
from conftest import fixed_batch
from jax.sharding import Mesh

from autocontext_jax.data.device_augment import augment_intensity
from autocontext_jax.models import build_pyramid
from autocontext_jax.runtime import parallel
from autocontext_jax.training.state import (
    create_train_state,
    ema_update,
    evaluation_variables,
    make_optimizer,
)
from autocontext_jax.training.step import jit_train_step, make_train_step

TESTS = pathlib.Path(__file__).parent


def _run_step_script(tmp_path, devices: int) -> dict:
    """multidevice_step.py's result with `devices` fake CPU devices, in a subprocess."""
    out = tmp_path / f"devices_{devices}.npz"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    subprocess.run(
        [sys.executable, str(TESTS / "multidevice_step.py"), str(out)], env=env, check=True
    )
    return dict(np.load(out))


@pytest.mark.slow
def test_one_and_eight_devices_agree_on_the_same_global_batch(tmp_path):
    # One device here, in this process; eight in a process of eight fake devices.
    one = multidevice_step.two_steps(Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,)))
    eight = _run_step_script(tmp_path, 8)
    assert int(one.pop("devices")) == 1 and int(eight.pop("devices")) == 8
    np.testing.assert_allclose(one["losses"], eight["losses"], rtol=1e-5, atol=1e-5)
    assert one.keys() == eight.keys()
    for key in one:
        np.testing.assert_allclose(one[key], eight[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def compiled_step():
    from conftest import make_tiny_config

    config = make_tiny_config()
    model = build_pyramid(config)
    optimizer = make_optimizer(config.train)
    mesh = parallel.make_mesh()
    step = jit_train_step(make_train_step(model, optimizer, config), mesh, model.conv_impl)
    return config, model, optimizer, mesh, step


@pytest.mark.slow
def test_the_step_learns_a_fixed_batch(compiled_step):
    config, model, optimizer, mesh, step = compiled_step
    state = jax.device_put(create_train_state(model, optimizer, 0), parallel.replicated(mesh))
    batch = parallel.put_batch(fixed_batch(config), parallel.batch_sharded(mesh))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
        assert float(metrics["loss"]) == pytest.approx(
            float(metrics["loss_level_1"]) + float(metrics["loss_level_2"]), rel=1e-6
        )
    assert int(state.step) == 8
    assert losses[-1] < losses[0] - 0.05


def test_the_step_donates_the_state(compiled_step):
    config, model, optimizer, mesh, step = compiled_step
    state = jax.device_put(create_train_state(model, optimizer, 0), parallel.replicated(mesh))
    batch = parallel.put_batch(fixed_batch(config), parallel.batch_sharded(mesh))
    old_leaf = jax.tree.leaves(state.params)[0]
    step(state, batch, jax.random.key(0))
    assert old_leaf.is_deleted()


def test_parameter_average_follows_the_parameters_with_a_growing_memory():
    ema, params = {"w": jax.numpy.zeros(3)}, {"w": jax.numpy.ones(3)}
    first = ema_update(ema, params, jax.numpy.asarray(0), 0.99)
    np.testing.assert_allclose(first["w"], 0.9)  # rate (1+0)/(10+0) = 0.1 at step 0
    late = ema_update(ema, params, jax.numpy.asarray(10_000), 0.99)
    np.testing.assert_allclose(late["w"], 0.01, rtol=1e-5)  # the configured decay


def test_evaluation_uses_the_average_only_when_configured(compiled_step):
    config, model, optimizer, mesh, step = compiled_step
    state = create_train_state(model, optimizer, 0)
    state = state.replace(ema_params=jax.tree.map(jax.numpy.zeros_like, state.params))
    config.train.ema_decay = 0.99
    assert evaluation_variables(state, config.train)["params"] is state.ema_params
    config.train.ema_decay = 0.0
    assert evaluation_variables(state, config.train)["params"] is state.params


def test_intensity_augmentation_is_off_at_probability_zero_and_random_otherwise(tiny_config):
    image = jax.numpy.ones((4, 2, 8, 8, 8, 1))
    tiny_config.augment.probability = 0.0
    same = augment_intensity(jax.random.key(0), image, tiny_config.augment)
    np.testing.assert_array_equal(same, image)
    tiny_config.augment.probability = 1.0
    changed = np.asarray(augment_intensity(jax.random.key(0), image, tiny_config.augment))
    assert not np.allclose(changed, 1.0)
    # Scale and shift are per example and shared by its levels: the means differ by noise only.
    means = changed.mean(axis=(2, 3, 4, 5))
    np.testing.assert_allclose(means[:, 0], means[:, 1], atol=0.02)
