"""The train step, data parallelism, checkpoints and the command line."""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import fixed_batch

from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.config.schema import (
    fit_to_run_length,
    validate_config,
)
from autocontext_jax.data.device_augment import augment_intensity
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.pipeline import train_batches
from autocontext_jax.models import build_pyramid
from autocontext_jax.runtime import checkpointing, environment, parallel, preemption, workdir_lock
from autocontext_jax.training import loop
from autocontext_jax.training.state import (
    create_train_state,
    ema_update,
    evaluation_variables,
    make_optimizer,
)
from autocontext_jax.training.step import jit_train_step, make_train_step

TESTS = pathlib.Path(__file__).parent


def _run_step_script(tmp_path, devices: int) -> dict:
    out = tmp_path / f"devices_{devices}.npz"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    subprocess.run(
        [sys.executable, str(TESTS / "multidevice_step.py"), str(out)], env=env, check=True
    )
    return dict(np.load(out))


def test_one_and_eight_devices_agree_on_the_same_global_batch(tmp_path):
    one, eight = _run_step_script(tmp_path, 1), _run_step_script(tmp_path, 8)
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
    step = jit_train_step(make_train_step(model, optimizer, config), mesh)
    return config, model, optimizer, mesh, step


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


def _run_main(config_name: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m autocontext_jax.main --config configs/NAME.py ARGS...`, output captured."""
    config = str(TESTS.parent / "configs" / f"{config_name}.py")
    command = [sys.executable, "-m", "autocontext_jax.main", "--config", config, *args]
    return subprocess.run(command, capture_output=True, text=True)


def test_command_line_refuses_a_bad_config_before_doing_anything(tmp_path):
    result = _run_main(
        "default", "--workdir", str(tmp_path / "run"), "--config.pyramid.mode=sideways"
    )
    assert result.returncode != 0
    assert "config.pyramid.mode='sideways'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_paper_dry_run_prints_the_parameter_counts():
    result = _run_main("paper", "--dry_run")
    assert result.returncode == 0, result.stderr
    assert "level 1: downsample x4, 1 input channel, 19,071,784 parameters (19.07 M)" in (
        result.stdout
    )
    # Level 2 adds K=8 context channels to its first convolution: 8 * 27 * 32 weights.
    assert f"level 2: downsample x2, 9 input channels, {19_071_784 + 8 * 27 * 32:,}" in (
        result.stdout
    )


def _params(workdir):
    config_path = pathlib.Path(workdir) / "config.json"
    saved = json.loads(config_path.read_text())
    manager = checkpointing.make_manager(workdir, _config_from(saved))
    step = manager.latest_step()
    args = checkpointing.ocp.args.Composite(state=checkpointing.ocp.args.StandardRestore())
    restored = manager.restore(step, args=args).state
    manager.close()
    return step, restored


def _config_from(saved):
    import ml_collections

    return ml_collections.ConfigDict(saved)


def test_resume_continues_exactly_where_the_run_stopped(tiny_phantom, tmp_path):
    from conftest import make_tiny_config

    config = make_tiny_config(tiny_phantom)
    config.eval.at_end = False
    config.train.steps = 4
    train_and_evaluate(config, str(tmp_path / "straight"))

    config.train.steps = 2
    train_and_evaluate(config, str(tmp_path / "resumed"))
    assert _params(tmp_path / "resumed")[0] == 2
    # The input pipeline's state after step 2's batch is saved beside the model.
    manager = checkpointing.make_manager(tmp_path / "resumed", config)
    saved = checkpointing.restore_pipeline_state(manager, 2)
    manager.close()
    assert saved["next_step"] == 2 and saved["first_step"] == 0 and saved["grain"] is not None
    config.train.steps = 4
    result = train_and_evaluate(config, str(tmp_path / "resumed"))
    assert result["step"] == 4

    step_a, straight = _params(tmp_path / "straight")
    step_b, resumed = _params(tmp_path / "resumed")
    assert step_a == step_b == 4
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert checkpoints == ["2", "4"]
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]


@pytest.mark.slow
def test_a_resumed_run_with_the_warp_on_the_device_draws_the_same_batches(tiny_phantom, tmp_path):
    from conftest import make_tiny_config

    config = make_tiny_config(tiny_phantom)
    config.eval.at_end = False
    config.augment.device = "device"
    for part in ("rotation", "scale", "translation", "elastic"):
        config.augment[f"{part}_probability"] = 0.5
    (tmp_path / "data").mkdir()
    sampler, _ = loop.prepare_data(config, tmp_path / "data")
    assert sampler.device_box is not None
    straight_batches = list(train_batches(sampler, config, 0))
    assert "image_box" in straight_batches[0] and len(straight_batches) == 4
    for a, b in zip(straight_batches[2:], train_batches(sampler, config, 2), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    train_and_evaluate(config, str(tmp_path / "straight"))
    config.train.steps = 2
    train_and_evaluate(config, str(tmp_path / "resumed"))
    config.train.steps = 4
    assert train_and_evaluate(config, str(tmp_path / "resumed"))["step"] == 4
    (_, straight), (_, resumed) = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_refuses_a_changed_model(tiny_phantom, tmp_path):
    from conftest import make_tiny_config

    config = make_tiny_config(tiny_phantom)
    config.eval.at_end = False
    config.train.steps = 2
    train_and_evaluate(config, str(tmp_path))
    config.model.width = 4
    with pytest.raises(ValueError, match=r"config\.model\.width: 2 -> 4"):
        train_and_evaluate(config, str(tmp_path))


def test_a_run_keeps_the_last_checkpoints_and_reports_dice(tiny_phantom, tmp_path):
    from conftest import make_tiny_config

    config = make_tiny_config(tiny_phantom)
    config.train.steps = 6
    config.train.checkpoint_every = 1
    config.train.keep_checkpoints = 2
    result = train_and_evaluate(config, str(tmp_path))
    checkpoints = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == [5, 6]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["width"] == 2 and saved["data"]["dir"] == str(tiny_phantom)
    dice = result["dice"]["dice"]
    assert set(dice) == {"level_1", "level_2"}
    assert np.asarray(dice["level_2"]).shape == (1, 7)
    assert np.asarray(result["dice"]["hd95"]["level_2"]).shape == (1, 7)
    table = (tmp_path / "eval_summary.md").read_text()
    assert "| Dice (%) | artery | portal_vein | liver |" in table
    assert "| HD95 (mm) | artery |" in table and "| NSD@2mm (%) | artery |" in table
    cases = json.loads((tmp_path / "eval_cases.json").read_text())
    assert cases["dice"] == dice and cases["case_ids"] == result["dice"]["case_ids"]


def test_a_diverging_run_stops_before_saving_and_keeps_the_last_finite_checkpoint(
    tiny_phantom, tmp_path
):
    from conftest import make_tiny_config

    config = make_tiny_config(tiny_phantom)
    config.eval.at_end = False
    config.train.steps = 12
    config.train.checkpoint_every = 2
    config.train.log_every = 10
    config.train.keep_checkpoints = 3
    config.train.learning_rate = 1e6  # the tiny model goes non-finite at step 3
    with pytest.raises(FloatingPointError, match=r"non-finite at step \d+") as caught:
        train_and_evaluate(config, str(tmp_path))
    first_bad = int(re.search(r"non-finite at step (\d+)", str(caught.value))[1])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert saved and max(saved) < first_bad
    assert f"checkpoint of step {max(saved)}" in str(caught.value)
    step, restored = _params(tmp_path)
    assert step == max(saved)
    for leaf in jax.tree.leaves(restored):
        assert np.all(np.isfinite(np.asarray(leaf)))


def _visible_scalars(events) -> list[tuple[str, int, float]]:
    """The scalars TensorBoard shows: a session START at step p hides older ones >= p."""
    scalars = []
    for event in events:
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            scalars = [(tag, step, value) for tag, step, value in scalars if step < event.step]
        scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return scalars


def test_a_resumed_run_logs_every_step_once(tiny_phantom, tmp_path):
    from conftest import make_tiny_config, read_events

    config = make_tiny_config(tiny_phantom)
    config.eval.at_end = False
    config.train.log_every = 1
    config.train.steps = 3
    train_and_evaluate(config, str(tmp_path))
    # As if killed after logging step 3, before its checkpoint was committed.
    shutil.rmtree(tmp_path / "checkpoints" / "3")
    config.train.steps = 4
    train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # One record of the software and devices per train call that trains, from its first
    # step; calling a finished run again trains nothing and adds none.
    train_and_evaluate(config, str(tmp_path))
    assert [r["start_step"] for r in environment.read_environments(tmp_path)] == [0, 2]
    losses = [
        (s, v)
        for (tag, s, v) in _visible_scalars(read_events(tmp_path / "tensorboard"))
        if tag == "loss/total"
    ]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    for (_, value), record in zip(losses, records, strict=True):
        assert value == pytest.approx(record["loss"])


def test_the_phantom_is_generated_only_into_the_default_folder_or_when_asked(tmp_path, monkeypatch):
    from conftest import load_config, make_tiny_config

    monkeypatch.chdir(tmp_path)
    config = make_tiny_config("data/phantm")  # a typo of the default folder
    config.data.phantom_cases = 1
    with pytest.raises(DatasetError, match=r"data/phantm: config\.data\.dir does not exist"):
        loop.ensure_dataset(config.data)
    assert not (tmp_path / "data").exists()

    config.data.dir = load_config("default").data.dir
    loop.ensure_dataset(config.data)
    assert len(list((tmp_path / "data" / "phantom" / "labelsTr").iterdir())) == 1

    config.data.dir = "elsewhere"
    config.data.generate_phantom = True
    loop.ensure_dataset(config.data)
    assert len(list((tmp_path / "elsewhere" / "labelsTr").iterdir())) == 1


def _command(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS...` from the repository root, output captured."""
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=TESTS.parent, timeout=300)


# `python -m autocontext_jax.main` (how users launch training) and `autocontext preprocess`.
ENTRY_POINTS = [["autocontext_jax.main"], ["autocontext_jax", "preprocess"]]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "configs/default.py", "--config.train.stepz=3"], 'Did you mean "steps"'),
        (["--config", "configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
    ],
)
def test_flag_errors_are_one_line_without_a_traceback(entry, args, expected):
    result = _command(*entry, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_exits_with_zero(entry):
    result = _command(*entry, "--help")
    assert result.returncode == 0, result.stderr
    assert "--helpfull" in result.stdout


@pytest.mark.parametrize("case", ["missing_data_dir", "all_cases_held_out", "changed_shapes"])
def test_training_setup_errors_are_one_line_without_a_traceback(case, tiny_phantom, tmp_path):
    from conftest import load_config

    workdir = tmp_path / "run"
    args = ["--config", "configs/default.py", "--workdir", str(workdir)]
    if case == "missing_data_dir":
        args.append(f"--config.data.dir={tmp_path / 'typo'}")
        expected = f"Bad input: {tmp_path / 'typo'}: config.data.dir does not exist"
    elif case == "all_cases_held_out":
        args += [f"--config.data.dir={tiny_phantom}", "--config.data.num_val_cases=5"]
        expected = "Bad input: config.data.num_val_cases=5 must leave at least one"
    else:
        saved = load_config("default")
        saved.model.width = 4
        checkpointing.write_config(workdir, saved)
        (workdir / checkpointing.CHECKPOINTS_DIR).mkdir()
        args.append(f"--config.data.dir={tiny_phantom}")
        expected = "config.model.width: 4 -> 8"
    result = _command("autocontext_jax.main", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr


def test_a_short_run_fits_its_warmup_and_intervals_and_says_so():
    from conftest import load_config

    _, notes = fit_to_run_length(load_config("default"))
    assert notes == []
    short = load_config("default")
    short.train.steps = 4
    fitted, notes = fit_to_run_length(short)
    assert (fitted.train.warmup_steps, fitted.train.checkpoint_every) == (3, 4)
    assert fitted.train.log_every == 4 and short.train.warmup_steps == 20  # a copy
    assert fitted.eval.every == 4  # validated once, at the last step
    assert len(notes) == 4 and "config.train.warmup_steps=20" in notes[0]
    assert notes[3] == "config.eval.every=300 exceeds train.steps=4: using 4"
    validate_config(fitted, 1)
    result = _command(
        "autocontext_jax.main",
        "--config",
        "configs/default.py",
        "--config.train.steps=4",
        "--dry_run",
    )
    assert result.returncode == 0, result.stderr
    assert "config.train.warmup_steps=20 is not shorter than train.steps=4: using 3" in (
        result.stdout
    )


def _tiny_train_command(data_dir, workdir, *overrides: str) -> list[str]:
    """The train command with make_tiny_config's sizes, without the end-of-run evaluation."""
    from conftest import tiny_train_command

    return tiny_train_command(data_dir, workdir, "--config.eval.at_end=False", *overrides)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_stopped_at_and_the_resumed_run_matches(tiny_phantom, tmp_path):
    overrides = [
        "--config.train.steps=300",
        "--config.train.checkpoint_every=100",
        "--config.train.log_every=1",
    ]
    command = _tiny_train_command(tiny_phantom, tmp_path / "stopped", *overrides)
    process = subprocess.Popen(
        command, cwd=TESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = process.communicate(timeout=120)
    took = time.monotonic() - sent
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    stopped = int(re.search(r"stopped at step (\d+) on SIGTERM", err)[1])
    assert 5 <= stopped < 300
    assert (tmp_path / "stopped" / "checkpoints" / str(stopped)).is_dir()
    assert shlex.split(err.split("Resume with: ")[1].strip().splitlines()[0]) == command
    assert took < 30, took

    resumed = subprocess.run(command, cwd=TESTS.parent, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from the checkpoint of step {stopped}" in resumed.stdout
    straight_command = _tiny_train_command(tiny_phantom, tmp_path / "straight", *overrides)
    straight = subprocess.run(straight_command, cwd=TESTS.parent, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    step_a, a = _params(tmp_path / "straight")
    step_b, b = _params(tmp_path / "stopped")
    assert step_a == step_b == 300
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_ask_the_loop_to_stop_and_leave_the_old_handlers_in_place(number):
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    with preemption.StopSignals() as stop:
        assert not stop.stop_at(1)
        os.kill(os.getpid(), number)
        assert stop.stop_at(2) and stop.received == number
        # A second signal while the run saves interrupts at once.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), number)
    assert {number: signal.getsignal(number) for number in before} == before
    assert preemption.StoppedBySignalError(2, number, "ckpt").exit_code == 128 + number


def test_a_second_run_in_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with workdir_lock.hold(workdir):
        result = _command(
            "autocontext_jax.main",
            "--config",
            "configs/default.py",
            f"--workdir={workdir}",
            f"--config.data.dir={tmp_path / 'data'}",
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"PID {os.getpid()} on host {socket.gethostname()}" in result.stderr
    assert not (workdir / "config.json").exists()


def test_the_lock_of_a_live_run_refuses_and_a_dead_runs_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from autocontext_jax.training import workdir_lock\n"
            "lock = workdir_lock.hold(sys.argv[1])\n"
            "lock.__enter__()\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f"PID {holder.pid} on host"):
            with workdir_lock.hold(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # Killed, it could not clean up: its record stays, its lock went with it.
    with workdir_lock.hold(tmp_path) as note:
        assert f"PID {holder.pid} on host {socket.gethostname()}" in note
        assert "no longer running" in note
        record = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()
    # Released cleanly, it is free and empty: the next run takes it without a note.
    with workdir_lock.hold(tmp_path) as note:
        assert note is None
