"""A trained run scored on labelled cases: every level, per organ, in mm.

Each case is segmented by `inference.segment`, the road `predict` takes (the run's own
plan and label map, its tiles), and scored on the scan's own grid with its spacing.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.evaluation import metrics, visualize
from autocontext_jax.evaluation.reports import mean_scores, write_report
from autocontext_jax.inference import (
    Model,
    Run,
    TilingOptions,
    load_model,
    load_run,
    segment,
    with_host_lowering,
    with_host_lowerings,
)
from autocontext_jax.inference.run import level_names
from autocontext_jax.runtime import logs
from autocontext_jax.runtime.progress import interactive, say


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes 1..K-1; a class absent from both maps scores 1, from one map 0."""
    return np.asarray(
        [metrics.dice(prediction == k, reference == k) for k in range(1, num_classes)]
    )


def load_case(run: Run | Model, files: dataset_lib.CaseFiles) -> dataset_lib.Case:
    """A labelled case read as the run read its training cases (its label map)."""
    return dataset_lib.load_run_case(files, run.config.data, run.num_classes)


def evaluate_cases(
    run: Run | Model,
    files: Sequence[dataset_lib.CaseFiles],
    options: TilingOptions | None = None,
    tolerance_mm: float | None = None,
) -> dict[str, Any]:
    """Per-case, per-level, per-class Dice, HD95 (mm) and NSD of the run on `files`.

    The result maps each metric name to {"level_s": [[one value per class] per case]}.
    """
    tolerance = run.config.eval.nsd_tolerance_mm if tolerance_mm is None else tolerance_mm
    levels = level_names(run)
    per_metric = {name: {level: [] for level in levels} for name in metrics.METRIC_NAMES}
    for case_files in tqdm.tqdm(files, desc="evaluate", leave=False, disable=not interactive()):
        case = load_case(run, case_files)
        predictions = segment(run, case.scan, options).levels
        for level, labels in zip(levels, predictions, strict=True):
            scores = metrics.case_metrics(
                labels, case.label, run.num_classes, case.geometry.spacing, tolerance
            )
            for name in metrics.METRIC_NAMES:
                per_metric[name][level].append(scores[name])
    return {
        "case_ids": [f.case_id for f in files],
        "classes": list(run.class_names[1:]),
        "nsd_tolerance_mm": tolerance,
        **per_metric,
    }


def prediction_panel(run: Run, case_files: dataset_lib.CaseFiles, plane: str) -> np.ndarray:
    """The middle `plane` slice of a case: CT, reference and each level, as one RGB row."""
    case = load_case(run, case_files)
    predictions = segment(run, case.scan).levels
    return visualize.panel(case.image, case.label, predictions, run.num_classes, plane)


def held_out_cases(run: Run, data_dir: str | os.PathLike | None = None) -> list:
    """Every case of `data_dir` when given, else the run's held-out cases (split.json)."""
    if data_dir is not None:
        return dataset_lib.list_cases(data_dir)
    held_out = dataset_lib.read_split(run.workdir)["val"]
    by_id = {f.case_id: f for f in dataset_lib.list_dataset(run.config.data)}
    missing = sorted(set(held_out) - set(by_id))
    if missing:
        raise DatasetError(
            f"{run.workdir / dataset_lib.SPLIT_FILE}: held-out cases {missing} are not in "
            f"the dataset {run.config.data.dir}"
        )
    return [by_id[case_id] for case_id in held_out]


def evaluate_run(
    run: Run,
    files: Sequence[dataset_lib.CaseFiles],
    tolerance_mm: float | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Evaluate `run` on `files` and write its reports into the run's workdir.

    With `tensorboard`, the mean scores and an axial slice of the first case with every
    level's prediction also go to the run's TensorBoard events (the end of training).
    Every process predicts (the variables span them all); process 0 writes.
    """
    result = evaluate_cases(run, files, tolerance_mm=tolerance_mm)
    result["step"] = run.step
    if tensorboard:
        image = prediction_panel(run, files[0], "axial")
        writer = logs.MetricWriter(run.workdir)
        writer.write_scalars(run.step, mean_scores(result), to_jsonl=False)
        writer.write_image(run.step, f"prediction/axial/{files[0].case_id}", image)
        writer.close()
    if jax.process_index() == 0:
        write_report(run.workdir, result)
    return result


def evaluate_workdir(
    workdir: str | pathlib.Path,
    data_dir: str | os.PathLike | None = None,
    tolerance_mm: float | None = None,
    lowering_cache: str | os.PathLike = "",
) -> dict[str, Any]:
    """Evaluate the newest checkpoint of a run and write its reports into the workdir.

    `lowering_cache` holds this host's choice of convolution lowering
    (`inference.with_host_lowering`; '': the config's, untimed).
    """
    run = with_host_lowering(load_run(workdir), lowering_cache, say)
    return evaluate_run(run, held_out_cases(run, data_dir), tolerance_mm)


def evaluate_model_file(
    model_file: str | pathlib.Path,
    data_dir: str | os.PathLike,
    output: str | pathlib.Path,
    tolerance_mm: float | None = None,
    lowering_cache: str | os.PathLike = "",
) -> dict[str, Any]:
    """Evaluate an exported model (`autocontext export`) on every case of `data_dir`.

    The reports a workdir gets (eval_cases.json, eval_summary.{md,csv,json}) go to `output`;
    `lowering_cache`: see `evaluate_workdir`.
    """
    model = with_host_lowerings(load_model(model_files=[model_file]), lowering_cache, say)
    result = evaluate_cases(model, dataset_lib.list_cases(data_dir), tolerance_mm=tolerance_mm)
    result["step"] = model.first.step
    pathlib.Path(output).mkdir(parents=True, exist_ok=True)
    write_report(output, result)
    return result
