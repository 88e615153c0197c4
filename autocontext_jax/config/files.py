"""Python files by path: config files (which build on one another) and sweep files."""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import traceback
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


def config_file_problem(value: str) -> str | None:
    """Why the config file `--config=value` does not load, as `FILE:LINE: message`, or None.

    `value` is a path, optionally followed by `:ARGUMENT` for `get_config(ARGUMENT)`, as
    ml_collections reads it. The line is the config file's own: of a syntax error, or of
    the statement of the file that raised (a config file runs code).
    """
    path_text, _, argument = value.partition(":")
    path = pathlib.Path(path_text)
    if not path.is_file():
        return f"{path}: no such file"
    try:
        module = load_python_file(path)
        if not callable(getattr(module, "get_config", None)):
            return f"{path}: defines no get_config()"
        config = module.get_config(*([argument] if argument else []))
    except SyntaxError as error:
        return f"{path}:{error.lineno}: {error.msg}"
    except Exception as error:  # a config file may raise anything; it is shown, not raised
        frames = traceback.extract_tb(error.__traceback__)
        mine = [frame for frame in frames if pathlib.Path(frame.filename) == path.absolute()]
        mine = mine or [frame for frame in frames if frame.filename == str(path)]
        where = f"{path}:{mine[-1].lineno}" if mine else str(path)
        message = " ".join(str(error).split())
        return f"{where}: {type(error).__name__}: {message}" if message else f"{where}: {error!r}"
    if not isinstance(config, ml_collections.ConfigDict):
        return f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict"
    return None


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
