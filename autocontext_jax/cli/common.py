"""What every command shares: its --help and --version, quiet library logging, one-line errors."""

from __future__ import annotations

import logging as std_logging
import os
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import jax
from absl import app, flags, logging

from autocontext_jax import __version__
from autocontext_jax.config import schema
from autocontext_jax.config.files import config_file_problem, shipped_configs
from autocontext_jax.config.schema import ConfigError
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.evaluation.ablation import AblationError
from autocontext_jax.evaluation.compare import ComparisonError
from autocontext_jax.evaluation.crossval import CrossValidationError
from autocontext_jax.evaluation.diagnose import DiagnoseError
from autocontext_jax.inference import MemberMismatchError, ModelFileError
from autocontext_jax.runtime.checkpointing import CheckpointError, SaveError
from autocontext_jax.runtime.memory import keep_freed_memory
from autocontext_jax.runtime.workdir_lock import WorkdirBusyError
from autocontext_jax.training.loop import DivergedError

T = TypeVar("T")
# absl's own --help exits with status 1 and lists only the flags of the __main__ module, which
# under a console script or `python -m autocontext_jax` is not the command's module.
HELP_OPTIONS = ("--help", "-h", "-?", "--helpshort")
VERSION_OPTION = "--version"
PLATFORMS = ("cpu", "gpu", "tpu")
# XLA's persistent compilation cache (`train --compilation_cache`), where this host's timed
# choice of convolution lowering is kept too (runtime/autotune.py); the commands that only
# segment read and write that choice here. Under $XDG_CACHE_HOME where it is set, as the
# freedesktop convention has it (~/.cache otherwise).
COMPILATION_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
    "autocontext_jax",
    "xla",
)
OVERRIDE_HELP = (
    "Any field of the config can be overridden: --config.a.b=value, e.g.\n"
    "    --config.train.steps=200 --config.pyramid.levels=3 --config.data.dir=/data/Task07"
)


class CommandError(Exception):
    """A command's own user error (a sweep file, a failed check); `prefix` starts its line."""

    prefix = "Error"


# The errors a user causes and can fix, each shown as one line "PREFIX: message" with exit
# status 1 by run_command; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (app.UsageError, "Usage"),
    (ConfigError, "Bad configuration"),
    (DatasetError, "Bad input"),
    # Both are CheckpointErrors, so they come first.
    (ModelFileError, "Bad model file"),
    (MemberMismatchError, "Cannot ensemble"),
    (CheckpointError, "Bad workdir"),
    (DivergedError, "Training stopped"),
    (SaveError, "Checkpoint not saved"),
    (WorkdirBusyError, "Workdir in use"),
    (ComparisonError, "Cannot compare"),
    (AblationError, "Cannot report the ablation"),
    (CrossValidationError, "Cannot cross-validate"),
    (DiagnoseError, "Cannot diagnose"),
)


def user_error_line(error: BaseException) -> str | None:
    """The one line a user error is shown as, or None for an error that is a bug."""
    if isinstance(error, CommandError):
        return f"{error.prefix}: {_one_line(error)}"
    for kind, prefix in USER_ERRORS:
        if isinstance(error, kind):
            hint = " (--help lists the flags)" if kind is app.UsageError else ""
            return f"{prefix}: {_one_line(error)}{hint}"
    return None


def _no_backend(error: Exception) -> bool:
    # JAX raises this at the first device use when the --platform has no device.
    return isinstance(error, RuntimeError) and "Unable to initialize backend" in str(error)


