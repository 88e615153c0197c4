"""Export trained runs as one model file that predict, evaluate and check use as a workdir.

    autocontext export --workdir runs/default --output model.zip
    autocontext export --workdir runs/fold0 --workdir runs/fold1 --output folds.zip --step 400
    autocontext predict --model model.zip --input ct.nii.gz --output seg.nii.gz

The zip holds only what inference needs, per run: the variables it evaluates (the
parameter average when it trained with one, and the BatchNorm statistics) as numpy
arrays, its config, plan, label names and environment record, and a manifest with the
package version and the SHA-256 of every file. Several runs of one config (the folds of
a cross-validation) become one file whose members predict as an ensemble; runs whose
plan, classes or label map differ are refused. An existing file is never replaced.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from absl import app, flags

from autocontext_jax.cli.common import no_arguments, quiet_logging, run_command
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.inference import Model, export_model, load_run
from autocontext_jax.inference.export import MODEL_SUFFIX

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_multi_string(
        "workdir", [], "A training run's folder; repeat it to export an ensemble's members."
    )
    flags.DEFINE_string("output", None, f"The model file to write (ends in {MODEL_SUFFIX}).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: each run's newest).")


def check_output(output: pathlib.Path) -> None:
    """Refuse an output that is not a new .zip in a writable folder."""
    if output.suffix != MODEL_SUFFIX:
        raise DatasetError(f"{output}: a model file's name ends in {MODEL_SUFFIX}")
    if output.exists():
        raise DatasetError(f"{output}: exists; remove it or choose another --output")
    if not output.parent.is_dir():
        raise DatasetError(f"{output}: no such folder {output.parent}")


def main(argv: list[str]) -> None:
    """Load every --workdir run, check that they agree, write the model file."""
    no_arguments(argv)
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if FLAGS.output is None:
        raise app.UsageError("--output is required")
    quiet_logging()
    output = pathlib.Path(FLAGS.output)
    check_output(output)
    model = Model(tuple(load_run(workdir, FLAGS.step) for workdir in FLAGS.workdir))
    export_model(model.members, output)
    size = output.stat().st_size
    print(f"Wrote {output}: {model.description()} ({size / 2**20:.2f} MiB)")


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv, computes=True)


if __name__ == "__main__":
    run()
