"""The command line: `autocontext SUBCOMMAND`, `python -m autocontext_jax`, --help, --version."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from autocontext_jax import __version__
from autocontext_jax.cli import common
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
    result = _run(sys.executable, "-m", "autocontext_jax", "predict", "--version")
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


@pytest.mark.slow
@pytest.mark.parametrize("option", ["--verbose", "--verbosity=0"])
def test_jax_start_up_warnings_show_only_with_verbose(option):
    quiet = _run(sys.executable, "-c", START_UP_SCRIPT)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "ran", quiet.stderr
    assert "initialize backend" not in quiet.stderr
    verbose = _run(sys.executable, "-c", START_UP_SCRIPT, option)
    assert verbose.returncode == 0 and "initialize backend 'tpu'" in verbose.stderr


def _hostile_files(root: pathlib.Path, tiny_phantom: pathlib.Path) -> dict[str, pathlib.Path]:
    """Files and folders a careless user points the commands at."""
    paths = {"tmp": root, "scan": sorted((tiny_phantom / "imagesTr").iterdir())[0]}
    paths["empty"] = root / "empty"
    paths["empty"].mkdir()
    paths["norun"] = root / "norun"
    paths["norun"].mkdir()
    paths["text"] = root / "text.nii.gz"
    paths["text"].write_text("hello")
    # A CT of 128 x 128 x 64 voxels whose header claims 50 mm voxels instead of ~1 mm.
    hu = np.random.default_rng(0).integers(-1000, 1000, (128, 128, 64)).astype(np.int16)
    paths["huge"] = root / "huge.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([50.0, 50.0, 50.0, 1.0])), paths["huge"])
    label_path = tiny_phantom / "labelsTr" / "phantom_000.nii.gz"
    label = nib.load(label_path)
    ids = np.asarray(label.dataobj).astype(np.uint8)
    ids[0, 0, 0] = 77  # an id no class of the run has
    paths["unknown_ids"] = root / "unknown_ids.nii.gz"
    nib.save(nib.Nifti1Image(ids, label.affine), paths["unknown_ids"])
    sweeps = {
        "empty_grid": "CONFIG = 'configs/default.py'\ndef get_sweep():\n    return []\n",
        "typo_grid": "CONFIG = 'configs/default.py'\n"
        "def get_sweep():\n    return [{'train.stepz': 1}, {'train.stepz': 2}]\n",
        "broken_grid": "CONFIG = 'configs/default.py'\ndef get_sweep():\n    return [{}] * 'x'\n",
        "syntax": "CONFIG = 'configs/default.py'\ndef get_sweep(:\n",
    }
    configs = {
        "config_syntax": "def get_config(:\n    pass\n",
        "config_raises": "import ml_collections\n\n\ndef get_config():\n    return 1 / 0\n",
    }
    for name, text in {**sweeps, **configs}.items():
        paths[name] = root / f"{name}.py"
        paths[name].write_text(text)
    return paths


# (arguments, the text the one line holds); {name} is a path of _hostile_files, {run} the
# tiny run's workdir, {phantom} the tiny phantom.
HOSTILE_COMMANDS = {
    "train without --config": (["train"], "Usage: --config is required"),
    "train an unknown flag": (["train", "--nope=1"], "Bad flag: Unknown command line flag 'nope'"),
    "train a positional argument": (
        ["train", "--config=configs/default.py", "extra"],
        "unexpected arguments: ['extra']",
    ),
    "train a field typo": (
        ["train", "--config=configs/default.py", "--config.train.stepz=3"],
        'Did you mean "steps"',
    ),
    "train a value of the wrong type": (
        ["train", "--config=configs/default.py", "--config.train.steps=abc"],
        "--config.train.steps=abc: invalid literal for int()",
    ),
    "train a config that does not exist": (
        ["train", "--config=configs/nope.py"],
        "Bad --config: configs/nope.py: no such file",
    ),
    "train a config that does not exist, with an override": (
        ["train", "--config=configs/nope.py", "--config.train.steps=3"],
        "Bad --config: configs/nope.py: no such file",
    ),
    "train a config with a syntax error": (
        ["train", "--config={config_syntax}"],
        "Bad --config: {config_syntax}:1: invalid syntax",
    ),
    "train a config with a syntax error, with an override": (
        ["train", "--config={config_syntax}", "--config.train.steps=3"],
        "Bad --config: {config_syntax}:1: invalid syntax",
    ),
    "preprocess a config that raises, with an override": (
        ["preprocess", "--config={config_raises}", "--config.train.steps=3"],
        "Bad --config: {config_raises}:5: ZeroDivisionError: division by zero",
    ),
    "train a config that raises": (
        ["train", "--config", "{config_raises}", "--workdir={tmp}/w"],
        "Bad --config: {config_raises}:5: ZeroDivisionError: division by zero",
    ),
    "train a bad value": (
        ["train", "--config=configs/default.py", "--config.train.learning_rate=inf"],
        "Bad configuration: config.train.learning_rate=inf",
    ),
    "train a workdir that is a file": (
        ["train", "--config=configs/default.py", "--workdir={text}", "--config.data.dir={phantom}"],
        "is a file, not a folder",
    ),
    "preprocess a data.dir that does not exist": (
        ["preprocess", "--config=configs/default.py", "--config.data.dir={tmp}/typo"],
        "typo: config.data.dir does not exist",
    ),
    "preprocess every case held out": (
        [
            "preprocess",
            "--config=configs/default.py",
            "--config.data.dir={phantom}",
            "--config.data.phantom_cases=0",
            "--config.data.num_val_cases=5",
        ],
        "config.data.num_val_cases=5 must leave at least one",
    ),  # fmt: skip
    "predict without --workdir": (
        ["predict", "--input={scan}", "--output={tmp}/seg.nii.gz"],
        "Usage: --workdir (or --model) is required",
    ),
    "predict a folder that is not a run": (
        ["predict", "--workdir={norun}", "--input={scan}", "--output={tmp}/seg.nii.gz"],
        "norun/config.json: no config.json",
    ),
    "predict a step without a checkpoint": (
        ["predict", "--workdir={run}", "--input={scan}", "--output={tmp}/seg.nii.gz", "--step=99"],
        "no checkpoint of step 99",
    ),
    "predict a missing input": (
        ["predict", "--workdir={run}", "--input={tmp}/nope.nii.gz", "--output={tmp}/seg.nii.gz"],
        "nope.nii.gz: no such file or folder",
    ),
    "predict an empty folder": (
        ["predict", "--workdir={run}", "--input={empty}", "--output={tmp}/segs"],
        "empty: empty folder",
    ),
    "predict a file that is not a scan": (
        ["predict", "--workdir={run}", "--input={text}", "--output={tmp}/seg.nii.gz"],
        "text.nii.gz: cannot read as NIfTI",
    ),
    "predict onto its input": (
        ["predict", "--workdir={run}", "--input={scan}", "--output={scan}"],
        "would write over the input",
    ),
    "predict a header claiming 50 mm voxels": (
        ["predict", "--workdir={run}", "--input={huge}", "--output={tmp}/seg.nii.gz"],
        "huge.nii.gz: its (128, 128, 64) voxels of (50.0, 50.0, 50.0) mm would resample",
    ),
    "predict a bad overlap": (
        ["predict", "--workdir={run}", "--input={scan}", "--output={tmp}/s.nii", "--overlap=1.5"],
        "--overlap=1.5: must be in [0, 1)",
    ),
    "predict a tile the network cannot take": (
        ["predict", "--workdir={run}", "--input={scan}", "--output={tmp}/s.nii", "--tile_size=7"],
        "--tile_size=7: must be a positive multiple",
    ),
    "predict a bad label map": (
        [
            "predict",
            "--workdir={run}",
            "--input={scan}",
            "--output={tmp}/s.nii.gz",
            "--labels={scan}",
            "--label_map=garbage",
        ],
        "--label_map: label map 'garbage': expected ID:CLASS pairs",
    ),  # fmt: skip
    "predict missing labels": (
        [
            "predict",
            "--workdir={run}",
            "--input={scan}",
            "--output={tmp}/s.nii.gz",
            "--labels={tmp}/nope.nii.gz",
        ],
        "nope.nii.gz: no such label file or folder",
    ),  # fmt: skip
    "predict labels with unknown ids": (
        [
            "predict",
            "--workdir={run}",
            "--input={scan}",
            "--output={tmp}/s.nii.gz",
            "--labels={unknown_ids}",
        ],
        "unknown_ids.nii.gz: label ids [77] outside the model's classes 0..7",
    ),  # fmt: skip
    "predict into a run's checkpoint folder": (
        ["predict", "--workdir={run}", "--input={scan}", "--output={run}/checkpoints/2/seg.nii.gz"],
        "checkpoints, which the training run in {run} owns and prunes",
    ),
    "predict into a new folder in a run's checkpoints": (
        ["predict", "--workdir={run}", "--input={scan}", "--output={run}/checkpoints/x/s.nii.gz"],
        "checkpoints, which the training run in {run} owns and prunes",
    ),
    "predict with a model file that does not exist": (
        ["predict", "--model={tmp}/nope.zip", "--input={scan}", "--output={tmp}/seg.nii.gz"],
        "Bad model file: {tmp}/nope.zip: no such model file",
    ),
    "export without --output": (["export", "--workdir={run}"], "Usage: --output is required"),
    "export to a name that is not a zip": (
        ["export", "--workdir={run}", "--output={tmp}/model.tar"],
        "model.tar: a model file's name ends in .zip",
    ),
    "export a folder that is not a run": (
        ["export", "--workdir={norun}", "--output={tmp}/model.zip"],
        "no config.json",
    ),
    "evaluate nothing": (["evaluate"], "Usage: give --workdir, or --predictions and --labels"),
    "evaluate a folder that is not a run": (["evaluate", "--workdir={norun}"], "no config.json"),
    "evaluate a negative tolerance": (
        ["evaluate", "--workdir={run}", "--nsd_tolerance_mm=-2"],
        "--nsd_tolerance_mm=-2.0: must be > 0 mm",
    ),
    "evaluate missing folders": (
        ["evaluate", "--predictions={tmp}/nope", "--labels={empty}"],
        "nope: no such folder",
    ),
    "evaluate empty folders": (
        ["evaluate", "--predictions={empty}", "--labels={empty}"],
        "empty: no .nii or .nii.gz file",
    ),
    "plot without --workdir": (["plot"], "Flag --workdir must have a value"),
    "plot a folder that is not a run": (["plot", "--workdir={norun}"], "no config.json"),
    "compare one run": (["compare", "{run}"], "give at least two run workdirs"),
    "compare runs without reports": (
        ["compare", "{run}", "{norun}"],
        "Cannot compare: {run}/eval_cases.json: missing; evaluate the run first",
    ),
    "sweep a missing file": (
        ["sweep", "run", "{tmp}/nope.py", "--runs_dir={tmp}/runs"],
        "nope.py: no such sweep file",
    ),
    "sweep an empty grid": (
        ["sweep", "run", "{empty_grid}", "--runs_dir={tmp}/runs"],
        "empty_grid.py: get_sweep() must return a non-empty list",
    ),
    "sweep a field typo": (
        ["sweep", "run", "{typo_grid}", "--runs_dir={tmp}/runs", "--dry_run"],
        "'train.stepz': configs/default.py has no such field (did you mean 'steps'?)",
    ),
    "sweep a grid that raises": (
        ["sweep", "run", "{broken_grid}", "--runs_dir={tmp}/runs"],
        "broken_grid.py:3: TypeError: can't multiply sequence",
    ),
    "sweep a syntax error": (
        ["sweep", "report", "{syntax}", "--runs_dir={tmp}/runs"],
        "syntax.py:2: SyntaxError",
    ),
    "sweep no subcommand": (["sweep", "{empty_grid}"], "usage: autocontext sweep run|report"),
    "phantom no cases": (
        ["phantom", "--out={tmp}/phantom", "--num_cases=0"],
        "--num_cases=0: 0 is not a positive integer",
    ),
    "phantom into a file": (
        ["phantom", "--out={text}", "--num_cases=1"],
        "--out={text}: is a file, not a folder",
    ),
    "check a missing scan": (["check", "--scan={tmp}/nope.nii.gz"], "nope.nii.gz: no such file"),
    "diagnose a folder that is no run": (["diagnose", "--workdir={tmp}"], "Bad workdir: "),
    "ablation an unknown mode": (
        ["ablation", "--config=configs/default.py", "--modes=nope", "--runs_dir={tmp}/runs"],
        "--modes: 'nope' is not one of",
    ),
    "ablation a report of runs never made": (
        ["ablation", "--config=configs/default.py", "--runs_dir={tmp}/runs", "--report_only"],
        "Cannot report the ablation: no evaluated run to report on",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_COMMANDS))
def test_every_user_error_of_every_command_is_one_line_without_a_traceback(
    case, tiny_run, tiny_phantom, tmp_path, monkeypatch
):
    from conftest import assert_one_line_error, run_autocontext

    monkeypatch.chdir(REPO)  # the configs/ and sweep paths are relative, as users type them
    args, expected = HOSTILE_COMMANDS[case]
    paths = {**_hostile_files(tmp_path, tiny_phantom), "run": tiny_run, "phantom": tiny_phantom}
    result = run_autocontext(*(arg.format(**paths) for arg in args))
    assert_one_line_error(result, expected.format(**paths))
    assert not (tmp_path / "seg.nii.gz").exists() and not (tmp_path / "runs").exists()


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    from conftest import run_autocontext

    def broken(*_):
        raise KeyError("a bug")

    monkeypatch.setattr("autocontext_jax.cli.compare.load_result", broken)
    result = run_autocontext("compare", "a", "b")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "KeyError: 'a bug'" in result.stderr


def test_a_user_error_is_one_line_and_status_1_in_a_real_process(tmp_path):
    result = _run(sys.executable, "-m", "autocontext_jax", "compare", str(tmp_path), str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"Cannot compare: {tmp_path / 'eval_cases.json'}: missing; evaluate the run first "
        f"(autocontext evaluate --workdir {tmp_path})"
    )


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_help_exits_0_in_process(name):
    from conftest import run_autocontext

    result = run_autocontext(name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"autocontext {name} " in result.stdout and "Flags:" in result.stdout


def test_closed_event_loop_noise_is_dropped_and_other_errors_still_shown(capsys):
    # TensorStore prints the callbacks that fail after a failed save closed Orbax's loop.
    from autocontext_jax.cli import common

    shown = []
    hook = common._without_closed_loop_noise(lambda *error: shown.append(error[1]))
    hook(RuntimeError, RuntimeError("Event loop is closed"), None)
    assert shown == []
    other = RuntimeError("something else")
    hook(RuntimeError, other, None)
    hook(ValueError, ValueError("Event loop is closed"), None)
    assert shown[0] is other and isinstance(shown[1], ValueError)


def test_orbax_records_and_its_orphaned_tasks_are_dropped_unless_verbose():
    # A full disk fails every write task of a save; the run says so in one line itself.
    keep = common._NotOrbax()

    def record(name, path, message):
        return logging.LogRecord(name, logging.ERROR, path, 1, message, None, None)

    orbax_file = os.path.join(os.sep, "x", "orbax", "checkpoint", "serialization.py")
    assert not keep.filter(record("absl", orbax_file, "write failed"))
    orphan = f"Task exception was never retrieved\nfuture: <Task coro=<write() at {orbax_file}:1>>"
    assert not keep.filter(record("asyncio", "/usr/lib/asyncio/base_events.py", orphan))
    assert keep.filter(
        record("asyncio", "/usr/lib/asyncio/base_events.py", "Task exception was never retrieved")
    )
    assert keep.filter(record("absl", "/x/autocontext_jax/training/loop.py", "orbax"))


def test_an_orphaned_gathering_future_of_orbax_is_dropped_by_its_traceback():
    # asyncio names a gathered future's exception, not the coroutine's file, in its message:
    # only the traceback tells that the failed write was Orbax's.
    keep = common._NotOrbax()

    def failed_in(path):
        try:
            exec(compile("raise OSError(28, 'No space left on device')", path, "exec"))
        except OSError as error:
            return error

    message = "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture>"
    base_events = "/usr/lib/asyncio/base_events.py"

    def record(error):
        exc_info = (type(error), error, error.__traceback__)
        return logging.LogRecord("asyncio", logging.ERROR, base_events, 1, message, None, exc_info)

    orbax_file = os.path.join(os.sep, "x", "orbax", "checkpoint", "serialization.py")
    assert not keep.filter(record(failed_in(orbax_file)))
    assert keep.filter(record(failed_in(os.path.join(os.sep, "x", "elsewhere", "io.py"))))
    assert keep.filter(
        logging.LogRecord("asyncio", logging.ERROR, base_events, 1, message, None, None)
    )


def test_the_closed_loop_noise_of_a_failed_save_is_silenced_and_nothing_else():
    seen = []
    hook = common._without_closed_loop_unraisable(seen.append)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    hook(closed)
    hook(other)
    assert seen == [other]


def test_the_cache_folder_follows_xdg_cache_home_else_the_home(tmp_path):
    # Read once, on import: a fresh interpreter for each environment.
    program = "from autocontext_jax.cli.common import COMPILATION_CACHE; print(COMPILATION_CACHE)"
    environment = {key: value for key, value in os.environ.items() if key != "XDG_CACHE_HOME"}
    environment["HOME"] = str(tmp_path / "home")

    def folder(**extra: str) -> str:
        command = [sys.executable, "-c", program]
        result = subprocess.run(
            command, capture_output=True, text=True, env={**environment, **extra}
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert folder() == str(tmp_path / "home" / ".cache" / "autocontext_jax" / "xla")
    cache = tmp_path / "xdg"
    assert folder(XDG_CACHE_HOME=str(cache)) == str(cache / "autocontext_jax" / "xla")
    # An empty XDG_CACHE_HOME is unset, as the convention has it.
    assert folder(XDG_CACHE_HOME="") == str(
        tmp_path / "home" / ".cache" / "autocontext_jax" / "xla"
    )
