"""Write a synthetic phantom dataset (MSD / nnU-Net layout) and print its dataset.json.

    autocontext phantom --out data/phantom --num_cases 30

Each case is drawn from its own stream of --seed, so the dataset does not depend on --workers.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from absl import app, flags

from autocontext_jax.cli.common import run_command
from autocontext_jax.phantom import write_phantom_dataset


def define_flags() -> None:
    """Define the command's flags."""
    flags.DEFINE_string("out", None, "Output dataset folder.")
    flags.DEFINE_integer("num_cases", None, "Number of cases to write.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Random seed of the dataset.")
    flags.DEFINE_integer("workers", 1, "Processes writing cases in parallel.", lower_bound=1)
    flags.mark_flags_as_required(["out", "num_cases"])


def main(argv: list[str]) -> None:
    """Write a phantom dataset and print the path of its dataset.json."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    if pathlib.Path(values.out).exists() and not pathlib.Path(values.out).is_dir():
        raise app.UsageError(f"--out={values.out}: is a file, not a folder")
    path = write_phantom_dataset(values.out, values.num_cases, values.seed, workers=values.workers)
    print(path)


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv)


if __name__ == "__main__":
    run()
