"""Folders of label maps scored against folders of references, as nnU-Net's evaluate_folder.

    result = evaluate_folders("segs/", "labelsTs/", num_classes=8)
    write_summary("segs/summary.json", result)

Cases are matched by id (`segs/case.nii.gz` with `labelsTs/case.nii.gz`); each pair is
scored on its own grid with metrics.case_metrics, and summary.json holds every case's
Dice, HD95 and NSD per class and their means (reports.summary), one result layout with
the run evaluations (a single "final_level").
"""

from __future__ import annotations

import json
import math
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


# score_labels' record of which classes a case's reference holds.
IN_REFERENCE = "in_reference"


def folder_result(
    case_ids: Sequence[str],
    scores: Sequence[Mapping[str, Sequence[float]]],
    classes: Sequence[str],
    tolerance_mm: float,
    labelled: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The result of evaluate_cases' layout from one case_metrics dict per case.

    A class is not labelled when no case's reference holds it, or when `labelled` (the
    classes the user or the dataset says the references label) leaves it out: its scores
    are NaN in every case (null in JSON, a dash in tables), out of every average, and
    `not_labelled` names it.
    """
    present = [
        any(s.get(IN_REFERENCE, [True] * len(classes))[index] for s in scores)
        for index in range(len(classes))
    ]
    missing = [
        index
        for index, name in enumerate(classes)
        if not present[index] or (labelled is not None and name not in labelled)
    ]

    def values(case_scores: Sequence[float]) -> list[float]:
        return [math.nan if i in missing else float(v) for i, v in enumerate(case_scores)]

    return {
        "case_ids": list(case_ids),
        "classes": list(classes),
        "nsd_tolerance_mm": tolerance_mm,
        "not_labelled": [classes[index] for index in missing],
        **{name: {LEVEL: [values(s[name]) for s in scores]} for name in METRIC_NAMES},
    }


def _null_for_nan(value: Any) -> Any:
    """`value` with every NaN float replaced by None, for JSON (which has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _null_for_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_null_for_nan(item) for item in value]
    return value


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
    document = {
        "classes": classes,
        "not_labelled": list(result.get("not_labelled", [])),
        "nsd_tolerance_mm": result["nsd_tolerance_mm"],
        "hd95_unit": "mm",
        "mean": {name: rows["Avg"] for name, rows in statistics.items()},
        "statistics": statistics,
        "cases": cases,
    }
    if result.get("unmatched"):
        document["unmatched"] = result["unmatched"]
    return _null_for_nan(document)


