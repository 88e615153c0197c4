"""The one way files are written: under a temporary name in their folder, then renamed.

A reader (or a run killed mid-write) never sees half a file, and an existing file is never
left half-overwritten. The temporary name is unique per writer, so several processes or
hosts may write into one folder, and it keeps the real suffix, which nibabel and numpy
read the format from.
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from collections.abc import Callable
from typing import Any


def write_atomically(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """Call `write(temporary)` for a temporary path beside `path`, flush it to disk, rename."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{uuid.uuid4().hex[:12]}.{path.name}")
    try:
        write(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    write_atomically(path, lambda temporary: temporary.write_text(text))


def write_json_atomically(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """Write `data` as JSON (and a final newline) to `path` atomically."""
    write_text_atomically(path, json.dumps(data, indent=indent) + "\n")
