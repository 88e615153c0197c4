"""Train and evaluate an auto-context pyramid: `python -m autocontext_jax.main --config F`."""

from __future__ import annotations

import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from autocontext_jax import multihost, train
from autocontext_jax.config_checks import ConfigError, validate_config
from autocontext_jax.models import build_pyramid

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Build the model, print the config and parameter counts, and exit."
)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join the other workers of a TPU slice (a SLURM job is detected)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 of a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, from 0.")

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.path.join(os.path.expanduser("~"), ".cache", "autocontext_jax", "xla"),
    "Folder of XLA's persistent compilation cache, so a rerun of the same shapes starts "
    "at once ('' turns it off).",
)


def enable_compilation_cache(folder: str) -> None:
    """Keep compiled programs on disk so the next run of the same shapes skips compiling."""
    if not folder:
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    # The train step and evaluation are worth caching; tiny helper programs are not.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def describe_model(config: ml_collections.ConfigDict) -> str:
    """The resolved config and the parameter count of every pyramid level."""
    model = build_pyramid(config)
    variables = jax.eval_shape(lambda: train.init_variables(model, config.seed))
    lines = [str(config), "Parameters per pyramid level:"]
    for level in range(1, config.pyramid.levels + 1):
        count = train.count_parameters(variables["params"][f"level_{level}"])
        factor = 2 ** (config.pyramid.levels - level + 1)
        channels = model.level_in_channels(level)
        lines.append(
            f"  level {level}: downsample x{factor}, {channels} input channel"
            f"{'s' if channels > 1 else ''}, {count:,} parameters ({count / 1e6:.2f} M)"
        )
    total = train.count_parameters(variables["params"])
    lines.append(f"  total: {total:,} parameters ({total / 1e6:.2f} M)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Validate the config, then dry-run or train and evaluate."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        multihost.initialize(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _MULTIHOST.value
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/default.py")
    try:
        validate_config(config, jax.device_count())
    except ConfigError as error:
        sys.exit(f"Bad configuration: {error}")
    if _DRY_RUN.value:
        print(describe_model(config))
        return
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save at INFO; the progress bar says what the user needs.
        logging.set_verbosity(logging.WARNING if jax.process_index() == 0 else logging.ERROR)
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required to train, e.g. --workdir runs/default")
    enable_compilation_cache(_COMPILATION_CACHE.value)
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