def no_arguments(argv: list[str]) -> None:
    """Refuse positional arguments a command does not take."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")


def checked_flag(check: Callable[[], T], flag: str | None = None) -> T:
    """What `check()` returns; its ValueError a usage error naming --FLAG.

    For flag values only the loaded run can judge, such as a label map's classes. Without
    `flag`, the message names the option itself (`tile_size=7: ...` is --tile_size).
    """
    try:
        return check()
    except ValueError as error:
        raise app.UsageError(f"--{flag}: {error}" if flag else f"--{error}") from error


def verbose() -> bool:
    """Whether library and JAX logs were asked for (--verbose, or absl's --verbosity)."""
    asked = "verbose" in flags.FLAGS and flags.FLAGS.verbose
    return bool(asked or flags.FLAGS["verbosity"].present)


class _NotOrbax(std_logging.Filter):
    """Drops Orbax's records: a failed background save is logged, with its traceback, by
    every thread that saw it, and the run raises the same error itself as one line. So
    are asyncio's "exception was never retrieved" records of Orbax's write tasks, which
    the same failure leaves behind when they are garbage-collected: a Task names its
    coroutine's file in the message, a gathering future only in its exception's traceback."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        orbax = f"{os.sep}orbax{os.sep}"
        if orbax in record.pathname:
            return False
        if record.name != "asyncio":
            return True
        if orbax in record.getMessage():
            return False
        error = record.exc_info[1] if record.exc_info else None
        frames = traceback.extract_tb(error.__traceback__) if error is not None else []
        return not any(orbax in frame.filename for frame in frames)


class _UserFormatter(std_logging.Formatter):
    """A record as a user reads it: `Warning: message` (`Error: ...`), no absl prefix."""

    def format(self, record: std_logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.capitalize()}: {text}"


def quiet_logging() -> None:
    """Library chatter (Orbax logs every save at INFO) only when asked for with --verbose."""
    if flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.INFO if verbose() else logging.WARNING)
    handler = logging.get_absl_handler()
    if not verbose() and not any(isinstance(f, _NotOrbax) for f in handler.filters):
        handler.addFilter(_NotOrbax())
    if not verbose():
        # absl's prefix (`W1206 10:00:00.123 4242 predict.py:85]`) is for developers; a user
        # reads "Warning: ...". --verbose keeps it, with the library logs it comes with.
        handler.setFormatter(_UserFormatter())


def quiet_start_up() -> None:
    """Hide JAX's start-up warnings (a missing libtpu, a GPU without CUDA jaxlib) unless
    --verbose is given: the command says which devices it uses."""
    if not verbose():
        std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.ERROR)


def use_platform(platform: str | None) -> None:
    """Run JAX on `platform` (cpu, gpu, tpu); nothing is touched yet (multihost joins first)."""
    if platform is not None:
        jax.config.update("jax_platforms", platform)


def parse_flags(argv: list[str]) -> list[str]:
    """Parse the flags as absl does, with every user error one line and asking for help no error.

    Passed to `app.run(main, flags_parser=parse_flags)`. A misspelt `--config.a.b` field
    and a config file that does not load would otherwise end in chained tracebacks.
    """
    problem = _config_file_problem(argv)
    if problem is not None:
        sys.exit(f"Bad --config: {problem}")
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
    # A --config of a config file (train, preprocess); the ablation's is a plain path.
    config_value = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config_value is not None and not isinstance(config_value, str):
        try:
            flags.FLAGS["config"].value.keys()
        except OSError as error:
            # ml_collections defers a failed load to the first use; its cause ends the text.
            cause = str(error.__cause__ or error).strip().splitlines()[-1].strip()
            sys.exit(f"Bad --config: {cause}")
    return remaining


def _config_file_problem(argv: list[str]) -> str | None:
    """Why the config file named by --config does not load, checked before absl parses it.

    ml_collections loads the file while parsing the flags and, with `--config.x=`
    overrides, again on their first use; a file that does not load ends either in chained
    tracebacks. Loaded here first, it is one line naming the file and the line.
    """
    flag = flags.FLAGS["config"] if "config" in flags.FLAGS else None
    # The ablation's --config is a plain path flag; a config file flag comes from ml_collections.
    if flag is None or not type(flag).__module__.startswith("ml_collections"):
        return None
    options = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    value = None
    for index, option in enumerate(options):
        if option.startswith("--config="):
            value = option.split("=", 1)[1]
        elif option == "--config" and index + 1 < len(options):
            value = options[index + 1]
    return None if value is None else config_file_problem(value)


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


def version_line() -> str:
    """The package's name and version, as `--version` prints it."""
    return f"autocontext-jax {__version__}"


def configs_help() -> str:
    """The shipped configs, one line each with the first line of its docstring."""
    configs = shipped_configs()
    if not configs:
        return "No configs/ folder beside this installation: pass the path of your own file."
    folder = configs[0][0].parent
    lines = [f"Shipped configs ({folder}):"]
    for path, summary in configs:
        relative = os.path.relpath(path) if path.is_relative_to(os.getcwd()) else str(path)
        lines.append(f"    {relative:<28} {summary}")
    return "\n".join(lines)


def _flag_line(flag: flags.Flag) -> str:
    boolean = isinstance(flag, flags.BooleanFlag)
    name = f"--[no]{flag.name}" if boolean else f"--{flag.name}"
    shown = flag.default not in (None, "") and not (boolean and not flag.default)
    default = f" (default: {flag.default_as_str})" if shown else ""
    return textwrap.fill(
        f"{name}: {flag.help}{default}", 96, initial_indent="  ", subsequent_indent="      "
    )


def command_help(doc: str, defined: Sequence[flags.Flag], takes_config: bool) -> str:
    """A command's --help: its docstring (with examples), configs, override syntax, the config's
    fields (from the schema) and the flags."""
    parts = [doc.strip()]
    if takes_config:
        parts += [OVERRIDE_HELP, configs_help(), "\n".join(schema.help_lines())]
    lines = ["Flags:", *(_flag_line(flag) for flag in defined)]
    if any(flag.name == "platform" for flag in defined):
        lines.append(
            "  (--platform is JAX's JAX_PLATFORMS variable: JAX_PLATFORMS=cpu autocontext ... "
            "does the same)"
        )
    lines.append("  (--verbose is absl's --verbosity=0, which works too)")
    lines.append(f"  {VERSION_OPTION}: print the version; --helpfull: every flag, absl's too")
    parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _without_closed_loop_noise(hook: Callable) -> Callable:
    """`hook`, silent for the "Event loop is closed" errors of TensorStore's callbacks.

    When an Orbax save fails (a full disk), its event loop closes while TensorStore's
    writes still finish; each one's callback then fails and TensorStore prints it through
    sys.excepthook, hundreds of tracebacks around the one line the run prints itself.
    """

    def filtered(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        hook(kind, value, traceback)

    return filtered


def _without_closed_loop_unraisable(hook: Callable) -> Callable:
    """`hook` (sys.unraisablehook), silent for the same "Event loop is closed" errors, which
    TensorStore's callbacks also report as unraisable."""

    def filtered(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        hook(unraisable)

    return filtered


def run_command(
    doc: str,
    define_flags: Callable[[], None],
    main: Callable[[list[str]], None],
    argv: Sequence[str] | None = None,
    takes_config: bool = False,
    computes: bool = False,
) -> None:
    """Define the command's flags, answer --help and --version (status 0), else run `main`.

    A command that `computes` also takes --platform, applied before `main` touches JAX.
    Every user error `main` raises (USER_ERRORS, CommandError) ends the command with one
    line on standard error and exit status 1; any other exception is a bug and shows its
    traceback.
    """
    argv = list(sys.argv if argv is None else argv)
    before = set(flags.FLAGS)
    define_flags()
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Show library and JAX logs (hidden by default).")
    if computes:
        flags.DEFINE_enum(
            "platform",
            None,
            PLATFORMS,
            "Compute on this platform (default: JAX's choice, the best one installed).",
        )
    defined = {id(flags.FLAGS[name]): flags.FLAGS[name] for name in flags.FLAGS}
    defined = [flag for flag in defined.values() if flag.name not in before]
    options = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    if any(option in HELP_OPTIONS for option in options):
        print(command_help(doc, defined, takes_config), end="")
        sys.exit(0)
    if VERSION_OPTION in options:
        print(version_line())
        sys.exit(0)

    def start(remaining: list[str]) -> None:
        quiet_start_up()
        if computes:
            # Before JAX starts its backends, so that XLA's threads share the one arena.
            keep_freed_memory()
            use_platform(flags.FLAGS.platform)
        previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook
        if not verbose():
            sys.excepthook = _without_closed_loop_noise(previous_hook)
            sys.unraisablehook = _without_closed_loop_unraisable(previous_unraisable)
        try:
            main(remaining)
        except Exception as error:
            line = user_error_line(error)
            if line is None and computes and _no_backend(error):
                line = f"--platform={flags.FLAGS.platform}: {str(error).splitlines()[0]}"
            if line is None:
                raise
            # absl would print a UsageError after the __main__ module's docstring and flags.
            sys.exit(line)
        finally:
            sys.excepthook = previous_hook
            sys.unraisablehook = previous_unraisable

    app.run(start, argv=argv, flags_parser=parse_flags)
