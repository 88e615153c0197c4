"""Train and evaluate an auto-context pyramid.

    autocontext train --config configs/default.py --workdir runs/default
    autocontext train --config configs/default.py --workdir runs/s3 --config.pyramid.levels=3
    autocontext train --config configs/paper.py --dry_run   # parameter counts, no training

(`python -m autocontext_jax.main ...` is the same command.)

Trains in the workdir (resuming from its newest checkpoint), validating a few held-out
cases every `eval.every` steps, then evaluates the held-out cases through the same road
from scan to labels as `predict`.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from autocontext_jax.cli.common import COMPILATION_CACHE, quiet_logging, run_command, verbose
from autocontext_jax.config.schema import fit_to_run_length, validate_config
from autocontext_jax.data.dataset import read_split
from autocontext_jax.data.sampling import downsample_factor
from autocontext_jax.evaluation.evaluate import evaluate_run, held_out_cases
from autocontext_jax.evaluation.reports import CASES_FILE, summary_markdown
from autocontext_jax.evaluation.validation import make_validator
from autocontext_jax.inference import load_run
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.init import abstract_variables
from autocontext_jax.runtime import autotune, multihost
from autocontext_jax.runtime.checkpointing import CHECKPOINTS_DIR
from autocontext_jax.runtime.logs import METRICS_FILE, TENSORBOARD_DIR
from autocontext_jax.runtime.preemption import StoppedBySignalError
from autocontext_jax.runtime.progress import parameter_lines, say
from autocontext_jax.training.loop import train

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    config_flags.DEFINE_config_file(
        "config", None, "Path of a config file (required), e.g. configs/default.py."
    )
    flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results.")
    flags.DEFINE_bool(
        "dry_run", False, "Build the model, print the config and parameter counts, and exit."
    )
    flags.DEFINE_bool(
        "multihost", False, "Join the other workers of a TPU slice (a SLURM job is detected)."
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 of a multi-process run."
    )
    flags.DEFINE_integer("num_processes", None, "Processes of the run.")
    flags.DEFINE_integer("process_id", None, "This process's index, from 0.")
    flags.DEFINE_string(
        "compilation_cache",
        COMPILATION_CACHE,
        "Folder of XLA's persistent compilation cache, so a rerun of the same shapes starts "
        "at once, and of this host's timed choice of convolution lowering for "
        "model.conv_impl=auto ('' turns both off: auto is then not timed).",
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
    params = abstract_variables(model)["params"]
    lines = [str(config), "Parameters per pyramid level:"]
    lines += [f"  {line}" for line in parameter_lines(model, params)]
    return "\n".join(lines)


def end_message(config: ml_collections.ConfigDict, workdir: str, step: int, evaluated: bool) -> str:
    """What training says last: the final level, where the results are, what to run next."""
    levels = config.pyramid.levels
    folder = shlex.quote(workdir)
    path = pathlib.Path(workdir)
    steps = sorted(int(p.name) for p in (path / CHECKPOINTS_DIR).iterdir() if p.name.isdigit())
    reports = (
        f"{path / 'eval_summary.md'} (also .csv, .json), per case {path / CASES_FILE}"
        if evaluated
        else f"none (eval.at_end is off or no case is held out): autocontext evaluate "
        f"--workdir {folder}"
    )
    return "\n".join(
        [
            f"Finished step {step} in {workdir}",
            f"  final output: level {levels} of {levels}, the finest (downsample "
            f"x{downsample_factor(levels, levels)}, brought back onto each scan's grid); "
            f"predict writes it and the reports' last tables score it",
            f"  checkpoints: {path / CHECKPOINTS_DIR} (steps {', '.join(map(str, steps))}; "
            f"predict reads the newest)",
            f"  reports: {reports}",
            f"  logs: {path / METRICS_FILE}, {path / TENSORBOARD_DIR} "
            f"(tensorboard --logdir {folder})",
            f"  next: autocontext predict --workdir {folder} --input CT.nii.gz --output seg.nii.gz",
            f"        autocontext plot --workdir {folder}   (slices and training curves)",
        ]
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, compilation_cache: str = ""
) -> dict[str, Any]:
    """Train in `workdir` (resuming if it holds a checkpoint), then evaluate the held-out cases.

    Training resolves `model.conv_impl` for this host (`auto`: timed once per host and
    shapes, the choice kept in `compilation_cache`: runtime/autotune.py) and validates in
    that lowering. Every `eval.every` steps the first `eval.num_cases` held-out cases are
    validated (`evaluation.validation`). The evaluation at the end loads the run back from
    its workdir (`inference.load_run`) and segments every held-out case as `predict` would,
    in the lowering training ran; its reports go to the workdir.
    """
    validate = make_validator(workdir, config.eval.num_cases) if config.eval.every else None
    step = train(config, workdir, validate, compilation_cache)
    result: dict[str, Any] = {"step": step}
    evaluated = bool(config.eval.at_end and read_split(workdir)["val"])
    if evaluated:
        # Training kept its choice in the cache (or had none to keep): read back, not timed.
        conv_impl = autotune.resolve_lowering(config, compilation_cache, say=say).conv_impl
        run = load_run(workdir, conv_impl=conv_impl)
        scores = evaluate_run(run, held_out_cases(run), tensorboard=True)
        result["dice"] = scores
        if jax.process_index() == 0:
            print(summary_markdown(scores))
    if jax.process_index() == 0:
        print(end_message(config, workdir, step, evaluated), flush=True)
    return result


def main(argv: list[str]) -> None:
    """Validate the config, then dry-run or train and evaluate."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Before the first JAX call: probing for backends logs at INFO.
    quiet_logging()
    try:
        multihost.initialize(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.multihost
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/default.py")
    config, notes = fit_to_run_length(config)
    if jax.process_index() == 0:
        for note in notes:
            print(note, flush=True)
    validate_config(config, jax.device_count())
    if FLAGS.dry_run:
        print(describe_model(config))
        return
    if not verbose() and jax.process_index() != 0:
        # Orbax logs every save at INFO; the progress bar of process 0 says what is needed.
        logging.set_verbosity(logging.ERROR)
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required to train, e.g. --workdir runs/default")
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
        raise app.UsageError(f"--workdir={FLAGS.workdir}: is a file, not a folder")
    enable_compilation_cache(FLAGS.compilation_cache)
    # A bad dataset or workdir, a diverged run or a failed save is one line
    # (cli.common.USER_ERRORS); a stop by a signal says how to resume.
    try:
        train_and_evaluate(config, FLAGS.workdir, FLAGS.compilation_cache)
    except StoppedBySignalError as stopped:
        if jax.process_index() == 0:
            # The same command resumes: the run continues from its workdir's checkpoint.
            print(
                f"Training {stopped}. Resume with: {shlex.join(sys.orig_argv)}",
                file=sys.stderr,
                flush=True,
            )
        sys.exit(stopped.exit_code)


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv, takes_config=True, computes=True)


if __name__ == "__main__":
    run()
