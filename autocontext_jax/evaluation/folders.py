"""Folders of label maps scored against folders of references, as nnU-Net's evaluate_folder.

    result = evaluate_folders("segs/", "labelsTs/", num_classes=8)
    write_summary("segs/summary.json", result)

Cases are matched by id (`segs/case.nii.gz` with `labelsTs/case.nii.gz`); each pair is
scored on its own grid with metrics.case_metrics, and summary.json holds every case's
Dice, HD95 and NSD per class and their means (reports.summary), one result layout with
the run evaluations (a single "final_level").
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from autocontext_jax.config import schema
from autocontext_jax.data.atomic import write_json_atomically
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.geometry import Geometry
from autocontext_jax.data.labels import class_names, read_labels
from autocontext_jax.data.nifti import (
    NIFTI_SUFFIXES,
    case_id,
    case_name,
    is_nifti_name,
    read_scan,
)
from autocontext_jax.evaluation.metrics import METRIC_NAMES, case_metrics
from autocontext_jax.evaluation.reports import summary

SUMMARY_FILE = "summary.json"
# The one level a folder of label maps has, in the result layout of a run's evaluation.
LEVEL = "final_level"

# What a folder is scored with unless asked otherwise: the config's default.
NSD_TOLERANCE_MM = schema.default("eval.nsd_tolerance_mm")


def folder_result(
    case_ids: Sequence[str],
    scores: Sequence[Mapping[str, Sequence[float]]],
    classes: Sequence[str],
    tolerance_mm: float,
) -> dict[str, Any]:
    """The result of evaluate_cases' layout from one case_metrics dict per case."""
    return {
        "case_ids": list(case_ids),
        "classes": list(classes),
        "nsd_tolerance_mm": tolerance_mm,
        **{name: {LEVEL: [list(s[name]) for s in scores]} for name in METRIC_NAMES},
    }


def summary_document(result: dict[str, Any]) -> dict[str, Any]:
    """summary.json: per case, metric and class the value; per metric and class the mean."""
    classes = result["classes"]
    cases = {
        case: {
            name: dict(zip(classes, result[name][LEVEL][index], strict=True))
            for name in METRIC_NAMES
        }
        for index, case in enumerate(result["case_ids"])
    }
    statistics = {name: levels[LEVEL] for name, levels in summary(result).items()}
    return {
        "classes": classes,
        "nsd_tolerance_mm": result["nsd_tolerance_mm"],
        "hd95_unit": "mm",
        "mean": {name: rows["Avg"] for name, rows in statistics.items()},
        "statistics": statistics,
        "cases": cases,
    }


def write_summary(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """Write the summary document of `result` to `path` (atomically)."""
    write_json_atomically(pathlib.Path(path), summary_document(result))


def matched_cases(
    predictions: pathlib.Path, labels: pathlib.Path
) -> list[tuple[str, pathlib.Path, pathlib.Path]]:
    """(case, prediction, reference) of every prediction file, its reference found by id."""
    for folder in (predictions, labels):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no such folder")
    files = sorted(p for p in predictions.iterdir() if is_nifti_name(p) and p.is_file())
    # predict --save_levels writes CASE_levelS.nii.gz beside CASE.nii.gz: not a case.
    files = [p for p in files if not re.search(r"_level\d+$", case_name(p))]
    if not files:
        raise DatasetError(f"{predictions}: no .nii or .nii.gz file in this folder")
    matched = []
    for path in files:
        case = case_id(path)
        references = [labels / f"{case}{suffix}" for suffix in NIFTI_SUFFIXES]
        found = [reference for reference in references if reference.is_file()]
        if not found:
            raise DatasetError(f"{references[0]}: no reference for the prediction {path}")
        matched.append((case, path, found[0]))
    return matched


def score_labels(
    predicted: np.ndarray,
    reference_path: pathlib.Path,
    geometry: Geometry,
    num_classes: int,
    label_map: Sequence[Sequence[int]] = (),
    unmapped: str = "background",
    tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict[str, list[float]]:
    """case_metrics of model classes on a scan's canonical grid against a reference file."""
    reference = read_labels(reference_path, geometry, num_classes, label_map, unmapped)
    return case_metrics(predicted, reference, num_classes, geometry.spacing, tolerance_mm)


def score_label_file(
    prediction_path: pathlib.Path,
    reference_path: pathlib.Path,
    geometry: Geometry,
    num_classes: int,
    label_map: Sequence[Sequence[int]] = (),
    unmapped: str = "background",
    tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict[str, list[float]]:
    """case_metrics of a label map file of model classes (as predict writes) on `geometry`."""
    predicted = read_labels(prediction_path, geometry, num_classes, (), "error")
    return score_labels(
        predicted, reference_path, geometry, num_classes, label_map, unmapped, tolerance_mm
    )


def evaluate_folders(
    predictions: str | os.PathLike,
    labels: str | os.PathLike,
    num_classes: int,
    label_map: Sequence[Sequence[int]] = (),
    unmapped: str = "background",
    tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict[str, Any]:
    """Dice, HD95 (mm) and NSD per case and class of a folder of predictions.

    Predictions hold the model's classes (as `predict` writes them); references go
    through `label_map` (none: their ids are the classes).
    """
    case_ids, scores = [], []
    for case, prediction_path, reference_path in matched_cases(
        pathlib.Path(predictions), pathlib.Path(labels)
    ):
        geometry = read_scan(prediction_path).geometry
        scores.append(
            score_label_file(
                prediction_path,
                reference_path,
                geometry,
                num_classes,
                label_map,
                unmapped,
                tolerance_mm,
            )
        )
        case_ids.append(case)
    return folder_result(case_ids, scores, class_names(num_classes)[1:], tolerance_mm)
