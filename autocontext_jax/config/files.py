"""Python files by path: config files (which build on one another) and sweep files."""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
from types import ModuleType

import ml_collections

# The configs/ folder of the checkout this package runs from (an editable install or a clone).
SHIPPED_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


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


def shipped_configs() -> list[tuple[pathlib.Path, str]]:
    """(path, first docstring line) of every config in the checkout's configs/ folder."""
    found = []
    for path in sorted(SHIPPED_CONFIGS.glob("*.py")):
        # Read the docstring without running the file: listing configs must not fail on one.
        try:
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        except (OSError, SyntaxError, ValueError):
            docstring = ""
        found.append((path, docstring.strip().split("\n")[0]))
    return found
