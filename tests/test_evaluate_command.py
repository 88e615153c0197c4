"""`python -m autocontext_jax.evaluate`: re-evaluating a training workdir from its checkpoint."""

import json
import subprocess
import sys

import pytest

from autocontext_jax import train


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "autocontext_jax.evaluate", *args]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained_run(tiny_phantom, tmp_path_factory):
    """A two-step tiny run that evaluated its held-out case at the end."""
    from conftest import make_tiny_config

    config = make_tiny_config(tiny_phantom)
    config.train.steps = 2
    workdir = tmp_path_factory.mktemp("run")
    train.train_and_evaluate(config, str(workdir))
    return workdir


def test_the_command_reproduces_the_end_of_training_report(trained_run):
    at_end = json.loads((trained_run / "eval_cases.json").read_text())
    for name in ("eval_cases.json", "eval_summary.md", "eval_summary.csv", "eval_summary.json"):
        (trained_run / name).unlink()
    result = _evaluate("--workdir", str(trained_run))
    assert result.returncode == 0, result.stderr
    assert "| HD95 (mm) | artery |" in result.stdout
    again = json.loads((trained_run / "eval_cases.json").read_text())
    assert again.pop("step") == 2
    assert again == at_end
    for name in ("eval_summary.md", "eval_summary.csv", "eval_summary.json"):
        assert (trained_run / name).is_file()


def test_the_command_evaluates_another_dataset(trained_run, tiny_phantom):
    result = _evaluate("--workdir", str(trained_run), "--data", str(tiny_phantom))
    assert result.returncode == 0, result.stderr
    cases = json.loads((trained_run / "eval_cases.json").read_text())
    assert len(cases["case_ids"]) == 5 and len(cases["hd95"]["level_2"]) == 5


def test_the_command_names_a_workdir_without_a_run(tmp_path):
    result = _evaluate("--workdir", str(tmp_path))
    assert result.returncode != 0
    assert f"{tmp_path / 'config.json'}: no config.json" in result.stderr
