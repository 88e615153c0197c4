"""The `autocontext` command (and `python -m autocontext_jax`): one subcommand per stage.

    autocontext train --config configs/default.py --workdir runs/default
    autocontext predict --workdir runs/default --input imagesTs --output segs --labels labelsTs
    autocontext SUBCOMMAND --help

Each subcommand is the module of the same name in cli/ (train is cli/train.py, which
`python -m autocontext_jax.main` also runs); this module only picks it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType

from autocontext_jax.cli import (
    ablation,
    check,
    compare,
    diagnose,
    evaluate,
    export,
    phantom,
    plot,
    predict,
    preprocess,
    sweep,
    train,
)
from autocontext_jax.cli.common import HELP_OPTIONS, VERSION_OPTION, version_line

PROGRAM = "autocontext"
# In pipeline order; the first docstring line of each module is its summary.
COMMANDS: dict[str, ModuleType] = {
    "phantom": phantom,
    "preprocess": preprocess,
    "train": train,
    "export": export,
    "predict": predict,
    "evaluate": evaluate,
    "diagnose": diagnose,
    "plot": plot,
    "compare": compare,
    "sweep": sweep,
    "ablation": ablation,
    "check": check,
}


def overview() -> str:
    """The list of subcommands with their one-line summaries, and how to get each one's help."""
    lines = [f"usage: {PROGRAM} SUBCOMMAND [flags]   ({PROGRAM} SUBCOMMAND --help for its own)", ""]
    for name, module in COMMANDS.items():
        lines.append(f"  {name:<11} {module.__doc__.strip().splitlines()[0]}")
    lines += ["", f"  {VERSION_OPTION:<11} print the version", ""]
    lines.append(f"Example: {PROGRAM} train --config configs/default.py --workdir runs/default")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the subcommand named by argv[1] with the rest of the command line."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in HELP_OPTIONS:
        print(overview())
        sys.exit(0 if len(argv) >= 2 else 2)
    if argv[1] == VERSION_OPTION:
        print(version_line())
        sys.exit(0)
    name = argv[1]
    if name not in COMMANDS:
        sys.exit(f"{PROGRAM}: unknown subcommand {name!r}; one of {', '.join(COMMANDS)}")
    COMMANDS[name].run([f"{PROGRAM} {name}", *argv[2:]])
