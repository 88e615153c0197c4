"""Python files by path: config files (which build on one another) and sweep files."""

from __future__ import annotations

import importlib.util
import os
import pathlib
from types import ModuleType

import ml_collections


def load_python_file(path: str | os.PathLike) -> ModuleType:
    """The module defined by the Python file at `path`, from any working directory."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"file_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`, from any working directory."""
    return load_python_file(path).get_config()
