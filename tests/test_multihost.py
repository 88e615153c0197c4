"""Two processes joined by jax.distributed train like one process on the same global batch."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from autocontext_jax.runtime import checkpointing, multihost

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_run_args(data_dir, workdir):
    """`main` on the tiny config, 3 steps saved at the end, as command-line overrides."""
    from conftest import tiny_train_command

    overrides = ("--config.train.steps=3", "--config.train.checkpoint_every=3")
    return tiny_train_command(data_dir, workdir, *overrides, "--config.train.log_every=1")[1:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restore(workdir, like=None):
    """(step, saved tree) of a run's latest checkpoint, onto this process's device.

    A checkpoint written by two processes records their devices: restoring it here needs
    a target tree (`like`) that says where the arrays go.
    """
    import ml_collections
    import orbax.checkpoint as ocp

    saved = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    manager = checkpointing.make_manager(workdir, ml_collections.ConfigDict(saved))
    step = manager.latest_step()
    # A checkpoint holds the train state beside the input pipeline's: read the state.
    abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    tree = manager.restore(step, args=args).state
    manager.close()
    return step, tree


@pytest.mark.slow
def test_two_processes_train_like_one(tiny_phantom, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    single = subprocess.run(
        [sys.executable, *_tiny_run_args(tiny_phantom, tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    address = f"127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                *_tiny_run_args(tiny_phantom, tmp_path / "two"),
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={index}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    # Only process 0 talks to the user and writes the reports.
    assert "## Dice (%)" in outputs[0][0] and "## Dice (%)" not in outputs[1][0]
    step_one, one = _restore(tmp_path / "one")
    step_two, two = _restore(tmp_path / "two", like=one)
    assert step_one == step_two == 3
    # Gradients are summed across processes in another order; Adam's normalised steps
    # (about 6e-3 each) carry that rounding into the parameters at ~1e-6.
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # Training lines only: validation (eval.every capped to the 3 steps) has lines of its own.
    lines = [
        line
        for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    losses = [json.loads(line)["loss"] for line in lines]
    single_losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    one_eval = json.loads((tmp_path / "one" / "eval_cases.json").read_text())
    two_eval = json.loads((tmp_path / "two" / "eval_cases.json").read_text())
    assert two_eval["case_ids"] == one_eval["case_ids"]
    np.testing.assert_allclose(two_eval["dice"]["level_2"], one_eval["dice"]["level_2"])


def test_slurm_is_detected_only_for_several_tasks_of_a_step():
    assert multihost.launched_by_slurm({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"})
    assert not multihost.launched_by_slurm({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    # Inside an sbatch script but outside srun: one process, nothing to join.
    assert not multihost.launched_by_slurm({"SLURM_NTASKS": "4"})
    assert not multihost.launched_by_slurm({})


def test_a_single_process_run_joins_nothing():
    assert not multihost.initialize(environ={})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coordinator_address": "h:1", "num_processes": 2}, "needs --num_processes and"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"in \[0, 2\)"),
        ({"process_id": 0}, "need --coordinator_address"),
    ],
)
def test_incomplete_flags_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        multihost.initialize(environ={}, **kwargs)
