"""Evaluate a trained run on its held-out cases or on another dataset.

    autocontext evaluate --workdir runs/default [--data DIR]

Scores the run's newest checkpoint on its held-out cases (or every case of another
dataset) and writes eval_cases.json and eval_summary.{md,csv,json} into the workdir.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from autocontext_jax.cli.common import fail, no_arguments, quiet_logging, run_command
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.evaluation.evaluate import evaluate_workdir
from autocontext_jax.evaluation.reports import summary_markdown
from autocontext_jax.inference import CheckpointError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
    flags.DEFINE_string(
        "data", None, "Evaluate every case of this dataset instead of the run's held-out cases."
    )
    flags.DEFINE_float(
        "nsd_tolerance_mm", None, "Surface Dice tolerance in mm (default: the run's config)."
    )


def main(argv: list[str]) -> None:
    """Evaluate a finished (or running) training workdir."""
    no_arguments(argv)
    quiet_logging()
    try:
        result = evaluate_workdir(FLAGS.workdir, FLAGS.data, FLAGS.nsd_tolerance_mm)
    except (CheckpointError, DatasetError) as error:
        fail("Cannot evaluate", error)
    print(summary_markdown(result))
    print(f"Wrote eval_cases.json and eval_summary.{{md,csv,json}} into {FLAGS.workdir}")


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv)


if __name__ == "__main__":
    run()
