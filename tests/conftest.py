"""Shared fixtures: tiny configs and a tiny phantom dataset, built once per session."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from tensorboardX.proto import event_pb2

# The commands' cache folder (XLA's cache and the timed choice of convolution lowering,
# cli/common.COMPILATION_CACHE) is the session's own, for the commands run in this process
# and in subprocesses alike: the tests never write into the user's home. Set before the
# commands are imported: their COMPILATION_CACHE is read once, on import.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="autocontext_tests_cache_")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

from autocontext_jax import phantom  # noqa: E402
from autocontext_jax.cli import commands  # noqa: E402
from autocontext_jax.config.files import load_config_file  # noqa: E402
from autocontext_jax.training.loop import train  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def _compile_each_program_once() -> None:
    # Many tests build their own jitted step or predictor of the same tiny shapes; JAX's
    # in-memory cache is per wrapper, the persistent one is keyed by the program, so each
    # program compiles once per session whichever test asks first. A folder of this
    # session's own keeps the timings of a fresh clone honest. Set before anything compiles.
    folder = tempfile.mkdtemp(prefix="autocontext_tests_xla_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


_compile_each_program_once()
# The tiny runs name the lowering that `auto` is untimed (models/conv.untimed_default): what
# the tests compute then never depends on what a timing on a busy machine chose, and no
# test pays for one. auto's timing and cache have their own tests (test_autotune.py).
TINY_CONV_IMPL = "depth_folded"
TINY_PHANTOM_SHAPE = (48, 40, 32)
TINY_PHANTOM_SPACING = (4.0, 4.0, 4.0)


def load_config(name: str) -> ml_collections.ConfigDict:
    """The config of configs/NAME.py, loaded by path as the command line does."""
    return load_config_file(REPO / "configs" / f"{name}.py")


# The real example CT in shared/ beside the checkout, where its shipped config finds it.
TOTALSEG_EXAMPLE = pathlib.Path(load_config("totalseg_example").data.dir)


def make_tiny_config(data_dir: str = "unused") -> ml_collections.ConfigDict:
    """The default config shrunk so that a step compiles and runs in about a second."""
    config = load_config("default")
    config.data.dir = str(data_dir)
    config.data.phantom_cases = 0
    config.data.num_val_cases = 1
    config.data.crop_size = 8
    config.model.width = 2
    config.model.num_poolings = 1
    config.train.steps = 4
    config.train.batch_size = 2
    config.train.warmup_steps = 1
    config.train.checkpoint_every = 2
    config.train.log_every = 2
    config.model.conv_impl = TINY_CONV_IMPL
    return config


def fixed_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of the config's shapes whose image is its labels plus a little noise."""
    rng = np.random.default_rng(seed)
    c, s = config.data.crop_size, config.pyramid.levels
    labels = rng.integers(0, 3, size=(config.train.batch_size, s, c, c, c))
    image = labels[..., None].astype(np.float32) + rng.normal(size=(*labels.shape, 1)) * 0.1
    return {"image": image.astype(np.float32), "label": np.eye(8, dtype=np.float32)[labels]}


def tiny_train_command(data_dir, workdir, *overrides: str) -> list[str]:
    """`python -m autocontext_jax.main` with make_tiny_config's sizes, as a user types it."""
    return [
        sys.executable,
        "-m",
        "autocontext_jax.main",
        f"--config={pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'default.py'}",
        f"--workdir={workdir}",
        f"--config.data.dir={data_dir}",
        "--config.data.phantom_cases=0",
        "--config.data.num_val_cases=1",
        "--config.data.crop_size=8",
        "--config.model.width=2",
        "--config.model.num_poolings=1",
        "--config.train.batch_size=2",
        "--config.train.warmup_steps=1",
        f"--config.model.conv_impl={TINY_CONV_IMPL}",
        *overrides,
    ]


@pytest.fixture
def tiny_config() -> ml_collections.ConfigDict:
    """A fresh tiny config (tests may change it)."""
    return make_tiny_config()


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> pathlib.Path:
    """Five small phantom cases in MSD layout."""
    out = tmp_path_factory.mktemp("phantom")
    phantom.write_phantom_dataset(
        out, 5, seed=3, shape=TINY_PHANTOM_SHAPE, spacing=TINY_PHANTOM_SPACING
    )
    return out


def read_events(folder: pathlib.Path) -> list:
    """Every TensorBoard event in the event files of `folder` (TFRecord framing)."""
    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            events.append(event_pb2.Event.FromString(payload))
            offset += 12 + length + 4
    return events


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What `autocontext ARGS...` run in this process returned and printed."""

    returncode: int
    stdout: str
    stderr: str


def run_autocontext(*args: str) -> CommandResult:
    """`autocontext ARGS...` in this process (no interpreter start-up, JAX already loaded).

    stderr holds what the process would print there: the message of sys.exit(text), or the
    traceback of an exception that escaped the command. The command's flags are removed
    afterwards, so the next call defines them afresh.
    """
    before = set(flags.FLAGS)
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    argv = ["autocontext", *args]
    try:
        # ml_collections reads the --config.a.b overrides from sys.argv itself.
        with (
            mock.patch.object(sys, "argv", argv),
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            commands.main(argv)
    except SystemExit as stop:
        code = stop.code
    except Exception:  # an escaped error: the interpreter would print it and exit with 1
        stderr.write(traceback.format_exc())
        code = 1
    finally:
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()
    if isinstance(code, str):
        stderr.write(code + "\n")
        code = 1
    return CommandResult(code or 0, stdout.getvalue(), stderr.getvalue())


# A progress bar's update, "tiles:  40%|####      | 2/5 [00:01<00:01,  1.54tile/s]".
PROGRESS_LINE = re.compile(r"\|\s*\d+/\d+ \[")


def assert_one_line_error(result: CommandResult, expected: str) -> None:
    """The command failed with one line on standard error holding `expected`, no traceback.

    Progress bars (which a terminal redraws in place) are not lines of the message.
    """
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not PROGRESS_LINE.search(line)]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], result.stderr


@pytest.fixture(scope="session")
def tiny_run(tiny_phantom, tmp_path_factory) -> pathlib.Path:
    """The workdir of a tiny run trained for 2 steps on the tiny phantom, not evaluated."""
    config = make_tiny_config(tiny_phantom)
    config.train.steps = 2
    config.eval.at_end = False
    workdir = tmp_path_factory.mktemp("tiny_run")
    train(config, str(workdir))
    return workdir


def python_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS...` from the repository root, output captured."""
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)


# Fixtures that train a run, or strike one: a test that uses one is slow whatever its own
# time, so the fast tier (`pytest -m "not slow"`) never pays for them.
TRAINING_FIXTURES = frozenset(
    {"tiny_run", "trained_run", "run", "run_output", "two_checkpoints", "injector"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test that uses a fixture which trains a run."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
