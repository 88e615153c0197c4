"""The training loop: exact resumes, kept checkpoints, divergence, logs, SIGTERM."""

import json
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.data.pipeline import train_batches
from autocontext_jax.runtime import checkpointing, environment
from autocontext_jax.training import loop

TESTS = pathlib.Path(__file__).parent


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_refuses_a_changed_model(tiny_phantom, tmp_path):
    from conftest import make_tiny_config

    config = make_tiny_config(tiny_phantom)
    config.eval.at_end = False
    config.train.steps = 2
    train_and_evaluate(config, str(tmp_path))
    config.model.width = 4
    with pytest.raises(ValueError, match=r"config\.model\.width: 2 -> 4"):
        train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _tiny_train_command(data_dir, workdir, *overrides: str) -> list[str]:
    """The train command with make_tiny_config's sizes, without the end-of-run evaluation."""
    from conftest import tiny_train_command

    return tiny_train_command(data_dir, workdir, "--config.eval.at_end=False", *overrides)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_stopped_at_and_the_resumed_run_matches(tiny_phantom, tmp_path):
    from conftest import run_autocontext

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
    # The run nobody stopped, the same command as `autocontext train` in this process.
    straight_command = _tiny_train_command(tiny_phantom, tmp_path / "straight", *overrides)
    assert straight_command[1:3] == ["-m", "autocontext_jax.main"]
    straight = run_autocontext("train", *straight_command[3:])
    assert straight.returncode == 0, straight.stderr
    step_a, a = _params(tmp_path / "straight")
    step_b, b = _params(tmp_path / "stopped")
    assert step_a == step_b == 300
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
