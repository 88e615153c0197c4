"""Evaluated runs side by side, per organ and level, with paired Wilcoxon p-values.

    autocontext compare RUN_A RUN_B ... [--metric dice] [--all_levels]

Each RUN is a workdir holding eval_cases.json (written at the end of training or by
`autocontext evaluate`); the first is the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from autocontext_jax.cli.common import run_command
from autocontext_jax.evaluation.compare import (
    compare,
    comparison_markdown,
    load_result,
    run_names,
)
from autocontext_jax.evaluation.metrics import METRIC_NAMES
from autocontext_jax.runtime import environment

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_enum("metric", "dice", METRIC_NAMES, "Which metric to compare.")
    flags.DEFINE_bool(
        "all_levels", False, "A column for every pyramid level, not only each run's finest."
    )


def main(argv: list[str]) -> None:
    """Print the comparison of the workdirs given as arguments."""
    workdirs = argv[1:]
    if len(workdirs) < 2:
        raise app.UsageError("give at least two run workdirs, the baseline first")
    results = {name: load_result(w) for name, w in zip(run_names(workdirs), workdirs, strict=True)}
    comparison = compare(results, FLAGS.metric, FLAGS.all_levels)
    note = environment.mixed_stacks_note(dict(zip(results, workdirs, strict=True)))
    print((f"**{note}**\n\n" if note else "") + comparison_markdown(comparison))


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv)


if __name__ == "__main__":
    run()
