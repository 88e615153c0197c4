"""Preprocess a dataset into its cache, before training.

    autocontext preprocess --config configs/totalseg_example.py

Training does the same on its own when the cache is missing or stale; running it first
reports bad files before any model is built. The plan comes from the training cases of
the run's own split (`data.split_seed`), as in training.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from autocontext_jax.cli.common import no_arguments, quiet_logging, run_command
from autocontext_jax.config.schema import fit_to_run_length, validate_config
from autocontext_jax.data.cache import cache_dir
from autocontext_jax.prepare import preprocess_dataset

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file.")


def main(argv: list[str]) -> None:
    """Preprocess every case of the configured dataset, skipping those already current."""
    no_arguments(argv)
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/default.py")
    # Training would fit a short run's intervals (and say so); the cache does not care.
    config, _ = fit_to_run_length(config)
    # The device count only matters to the batch size, which preprocessing ignores.
    validate_config(config, 1)
    quiet_logging()
    plan, cached, train_files, val_files = preprocess_dataset(config)
    print(
        f"{len(cached)} of {len(train_files) + len(val_files)} cases preprocessed in "
        f"{cache_dir(config.data)}: spacing {plan.target_spacing} mm, "
        f"HU clip {plan.clip}, mean {plan.mean:.1f}, std {plan.std:.1f}"
    )


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv, takes_config=True)


if __name__ == "__main__":
    run()
