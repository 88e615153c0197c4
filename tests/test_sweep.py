"""Sweep files expanded into runs, and the local, TPU and SLURM commands made from them."""

import json
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest

from autocontext_jax.cli import sweep as sweep_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def test_product_varies_the_last_axis_fastest():
    grid = sweep_lib.product({"a": [1, 2], "b": ["x", "y", "z"]})
    assert [(run["a"], run["b"]) for run in grid] == [
        (1, "x"),
        (1, "y"),
        (1, "z"),
        (2, "x"),
        (2, "y"),
        (2, "z"),
    ]


def test_names_use_only_the_keys_that_vary(tmp_path):
    sweep = sweep_lib.load_sweep(LAUNCH / "sweep_example_cpu.py")
    runs = sweep_lib.expand(sweep, str(tmp_path / "runs"))
    assert [run.name for run in runs] == [
        "levels-1",
        "levels-2_mode-end_to_end",
        "levels-2_mode-none",
    ]
    assert runs[2].workdir == str(tmp_path / "runs" / "levels-2_mode-none")
    assert runs[2].overrides["model.width"] == 8


def test_repeated_settings_are_refused():
    sweep = sweep_lib.Sweep("configs/default.py", ({"seed": 1}, {"seed": 2}, {"seed": 1}))
    with pytest.raises(sweep_lib.SweepError, match="seed-1"):
        sweep_lib.expand(sweep, "runs")


def test_a_file_without_get_sweep_is_named(tmp_path):
    bad = tmp_path / "bad_sweep.py"
    bad.write_text("CONFIG = 'configs/default.py'\n")
    with pytest.raises(sweep_lib.SweepError, match=r"bad_sweep\.py: a sweep file defines"):
        sweep_lib.load_sweep(bad)


def test_the_generated_command_is_accepted_by_main(tmp_path):
    sweep = sweep_lib.load_sweep(LAUNCH / "sweep_example_cpu.py")
    run = sweep_lib.expand(sweep, str(tmp_path))[1]
    command = sweep_lib.train_command(sweep, run, sys.executable, extra=["--dry_run"])
    assert command[:3] == [sys.executable, "-m", "autocontext_jax.main"]
    assert "--config.pyramid.mode=end_to_end" in command
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "level 2: downsample x2, 9 input channels" in result.stdout
    assert "width: 8" in result.stdout


def test_tpu_command_runs_on_every_worker_as_one_job():
    run = sweep_lib.SweepRun("levels-2", {"pyramid.levels": 2}, "runs/x/levels-2")
    command = sweep_lib.train_command(sweep_lib.Sweep("configs/default.py", ()), run)
    tpu = sweep_lib.tpu_command(command, "my-v4-32", "us-central2-b", "code dir", "proj")
    assert tpu[:8] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "my-v4-32",
        "--zone=us-central2-b",
        "--project=proj",
    ]
    assert tpu[8] == "--worker=all"
    remote = tpu[9].removeprefix("--command=")
    cd, train = remote.split(" && ")
    assert shlex.split(cd) == ["cd", "code dir"]
    assert shlex.split(train) == [*command, "--multihost"]


def test_slurm_script_starts_one_process_per_node():
    run = sweep_lib.SweepRun("levels-2", {"pyramid.levels": 2}, "runs/x/levels-2")
    command = ["python3", "-m", "autocontext_jax.main", "--workdir=runs/x/levels-2"]
    script = sweep_lib.slurm_script(command, run, nodes=4, gpus_per_node=8, partition="gpu")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in (
        "#SBATCH --job-name=levels-2",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --output=runs/x/levels-2/slurm-%j.out",
    ):
        assert line in lines
    assert shlex.split(lines[-1]) == ["srun", *command]


def _sweep_command(*args):
    command = [sys.executable, "-m", "autocontext_jax", "sweep", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


def test_dry_run_prints_the_sbatch_submissions_and_writes_nothing(tmp_path):
    runs_dir = tmp_path / "runs"
    result = _sweep_command(
        "run",
        "launch/sweep_example_cpu.py",
        f"--runs_dir={runs_dir}",
        "--backend=slurm",
        "--dry_run",
    )
    assert result.returncode == 0, result.stderr
    submissions = [line for line in result.stdout.splitlines() if line.startswith("== ")]
    assert submissions[0] == f"== levels-1: sbatch {runs_dir / 'levels-1' / 'job.sbatch'}"
    assert len(submissions) == 3
    assert "#SBATCH --nodes=1" in result.stdout
    assert not runs_dir.exists()


def test_report_gathers_the_finished_runs(tmp_path):
    sweep = sweep_lib.load_sweep(LAUNCH / "sweep_example_cpu.py")
    runs = sweep_lib.expand(sweep, str(tmp_path))
    rng = np.random.default_rng(0)
    for run, levels in zip(runs[:2], (1, 2), strict=True):
        pathlib.Path(run.workdir).mkdir()
        result = {
            "case_ids": [f"c{i}" for i in range(6)],
            "classes": ["liver"],
            "dice": {f"level_{s}": rng.uniform(size=(6, 1)).tolist() for s in range(1, levels + 1)},
        }
        (pathlib.Path(run.workdir) / "eval_cases.json").write_text(json.dumps(result))
    out = _sweep_command("report", "launch/sweep_example_cpu.py", f"--runs_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    header = "| Dice (%) | levels-1 level 1 | levels-2_mode-end_to_end level 1 | "
    assert header + "levels-2_mode-end_to_end level 2 |" in out.stdout
    assert "Not finished (left out): levels-2_mode-none" in out.stdout
