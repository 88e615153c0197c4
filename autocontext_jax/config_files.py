"""Config files by path: what configs use to build on one another, and scripts to load them."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`, from any working directory."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
