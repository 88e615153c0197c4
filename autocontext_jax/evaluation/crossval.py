"""Cross-validated evaluation: the fold runs of one config, every case scored once.

    autocontext evaluate --cv runs/cv/fold-0,runs/cv/fold-1,...   (or --cv runs/cv)

Each fold run (trained with `data.fold`) scores the cases it held out, with the model
that never saw them (its eval_cases.json, or a fresh evaluation when it has none of those
cases); the folds' tables are joined into one, in which every case of the dataset appears
exactly once, and written as a run's evaluation is (eval_cases.json, eval_summary.{md,csv,
json}), so `autocontext compare` takes a cross-validation folder as it takes a run.

The runs must be the k folds 0..k-1 of one folds file (the sha256 their split.json
records) and of one config, data.fold apart; anything else is refused naming the run.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
from flax import traverse_util

from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.atomic import write_json_atomically
from autocontext_jax.evaluation import metrics
from autocontext_jax.evaluation.evaluate import evaluate_workdir
from autocontext_jax.evaluation.reports import CASES_FILE, write_report
from autocontext_jax.runtime.checkpointing import read_run_config

# What a cross-validation folder holds besides the evaluation: which run scored which fold.
CV_FILE = "cv_runs.json"


class CrossValidationError(ValueError):
    """Runs that are not the folds of one config; the message names the run."""


def fold_workdirs(paths: Sequence[str]) -> list[pathlib.Path]:
    """The fold runs: the paths given, or the subfolders with a split.json of one folder."""
    folders = [pathlib.Path(p) for p in paths]
    if len(folders) == 1 and not (folders[0] / dataset_lib.SPLIT_FILE).is_file():
        if not folders[0].is_dir():
            raise CrossValidationError(f"{folders[0]}: no such folder of fold runs")
        folders = sorted(p for p in folders[0].iterdir() if (p / dataset_lib.SPLIT_FILE).is_file())
        if not folders:
            raise CrossValidationError(f"{paths[0]}: holds no run (no subfolder with split.json)")
    return folders


def _leaves(config: ml_collections.ConfigDict) -> dict[str, Any]:
    # Through JSON, so a tuple a migration filled in equals the list a saved run holds.
    plain = json.loads(json.dumps(config.to_dict(), default=list))
    return traverse_util.flatten_dict(plain, keep_empty_nodes=True, sep=".")


def check_folds(workdirs: Sequence[pathlib.Path]) -> list[dict[str, Any]]:
    """The split.json of each run, in fold order, once they are the k folds of one config."""
    splits, first, first_config = [], None, None
    for workdir in workdirs:
        split = dataset_lib.read_split(workdir)
        if split.get("fold", -1) < 0:
            raise CrossValidationError(
                f"{workdir / dataset_lib.SPLIT_FILE}: not a fold run (trained without "
                "config.data.fold)"
            )
        config = _leaves(read_run_config(workdir))
        config.pop("data.fold")
        if first is None:
            first, first_config = split | {"workdir": workdir}, config
        elif split["folds_sha256"] != first["folds_sha256"]:
            raise CrossValidationError(
                f"{workdir}: trained on other folds ({split['folds_file']}) than "
                f"{first['workdir']} ({first['folds_file']})"
            )
        else:
            differing = [k for k in sorted(config) if config[k] != first_config.get(k)]
            if differing:
                name = differing[0]
                raise CrossValidationError(
                    f"{workdir}: another config than {first['workdir']}: config.{name} is "
                    f"{config[name]!r}, not {first_config.get(name)!r}"
                )
        splits.append(split | {"workdir": workdir})
    by_fold: dict[int, dict[str, Any]] = {}
    for split in splits:
        twin = by_fold.get(split["fold"])
        if twin is not None:
            raise CrossValidationError(
                f"{split['workdir']}: fold {split['fold']} is also {twin['workdir']}"
            )
        by_fold[split["fold"]] = split
    wanted = range(first["num_folds"])
    missing = [fold for fold in wanted if fold not in by_fold]
    if missing:
        raise CrossValidationError(
            f"folds {missing} of {first['num_folds']} have no run among {len(splits)} given "
            f"({first['folds_file']}); give the run of every fold"
        )
    return [by_fold[fold] for fold in wanted]


def _fold_result(split: dict[str, Any], tolerance_mm: float | None) -> dict[str, Any]:
    """The run's evaluation of its held-out cases: its eval_cases.json, or a fresh one."""
    path = split["workdir"] / CASES_FILE
    if path.is_file():
        result = json.loads(path.read_text())
        same_tolerance = tolerance_mm in (None, result.get("nsd_tolerance_mm"))
        if list(result["case_ids"]) == list(split["val"]) and same_tolerance:
            return result
    return evaluate_workdir(split["workdir"], None, tolerance_mm)


def cross_validate(
    workdirs: Sequence[pathlib.Path], tolerance_mm: float | None = None
) -> dict[str, Any]:
    """Every case scored by the fold run that held it out, as one evaluation's result.

    The result is an eval_cases.json over all cases, with "fold" (per case) and "runs"
    (per fold) added.
    """
    splits = check_folds(workdirs)
    joined: dict[str, Any] = {"case_ids": [], "fold": [], "runs": []}
    for split in splits:
        result = _fold_result(split, tolerance_mm)
        if not joined["runs"]:
            joined["classes"] = result["classes"]
            joined["nsd_tolerance_mm"] = result["nsd_tolerance_mm"]
            for name in metrics.METRIC_NAMES:
                joined[name] = {level: [] for level in result[name]}
        joined["runs"].append(str(split["workdir"]))
        joined["case_ids"] += result["case_ids"]
        joined["fold"] += [split["fold"]] * len(result["case_ids"])
        for name in metrics.METRIC_NAMES:
            for level, values in result[name].items():
                joined[name][level] += values
    seen: set[str] = set()
    for case in joined["case_ids"]:
        if case in seen:
            raise CrossValidationError(
                f"case {case} is held out by two folds of {splits[0]['folds_file']}"
            )
        seen.add(case)
    return joined


def default_output(workdirs: Sequence[str]) -> pathlib.Path:
    """Where the summary goes: the one folder given, else beside the runs, named after them.

    `runs/a/levels-2_seed-0_fold-0 ... _fold-4` gives `runs/a/levels-2_seed-0_cv`.
    """
    if len(workdirs) == 1:
        return pathlib.Path(workdirs[0])
    paths = [pathlib.Path(w).absolute() for w in workdirs]
    prefix = os.path.commonprefix([p.name for p in paths])
    stem = re.sub(r"[_-]*(fold)?[_-]*$", "", prefix)
    return paths[0].parent / f"{stem or 'folds'}_cv"


def write_cross_validation(out: str | pathlib.Path, result: dict[str, Any]) -> None:
    """Write the joined evaluation (eval_cases.json, eval_summary.*) and cv_runs.json into `out`."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, result)
    runs = {"runs": result["runs"], "cases": len(result["case_ids"])}
    write_json_atomically(out / CV_FILE, runs)
