"""Shared fixtures: tiny configs and a tiny phantom dataset, built once per session."""

from __future__ import annotations

import pathlib
import struct

import ml_collections
import pytest
from tensorboardX.proto import event_pb2

from autocontext_jax import phantom
from autocontext_jax.config_files import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_PHANTOM_SHAPE = (48, 40, 32)
TINY_PHANTOM_SPACING = (4.0, 4.0, 4.0)


def load_config(name: str) -> ml_collections.ConfigDict:
    """The config of configs/NAME.py, loaded by path as the command line does."""
    return load_config_file(REPO / "configs" / f"{name}.py")


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
    return config


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
