"""Diagnose a run's context: the finest level on real, true, uniform and training-mode context.

    autocontext diagnose --workdir runs/default [--train_cases 6]

On the run's held-out cases the finest level is given, in turn, the coarser level's real
softmax (the evaluation's), the reference labels as class fractions (a perfect coarser
level), a uniform 1/K (no information) and the context the train step computes (BatchNorm
batch statistics, the last parameters); then every level is scored on training and
held-out cases. Prints the two Dice tables and writes WORKDIR/diagnose.md and
diagnose.json (autocontext_jax/evaluation/diagnose.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from autocontext_jax.cli.common import COMPILATION_CACHE, no_arguments, quiet_logging, run_command
from autocontext_jax.evaluation.diagnose import (
    JSON_FILE,
    MARKDOWN_FILE,
    diagnose_workdir,
)
from autocontext_jax.inference import load_run, with_host_lowering
from autocontext_jax.runtime.progress import say

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_string("workdir", None, "A trained run's workdir.", required=True)
    flags.DEFINE_integer(
        "train_cases", 6, "Score every level on the first N training cases too (0: none)."
    )


def main(argv: list[str]) -> None:
    """Diagnose the run's newest checkpoint, print the tables, write them into the workdir."""
    no_arguments(argv)
    quiet_logging()
    run = with_host_lowering(load_run(FLAGS.workdir), COMPILATION_CACHE, say)
    _, text = diagnose_workdir(run, FLAGS.train_cases)
    print(text)
    print(f"Wrote {MARKDOWN_FILE} and {JSON_FILE} into {FLAGS.workdir}")


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv, computes=True)


if __name__ == "__main__":
    run()
