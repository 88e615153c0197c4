"""Checkpoints that fail to save, and checkpoints damaged on disk."""

import errno
import os
import re
import time

import orbax.checkpoint as ocp
import pytest

from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.training import checkpointing, loop


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
