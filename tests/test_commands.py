"""The command line: `autocontext SUBCOMMAND`, `python -m autocontext_jax`, --help, --version."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from autocontext_jax import __version__
from autocontext_jax.cli.commands import COMMANDS

# Installed by `pip install -e .` beside the interpreter (CI installs so); absent otherwise.
REPO = pathlib.Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = pathlib.Path(sys.executable).parent / "autocontext"
# The commands that take a config file, whose help lists the shipped configs.
CONFIG_COMMANDS = ("train", "preprocess")


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_help_exits_0_with_an_example_and_its_flags(name):
    result = _run(sys.executable, "-m", "autocontext_jax", name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"autocontext {name} " in result.stdout  # the example
    assert "Flags:" in result.stdout and "--version" in result.stdout
    if name in CONFIG_COMMANDS:
        assert "--config.a.b=value" in result.stdout
        for config in ("configs/default.py", "configs/paper.py", "configs/totalseg_example.py"):
            assert config in result.stdout


def test_the_documented_module_commands_answer_help_and_version():
    result = _run(sys.executable, "-m", "autocontext_jax.main", "--help")
    assert result.returncode == 0, result.stderr
    assert "--config.a.b=value" in result.stdout and "--workdir:" in result.stdout
    result = _run(sys.executable, "-m", "autocontext_jax.predict", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"autocontext-jax {__version__}"


def test_the_command_lists_its_subcommands_and_refuses_an_unknown_one():
    result = _run(sys.executable, "-m", "autocontext_jax", "--help")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert f"  {name} " in result.stdout
    result = _run(sys.executable, "-m", "autocontext_jax", "trian")
    assert result.returncode != 0 and "unknown subcommand 'trian'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="needs pip install -e .")
def test_the_installed_console_script_runs_a_subcommand(tmp_path):
    result = _run(str(CONSOLE_SCRIPT), "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"autocontext-jax {__version__}"
    result = _run(str(CONSOLE_SCRIPT), "predict", "--help")
    assert result.returncode == 0 and "autocontext predict --workdir" in result.stdout


def test_platform_flag_names_a_platform_without_devices_in_one_line():
    command = [
        sys.executable, "-m", "autocontext_jax", "train", "--config", "configs/default.py",
        "--dry_run", "--platform=tpu",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode == 0:
        pytest.skip("this machine has a TPU")
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("--platform=tpu: Unable to initialize backend 'tpu'")
    )
    result = subprocess.run(
        [*command[:-1], "--platform=cpu"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "level 2:" in result.stdout


START_UP_SCRIPT = """
import logging, sys
from autocontext_jax.cli.common import run_command
def main(argv):
    logging.getLogger("jax._src.xla_bridge").warning("Unable to initialize backend 'tpu'")
    print("ran")
run_command("A command.", lambda: None, main, sys.argv)
"""


@pytest.mark.parametrize("option", ["--verbose", "--verbosity=0"])
def test_jax_start_up_warnings_show_only_with_verbose(option):
    quiet = _run(sys.executable, "-c", START_UP_SCRIPT)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "ran", quiet.stderr
    assert "initialize backend" not in quiet.stderr
    verbose = _run(sys.executable, "-c", START_UP_SCRIPT, option)
    assert verbose.returncode == 0 and "initialize backend 'tpu'" in verbose.stderr
