"""`autocontext train` and `python -m autocontext_jax.main`: flags, errors, dry runs."""

import pathlib
import subprocess
import sys

import pytest
from conftest import python_module

from autocontext_jax.config.schema import (
    fit_to_run_length,
    validate_config,
)
from autocontext_jax.runtime import checkpointing

TESTS = pathlib.Path(__file__).parent


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


# `python -m autocontext_jax.main` (how users launch training) and `autocontext preprocess`.
ENTRY_POINTS = [["autocontext_jax.main"], ["autocontext_jax", "preprocess"]]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "configs/default.py", "--config.train.stepz=3"], 'Did you mean "steps"'),
        (["--config", "configs/nope.py"], "Bad --config: configs/nope.py: no such file"),
    ],
)
def test_flag_errors_are_one_line_without_a_traceback(entry, args, expected):
    result = python_module(*entry, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_exits_with_zero(entry):
    result = python_module(*entry, "--help")
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
    result = python_module("autocontext_jax.main", *args)
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
    result = python_module(
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
