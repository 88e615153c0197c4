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


def parse_flags(argv: list[str]) -> list[str]:
    """Parse the flags as absl does, with every user error one line and asking for help no error.

    Passed to `app.run(main, flags_parser=parse_flags)`. A misspelt `--config.a.b` field
    and a config file that does not load would otherwise end in chained tracebacks.
    """
    try:
        remaining = flags.FLAGS(argv)
    except SystemExit as stop:
        # absl's --help, --helpshort and --helpfull print the help, then exit with 1.
        asked = any(
            arg.lstrip("-").split("=")[0] in ("help", "?", "helpshort", "helpfull")
            for arg in argv[1:]
            if arg.startswith("-")
        )
        sys.exit(0 if asked else stop.code)
    except flags.Error as error:
        sys.exit(f"Bad flag: {_one_line(error)} (--helpfull lists the flags)")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        sys.exit(f"Bad configuration override: {_one_line(error)}")
    if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
        try:
            flags.FLAGS["config"].value.keys()
        except OSError as error:
            # ml_collections defers a failed load to the first use; its cause ends the text.
            cause = str(error.__cause__ or error).strip().splitlines()[-1].strip()
            sys.exit(f"Bad --config: {cause}")
    return remaining


def _one_line(error: BaseException) -> str:
    # ml_collections wraps a KeyError ("'stepz'\nDid you mean ...") in AttributeErrors,
    # and each str() escapes the one inside: unwrap to the innermost text.
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    return " ".join(text.split())


def fail(prefix: str, error: Exception) -> NoReturn:
    """Exit with status 1 and one line `PREFIX: message` on standard error, no traceback."""
    sys.exit(f"{prefix}: {error}")
