"""One run per workdir: a held workdir is refused, a dead run's lock taken over."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from conftest import python_module

from autocontext_jax.runtime import workdir_lock

TESTS = pathlib.Path(__file__).parent


def test_a_second_run_in_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with workdir_lock.hold(workdir):
        result = python_module(
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
            "from autocontext_jax.runtime import workdir_lock\n"
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
