"""Checkpoints that fail to save, and checkpoints damaged on disk."""

import errno
import os
import pathlib
import re
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from autocontext_jax import inference
from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.evaluation import diagnose
from autocontext_jax.models import build_pyramid
from autocontext_jax.runtime import checkpointing, parallel, workdir_lock
from autocontext_jax.training import loop
from autocontext_jax.training.state import make_optimizer, restore_or_create_state


class _DiskFull:
    """A commit future of a write that ran out of disk space."""

    def result(self, timeout=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def cancel(self):
        pass


def _slowed(train_step, seconds):
    def step(*args):
        time.sleep(seconds)
        return train_step(*args)

    return step


@pytest.mark.slow
def test_a_failed_background_save_stops_the_run_at_once_and_removes_its_partial_folder(
    tiny_phantom, tmp_path, monkeypatch
):
    from conftest import make_tiny_config

    config = make_tiny_config(tiny_phantom)
    config.eval.at_end = False
    config.train.steps = 12
    config.train.checkpoint_every = 4
    config.train.log_every = 12
    original = ocp.StandardCheckpointHandler.async_save
    saves = []

    async def fail_the_second_save(self, directory, *args, **kwargs):
        futures = await original(self, directory, *args, **kwargs)
        saves.append(directory)
        return [*(futures or []), _DiskFull()] if len(saves) == 2 else futures

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", fail_the_second_save)
    # Steps slow enough that the background failure is over before the next save is due.
    jit_train_step = loop.jit_train_step
    monkeypatch.setattr(loop, "jit_train_step", lambda *args: _slowed(jit_train_step(*args), 0.3))
    with pytest.raises(checkpointing.SaveError) as caught:
        train_and_evaluate(config, str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert f"step 8 could not be written to {tmp_path / 'checkpoints' / '8'}" in message
    assert "No space left on device" in message
    noticed = int(re.search(r"noticed at step (\d+)", message)[1])
    assert 8 < noticed < 12
    assert "the checkpoint of step 4 is the last saved" in message
    # The partial folder is gone; the good checkpoint stays.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_phantom, tmp_path_factory):
    """A finished tiny run with the checkpoints of steps 2 and 4."""
    from conftest import make_tiny_config

    workdir = tmp_path_factory.mktemp("run")
    config = make_tiny_config(tiny_phantom)
    config.eval.at_end = False
    train_and_evaluate(config, str(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    return workdir


def _damage(step_folder: pathlib.Path, how: str) -> pathlib.Path:
    """Damage one file of a checkpoint as a failing disk or a careless hand would."""
    files = [p for p in step_folder.rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    if how == "random_bytes":
        data = bytearray(largest.read_bytes())
        start = len(data) // 3
        data[start : start + 4096] = np.random.default_rng(0).bytes(4096)[: len(data) - start]
        largest.write_bytes(bytes(data))
        return largest
    if how == "truncated":
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
        return largest
    path = {
        "no_ocdbt_manifest": step_folder / "state" / "manifest.ocdbt",
        "no_metadata": step_folder / "state" / "_METADATA",
        "no_pipeline": step_folder / "pipeline" / "process_0-of-1.json",
    }[how]
    path.unlink()
    return path


DAMAGE = ["random_bytes", "truncated", "no_ocdbt_manifest", "no_metadata", "no_pipeline"]


def _copy(run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _restore_for_training(workdir: pathlib.Path):
    config = checkpointing.read_run_config(workdir)
    model = build_pyramid(config)
    manager = checkpointing.make_manager(workdir, config)
    try:
        return restore_or_create_state(
            manager,
            model,
            make_optimizer(config.train),
            config.seed,
            parallel.replicated(parallel.make_mesh()),
        )
    finally:
        manager.close()


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_skipped_for_the_previous_one(
    two_checkpoints, tmp_path, capsys, how
):
    workdir = _copy(two_checkpoints, tmp_path)
    damaged = _damage(workdir / "checkpoints" / "4", how)
    folder = workdir / "checkpoints" / "4"
    # evaluate, predict and plot load a run here.
    run = inference.load_run(workdir)
    assert run.step == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1, message
    assert message[0].startswith(f"Skipping the checkpoint of step 4 ({folder}): ")
    assert str(damaged.relative_to(folder)) in message[0]
    with pytest.raises(inference.CheckpointError, match=f"{folder}: "):
        inference.load_run(workdir, step=4)

    state, step, pipeline = _restore_for_training(workdir)
    assert step == 2 and int(state.step) == 2 and pipeline["next_step"] == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1, message
    assert message[0].startswith(f"Skipping the checkpoint of step 4 ({folder}): ")
    # Training saves step 4 again: the damaged folder is moved aside, not deleted.
    assert message[0].endswith(f"moved to {workdir / 'damaged_checkpoints' / '4'}")
    assert not folder.exists() and (workdir / "damaged_checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_training_resumes_from_the_newest_intact_checkpoint(two_checkpoints, tmp_path, capsys):
    from conftest import make_tiny_config

    workdir = _copy(two_checkpoints, tmp_path)
    _damage(workdir / "checkpoints" / "4", "random_bytes")
    config = make_tiny_config(checkpointing.read_run_config(workdir).data.dir)
    config.eval.at_end = False
    config.train.steps = 4
    assert train_and_evaluate(config, str(workdir))["step"] == 4
    captured = capsys.readouterr()
    assert "Skipping the checkpoint of step 4" in captured.err
    assert "Resuming from the checkpoint of step 2" in captured.out
    # The damaged step was trained again and saved whole.
    _, step, _ = _restore_for_training(workdir)
    assert step == 4 and "Skipping" not in capsys.readouterr().err


def test_a_checkpoint_of_non_finite_values_is_skipped(two_checkpoints, tmp_path, capsys):
    workdir = _copy(two_checkpoints, tmp_path)
    state, step, pipeline = _restore_for_training(workdir)
    poisoned = state.replace(
        params=jax.tree.map(lambda x: x * np.nan, state.params), step=state.step + 2
    )
    manager = checkpointing.make_manager(workdir, checkpointing.read_run_config(workdir))
    checkpointing.save(manager, 6, checkpointing.save_args(poisoned, pipeline), force=True)
    manager.close()
    capsys.readouterr()
    _, step, _ = _restore_for_training(workdir)
    assert step == 4
    err = capsys.readouterr().err
    assert "Skipping the checkpoint of step 6" in err and "non-finite values in params" in err
    assert inference.load_run(workdir).step == 4


def test_no_intact_checkpoint_is_a_clear_error(two_checkpoints, tmp_path):
    workdir = _copy(two_checkpoints, tmp_path)
    _damage(workdir / "checkpoints" / "4", "truncated")
    _damage(workdir / "checkpoints" / "2", "no_ocdbt_manifest")
    pattern = r"checkpoints: no intact checkpoint \(step 4: .*; step 2: .*\)"
    with pytest.raises(checkpointing.CheckpointError, match=pattern):
        _restore_for_training(workdir)
    with pytest.raises(inference.CheckpointError, match=pattern):
        inference.load_run(workdir)


def test_a_checkpoint_written_before_the_checksums_still_loads_with_a_note(
    two_checkpoints, tmp_path, capsys
):
    workdir = _copy(two_checkpoints, tmp_path)
    for manifest in (workdir / "checkpoints").glob(f"*/{checkpointing.MANIFEST_FILE}"):
        manifest.unlink()
    _, step, _ = _restore_for_training(workdir)
    assert step == 4
    assert "step 4 has no sha256.json" in capsys.readouterr().err


def test_diagnose_notes_a_checkpoint_without_checksums_once(two_checkpoints, tmp_path, capsys):
    # It reads the checkpoint twice (the evaluated and the last parameters).
    workdir = _copy(two_checkpoints, tmp_path)
    for manifest in (workdir / "checkpoints").glob(f"*/{checkpointing.MANIFEST_FILE}"):
        manifest.unlink()
    diagnose.make_diagnosis(inference.load_run(workdir))
    assert capsys.readouterr().err.count("has no sha256.json") == 1


def test_a_run_loads_while_another_trains_in_its_workdir(two_checkpoints):
    # evaluate, predict and plot only read: the training lock does not stop them.
    with workdir_lock.hold(two_checkpoints):
        assert inference.load_run(two_checkpoints).step == 4
