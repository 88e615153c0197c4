"""Preprocess a dataset into its cache: `python -m autocontext_jax.preprocess --config F`.

Training does the same on its own when the cache is missing or stale; running it first
reports bad files before any model is built.
"""

from __future__ import annotations

import sys

from absl import app, logging
from ml_collections import config_flags

from autocontext_jax.config_checks import ConfigError, validate_config
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data import preprocess
from autocontext_jax.train import ensure_dataset

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")


def main(argv: list[str]) -> None:
    """Preprocess every case of the configured dataset, skipping those already current."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/default.py")
    try:
        # The device count only matters to the batch size, which preprocessing ignores.
        validate_config(config, 1)
    except ConfigError as error:
        sys.exit(f"Bad configuration: {error}")
    logging.set_verbosity(logging.WARNING)
    try:
        ensure_dataset(config.data)
        files = dataset_lib.list_dataset(config.data)
        train_files, _ = dataset_lib.split_cases(files, config.data.num_val_cases, config.seed)
        plan, cached = preprocess.ensure_preprocessed(config, files, train_files)
    except dataset_lib.DatasetError as error:
        sys.exit(f"Bad dataset: {error}")
    print(
        f"{len(cached)} of {len(files)} cases preprocessed in "
        f"{preprocess.cache_dir(config.data)}: spacing {plan.target_spacing} mm, "
        f"HU clip {plan.clip}, mean {plan.mean:.1f}, std {plan.std:.1f}"
    )


if __name__ == "__main__":
    app.run(main)
