"""Pictures of a run: slices with every level's prediction, and the training curves.

    autocontext plot --workdir runs/default [--case ID] [--data DIR]

Writes WORKDIR/plots/CASE_axial.png, CASE_coronal.png and training_curves.png. Needs
matplotlib (`pip install -e ".[plot]"`); training does not.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from autocontext_jax.cli.common import (
    COMPILATION_CACHE,
    fail,
    no_arguments,
    quiet_logging,
    run_command,
)
from autocontext_jax.evaluation.figures import plot_run

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
    flags.DEFINE_string("case", None, "Case id to show (default: the first held-out one).")
    flags.DEFINE_string("data", None, "Take the case from this dataset instead.")


def main(argv: list[str]) -> None:
    """Write the run's PNGs and print their paths."""
    no_arguments(argv)
    quiet_logging()
    try:
        paths = plot_run(FLAGS.workdir, FLAGS.case, FLAGS.data, COMPILATION_CACHE)
    except ImportError as error:
        # matplotlib is an optional extra; the message says how to install it.
        fail("Cannot plot", error)
    for path in paths:
        print(path)


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv, computes=True)


if __name__ == "__main__":
    run()
