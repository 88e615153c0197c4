"""A checkpoint's manifest of file sizes and sha256 digests: written before it commits, checked
before it is restored, so a damaged, truncated or incomplete checkpoint is named, not loaded.

Orbax detects neither: bytes overwritten in a data file restore as wrong values without an
error, and a missing or truncated file ends in an error that does not say which file.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

from autocontext_jax.data.atomic import write_json_atomically

MANIFEST_FILE = "sha256.json"
# Orbax rewrites its step metadata (the commit time) after the manifest is written, and
# restoring does not depend on it.
UNCHECKED_FILES = frozenset({MANIFEST_FILE, "_CHECKPOINT_METADATA"})


def _digest(path: pathlib.Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _checked_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name not in UNCHECKED_FILES and not p.name.startswith(".")
    )


def write_manifest(folder: pathlib.Path) -> None:
    """Record the size and sha256 of every file under `folder` in folder/sha256.json."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _digest(p)}
        for p in _checked_files(folder)
    }
    write_json_atomically(folder / MANIFEST_FILE, {"files": files})


def has_manifest(folder: pathlib.Path) -> bool:
    """Whether the checkpoint in `folder` was saved with a manifest."""
    return (folder / MANIFEST_FILE).is_file()


def find_damage(folder: pathlib.Path) -> str | None:
    """What is wrong with the files of the checkpoint in `folder`, or None if they are intact.

    A checkpoint without a manifest (saved before manifests existed) cannot be checked: None.
    """
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST_FILE} is unreadable ({type(error).__name__})"
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is truncated or changed ({size} of {expected['bytes']} bytes)"
        if _digest(file) != expected["sha256"]:
            return f"{name} is damaged (its sha256 differs from the one saved)"
    return None
