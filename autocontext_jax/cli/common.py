"""What every command shares: quiet library logging, and its one-line errors."""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import app, flags, logging


def no_arguments(argv: list[str]) -> None:
    """Refuse positional arguments a command does not take."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")


def quiet_logging() -> None:
    """Library chatter (Orbax logs every save at INFO) only when asked for with --verbosity."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def fail(prefix: str, error: Exception) -> NoReturn:
    """Exit with status 1 and one line `PREFIX: message` on standard error, no traceback."""
    sys.exit(f"{prefix}: {error}")
