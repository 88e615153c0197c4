"""Train pyramid depth x context mode x seed (x fold) and write the ablation's statistics.

    autocontext ablation --config configs/ablation_base_cpu.py --levels 1,2 \
        --modes end_to_end,separate,none --seeds 0,1,2 --runs_dir runs/ablation
    autocontext ablation --config configs/ablation_depth_cpu.py --levels 1,2,3 \
        --modes end_to_end,none --seeds 0,1 --folds 3 --runs_dir runs/ablation_depth
    autocontext ablation ... --backend=slurm --slurm_gpus_per_node=1 --dry_run
    autocontext ablation ... --report_only

Each (levels, mode, seed[, fold]) trains and evaluates in its own workdir RUNS_DIR/NAME,
through the sweep machinery (`autocontext sweep`: here one after another, on every worker
of a TPU slice with --backend=tpu, or as SLURM jobs with --backend=slurm); a one-level
pyramid has no context, so it is one run per seed (and fold) whatever the modes. A
`separate` run trains levels x train.steps steps, so that each of its levels gets as many
optimiser steps as in a jointly trained run. Without --folds every run shares the config's
held-out split (data.split_seed); with --folds K every configuration trains K times, fold f
holding out the f-th of the dataset's K folds (its cache's folds.json, shared by every run),
so every case is scored once by a model that never saw it. Then (or with --report_only,
once remote runs are done) RUNS_DIR/ablation.md, .json and .png: per organ and level the
mean ± std over seeds; every mode against --baseline at each depth and every pyramid
against one U-Net, with the case as the unit (per case the mean over seeds; --test over
cases, a 95 % bootstrap interval, Holm), one verdict per comparison, the structures that
collapsed in a run, and, for comparison only, the old case x seed p-values
(autocontext_jax/evaluation/ablation.py); with --folds also each configuration's
cross-validated Table-1 summary in RUNS_DIR/NAME_cv (as `autocontext evaluate --cv`).
`--override KEY=VALUE` changes a config field of every run.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags

from autocontext_jax.cli import sweep
from autocontext_jax.cli.common import run_command
from autocontext_jax.config import schema
from autocontext_jax.config.files import load_config_file
from autocontext_jax.config.schema import MAX_PYRAMID_LEVELS, ConfigError
from autocontext_jax.data.atomic import (
    write_atomically,
    write_json_atomically,
    write_text_atomically,
)
from autocontext_jax.evaluation import ablation, compare, crossval
from autocontext_jax.evaluation.figures import ablation_figure
from autocontext_jax.runtime import environment

FLAGS = flags.FLAGS
REPORT_NAME = "ablation"


def define_flags() -> None:
    """Define the command line's flags (the sweep's backends and these)."""
    sweep.define_flags()
    flags.DEFINE_string("config", None, "Base config file of every run.", required=True)
    flags.DEFINE_list("levels", ["1", "2"], "Pyramid depths.")
    flags.DEFINE_list("modes", ["end_to_end", "separate", "none"], "Context modes.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of initialisation and sampling.")
    flags.DEFINE_integer(
        "folds", None, "Cross-validate: train every configuration on each of K folds (K >= 2)."
    )
    flags.DEFINE_string("baseline", "none", "The mode every other mode is tested against.")
    flags.DEFINE_enum("test", "wilcoxon", ablation.TESTS, "Paired test over cases, seeds averaged.")
    flags.DEFINE_float("alpha", 0.05, "Family-wise error rate of the Holm correction.")
    flags.DEFINE_multi_string("override", [], "KEY=VALUE: a config field of every run.")
    flags.DEFINE_bool("report_only", False, "Train nothing; report the runs that finished.")


def _integers(name: str, values: Sequence[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{name} takes integers separated by commas: {values}") from None


def grid_runs(
    config_path: str,
    levels: Sequence[int],
    modes: Sequence[str],
    seeds: Sequence[int],
    overrides: dict[str, str],
    runs_dir: str,
    folds: int | None = None,
) -> tuple[sweep.Sweep, list[sweep.SweepRun]]:
    """The sweep of the grid and its runs, named `levels-2_mode-none_seed-0[_fold-3]`."""
    steps = int(overrides.get("train.steps", load_config_file(config_path).train.steps))
    runs = []
    for depth in levels:
        for mode in modes[:1] if depth == 1 else modes:
            for seed in seeds:
                # A one-level pyramid has no context: its name carries no mode.
                stem = f"levels-{depth}" + ("" if depth == 1 else f"_mode-{mode}")
                stem += f"_seed-{seed}"
                base = {**overrides, "pyramid.levels": depth, "pyramid.mode": mode, "seed": seed}
                for fold in range(folds) if folds else [None]:
                    name, run = stem, dict(base)
                    if fold is not None:
                        name += f"_fold-{fold}"
                        run.update({"data.num_folds": folds, "data.fold": fold})
                    if mode == "separate" and depth > 1:
                        run["train.steps"] = depth * steps
                    runs.append(sweep.SweepRun(name, run, str(pathlib.Path(runs_dir) / name)))
    return sweep.Sweep(config_path, tuple(r.overrides for r in runs)), runs


def _configuration(run: sweep.SweepRun) -> tuple:
    """(levels, mode, seed): what the folds of one cross-validated configuration share."""
    o = run.overrides
    return int(o["pyramid.levels"]), o["pyramid.mode"], int(o["seed"])


def gather(
    runs: Sequence[sweep.SweepRun],
) -> tuple[list[ablation.AblationRun], list[str], list[str]]:
    """The evaluated runs of the grid, the names of those not finished, and of those left out.

    A configuration with a fold not finished leaves all its folds out (named in the third
    list): its cases would not be every case once.
    """
    missing = [r.name for r in runs if not (pathlib.Path(r.workdir) / compare.CASES_FILE).is_file()]
    incomplete = {_configuration(r) for r in runs if r.name in missing}
    done, left_out = [], []
    for run in runs:
        if run.name in missing:
            continue
        if _configuration(run) in incomplete:
            left_out.append(run.name)
            continue
        done.append(
            ablation.AblationRun(
                *_configuration(run),
                compare.load_result(run.workdir),
                int(run.overrides.get("data.fold", -1)),
            )
        )
    return done, missing, left_out


def write_report(
    runs: Sequence[sweep.SweepRun],
    runs_dir: str,
    baseline: str = "none",
    test: str = "wilcoxon",
    alpha: float = 0.05,
) -> str:
    """Write RUNS_DIR/ablation.{md,json,png} of the finished runs; the Markdown."""
    done, missing, left_out = gather(runs)
    report = ablation.ablation_report(done, baseline, test, alpha)
    report["not_finished"] = missing
    report["left_out"] = left_out
    text = ablation.ablation_markdown(report)
    finished = {r.name: r.workdir for r in runs if r.name not in missing}
    report["stacks_note"] = environment.mixed_stacks_note(finished)
    if report["stacks_note"]:
        text = f"**{report['stacks_note']}**\n\n" + text
    if left_out:
        text = (
            f"**Left out, a fold of their configuration not finished:** {', '.join(left_out)}"
            "\n\n" + text
        )
    if missing:
        text = f"**Not finished, left out:** {', '.join(missing)}\n\n" + text
    folder = pathlib.Path(runs_dir)
    report["cross_validations"] = write_cross_validations(runs, missing + left_out, folder)
    write_text_atomically(folder / f"{REPORT_NAME}.md", text)
    write_json_atomically(folder / f"{REPORT_NAME}.json", report)
    try:
        figure = ablation_figure(report)
    except ImportError as error:
        text += f"\nNo figure: {error}\n"
    else:
        write_atomically(
            folder / f"{REPORT_NAME}.png", lambda path: figure.savefig(path, format="png", dpi=120)
        )
    return text


def write_cross_validations(
    runs: Sequence[sweep.SweepRun], left_out: Sequence[str], folder: pathlib.Path
) -> list[str]:
    """Each finished cross-validated configuration's Table-1 summary over all its cases.

    Written as `autocontext evaluate --cv` writes it, into RUNS_DIR/NAME_cv (NAME the
    runs' name without the fold); returns those folders.
    """
    configurations: dict[str, list[pathlib.Path]] = {}
    for run in runs:
        if "data.fold" in run.overrides and run.name not in left_out:
            stem = run.name.rsplit("_fold-", 1)[0]
            configurations.setdefault(stem, []).append(pathlib.Path(run.workdir))
    written = []
    for stem, workdirs in configurations.items():
        out = folder / f"{stem}_cv"
        crossval.write_cross_validation(out, crossval.cross_validate(workdirs))
        written.append(str(out))
    return written


def main(argv: list[str]) -> None:
    """Launch the grid's runs (unless --report_only), then write and print the report."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.report_metric != "dice":
        raise app.UsageError("--report_metric: the ablation's statistics are of the Dice only")
    if FLAGS.runs_dir is None:
        raise app.UsageError("--runs_dir is required: the folder of the ablation's workdirs")
    levels, seeds = _integers("levels", FLAGS.levels), _integers("seeds", FLAGS.seeds)
    for mode in FLAGS.modes:
        if mode not in schema.choices("pyramid.mode"):
            raise app.UsageError(
                f"--modes: {mode!r} is not one of {schema.choices('pyramid.mode')}"
            )
    if FLAGS.baseline not in FLAGS.modes:
        raise app.UsageError(f"--baseline={FLAGS.baseline} is not one of --modes {FLAGS.modes}")
    if not all(1 <= depth <= MAX_PYRAMID_LEVELS for depth in levels):
        raise app.UsageError(f"--levels: each from 1 to {MAX_PYRAMID_LEVELS}, got {levels}")
    overrides = {}
    for item in FLAGS.override:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise app.UsageError(f"--override takes KEY=VALUE, got {item!r}")
        overrides[key] = value
    if FLAGS.folds is not None and FLAGS.folds < 2:
        raise app.UsageError(f"--folds={FLAGS.folds}: cross-validation needs at least 2 folds")
    for key in ("data.fold", "data.num_folds"):
        if FLAGS.folds is not None and key in overrides:
            raise app.UsageError(f"--override {key}: --folds sets it for each run")
    try:
        grid, runs = grid_runs(
            FLAGS.config, levels, FLAGS.modes, seeds, overrides, FLAGS.runs_dir, FLAGS.folds
        )
    except (OSError, AttributeError, ValueError) as error:
        raise ConfigError(f"{FLAGS.config}: {error}") from error
    failed = 0 if FLAGS.report_only else sweep.launch_runs(grid, runs)
    if FLAGS.report_only or (FLAGS.backend == "local" and not FLAGS.dry_run):
        print(write_report(runs, FLAGS.runs_dir, FLAGS.baseline, FLAGS.test, FLAGS.alpha))
    if failed:
        sys.exit(f"{failed} of {len(runs)} runs failed")


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv)


if __name__ == "__main__":
    run()
