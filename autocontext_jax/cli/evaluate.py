"""Evaluate a trained run: `python -m autocontext_jax.evaluate --workdir RUN [--data DIR]`.

Scores the run's newest checkpoint on its held-out cases (or every case of another
dataset) and writes eval_cases.json and eval_summary.{md,csv,json} into the workdir.
"""

from __future__ import annotations

from absl import app, flags

from autocontext_jax.cli.common import fail, no_arguments, quiet_logging
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


def run() -> None:
    """Entry point of the command."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