def write_summary(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """Write the summary document of `result` to `path` (atomically)."""
    write_json_atomically(pathlib.Path(path), summary_document(result))


def label_files(folder: pathlib.Path, predictions: bool = False) -> dict[str, pathlib.Path]:
    """{case: file} of the label maps in a folder: references are CASE.nii.gz exactly.

    Predictions are named as predict writes them (its CASE_levelS side files left out),
    or after their scans (CASE_0000.nii.gz is case CASE).
    """
    files = sorted(p for p in folder.iterdir() if is_nifti_name(p) and p.is_file())
    if not predictions:
        return {case_name(p): p for p in files}
    # predict --save_levels writes CASE_levelS.nii.gz beside CASE.nii.gz: not a case.
    return {case_id(p): p for p in files if not re.search(r"_level\d+$", case_name(p))}


def unmatched_line(unmatched: Mapping[str, Sequence[str]]) -> str:
    """One sentence naming the cases without a reference and those without a prediction."""
    parts = []
    if unmatched.get("predictions_without_reference"):
        cases = unmatched["predictions_without_reference"]
        parts.append(f"{len(cases)} predicted cases have no reference, not scored: {cases}")
    if unmatched.get("references_without_prediction"):
        cases = unmatched["references_without_prediction"]
        parts.append(f"{len(cases)} references have no prediction, not scored: {cases}")
    return "; ".join(parts)


def matched_cases(
    predictions: pathlib.Path, labels: pathlib.Path, strict: bool = False
) -> tuple[list[tuple[str, pathlib.Path, pathlib.Path]], dict[str, list[str]]]:
    """(case, prediction, reference) of every case with both files, and the cases without.

    The second value lists the predictions without a reference and the references without
    a prediction; with `strict` either is a DatasetError naming them.
    """
    for folder in (predictions, labels):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no such folder")
    predicted, references = label_files(predictions, predictions=True), label_files(labels)
    if not predicted:
        raise DatasetError(f"{predictions}: no .nii or .nii.gz file in this folder")
    unmatched = {
        "predictions_without_reference": sorted(set(predicted) - set(references)),
        "references_without_prediction": sorted(set(references) - set(predicted)),
    }
    unmatched = {key: cases for key, cases in unmatched.items() if cases}
    if unmatched and strict:
        raise DatasetError(f"{predictions} and {labels}: {unmatched_line(unmatched)} (--strict)")
    matched = [
        (case, predicted[case], references[case])
        for case in sorted(predicted)
        if case in references
    ]
    if not matched:
        raise DatasetError(f"{predictions}: no prediction has a reference in {labels}")
    return matched, unmatched


def score_labels(
    predicted: np.ndarray,
    reference_path: pathlib.Path,
    geometry: Geometry,
    num_classes: int,
    label_map: Sequence[Sequence[int]] = (),
    unmapped: str = "background",
    tolerance_mm: float = NSD_TOLERANCE_MM,
    grid_of: str = "the scan",
) -> dict[str, list[float]]:
    """case_metrics of model classes on a scan's canonical grid against a reference file.

    `grid_of` names the file whose grid `geometry` is, for the message when the reference
    does not lie on it.
    """
    reference = read_labels(
        reference_path, geometry, num_classes, label_map, unmapped, image_path=grid_of
    )
    scores = case_metrics(predicted, reference, num_classes, geometry.spacing, tolerance_mm)
    present = np.bincount(reference.ravel(), minlength=num_classes)[1:num_classes] > 0
    return {**scores, IN_REFERENCE: present.tolist()}


def score_label_file(
    prediction_path: pathlib.Path,
    reference_path: pathlib.Path,
    geometry: Geometry,
    num_classes: int,
    label_map: Sequence[Sequence[int]] = (),
    unmapped: str = "background",
    tolerance_mm: float = NSD_TOLERANCE_MM,
    grid_of: str = "the scan",
) -> dict[str, list[float]]:
    """case_metrics of a label map file of model classes (as predict writes) on `geometry`."""
    predicted = read_labels(prediction_path, geometry, num_classes, (), "error")
    return score_labels(
        predicted,
        reference_path,
        geometry,
        num_classes,
        label_map,
        unmapped,
        tolerance_mm,
        grid_of=grid_of,
    )


def evaluate_folders(
    predictions: str | os.PathLike,
    labels: str | os.PathLike,
    num_classes: int,
    label_map: Sequence[Sequence[int]] = (),
    unmapped: str = "background",
    tolerance_mm: float = NSD_TOLERANCE_MM,
    labelled: Sequence[str] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Dice, HD95 (mm) and NSD per case and class of a folder of predictions.

    Predictions hold the model's classes (as `predict` writes them); references go
    through `label_map` (none: their ids are the classes). Cases with a prediction and a
    reference are scored; the others are listed under "unmatched" (an error when
    `strict`). Classes no reference holds, or that `labelled` leaves out, are not labelled.
    """
    case_ids, scores = [], []
    matched, unmatched = matched_cases(pathlib.Path(predictions), pathlib.Path(labels), strict)
    for case, prediction_path, reference_path in matched:
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
                grid_of=f"the prediction {prediction_path}",
            )
        )
        case_ids.append(case)
    result = folder_result(
        case_ids, scores, class_names(num_classes)[1:], tolerance_mm, labelled=labelled
    )
    result["unmatched"] = unmatched
    return result


def parse_classes(text: str, num_classes: int) -> list[str]:
    """The structures named by `--classes liver,spleen`, checked against the model's classes."""
    known = class_names(num_classes)[1:]
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise ValueError(
            f"{unknown or text!r}: not structures of the model; one or more of {known}"
        )
    return names


def dataset_labelled_classes(
    labels: pathlib.Path, num_classes: int, label_map: Sequence[Sequence[int]] = ()
) -> list[str] | None:
    """The classes a dataset says its references label: dataset.json's "labels" beside them.

    Looked for in the --labels folder and its parent (MSD/nnU-Net: DATASET/labelsTs);
    None when there is none. Ids go through `label_map` as the references do.
    """
    folder = labels if labels.is_dir() else labels.parent
    for manifest in (folder / "dataset.json", folder.parent / "dataset.json"):
        if manifest.is_file():
            break
    else:
        return None
    try:
        entries = json.loads(manifest.read_text()).get("labels")
    except (OSError, ValueError, AttributeError) as error:
        raise DatasetError(f"{manifest}: not a readable dataset.json ({error})") from error
    if not isinstance(entries, dict) or not entries:
        return None
    # MSD writes {"1": "liver"}, nnU-Net v2 {"liver": 1}.
    ids = []
    for key, value in entries.items():
        number = key if str(key).isdigit() else value
        if isinstance(number, int) or str(number).isdigit():
            ids.append(int(number))
    mapping = dict(tuple(pair) for pair in label_map) if label_map else None
    classes = {mapping.get(i, 0) if mapping is not None else i for i in ids}
    names = class_names(num_classes)
    return [names[k] for k in sorted(classes) if 0 < k < num_classes]
