"""One training run per workdir: an OS lock on WORKDIR/train.lock, held for the run's life.

The lock is `fcntl.flock` on the file, which the kernel releases when its holder dies,
however it dies: a lock left by a killed run is free, and is taken over with a note. The
file names the holder (PID, host, start time) so that a refused run can say who holds it.
`evaluate`, `predict` and `plot` only read a workdir and never take the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
from collections.abc import Iterator

LOCK_FILE = "train.lock"


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir's lock; the message names its PID and host."""


def _describe(holder: dict) -> str:
    return (
        f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}"
    )


def _read_holder(stream) -> dict:
    stream.seek(0)
    try:
        holder = json.loads(stream.read() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[str | None]:
    """Hold the workdir's lock while the block runs; yields a note if a dead run's was taken.

    Raises WorkdirBusyError if a live process holds it.
    """
    path = pathlib.Path(workdir) / LOCK_FILE
    # Opened without truncating: the holder's record is read before it is replaced. The
    # lock is on this file itself, so it is written in place, not through data.atomic
    # (a renamed file would be another file, unlocked).
    with open(path, "a+") as stream:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusyError(
                f"{path}: another run is training in this workdir "
                f"({_describe(_read_holder(stream))}); wait for it to end or use another "
                "--workdir"
            ) from None
        try:
            previous = _read_holder(stream)
            # A run that ended cleanly leaves the file empty: a record left is a dead run's.
            note = (
                f"Note: took over {path} from {_describe(previous)}, which is no longer running"
                if previous
                else None
            )
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            }
            stream.seek(0)
            stream.truncate()
            stream.write(json.dumps(me) + "\n")
            stream.flush()
            yield note
        finally:
            stream.seek(0)
            stream.truncate()
            stream.flush()
            fcntl.flock(stream, fcntl.LOCK_UN)
