"""Whole-volume prediction with every pyramid level, and per-organ Dice tables."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np
import tqdm

from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.intensity import normalize_hu, normalized_pad_value
from autocontext_jax.data.labels import class_names
from autocontext_jax.data.sampling import box_downsample
from autocontext_jax.models.pyramid import downsample_factor

SUMMARY_ROWS = ("Avg", "Std", "Min", "Max")


def pad_to_multiple(volume: np.ndarray, multiple: int, value: float) -> np.ndarray:
    """Pad a 3D volume at its far ends so that every size is a multiple of `multiple`."""
    pad = [(0, -n % multiple) for n in volume.shape]
    return np.pad(volume, pad, constant_values=value)


def pyramid_volumes(image: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """The padded normalised volume downsampled for each level, as (1, X, Y, Z, 1) arrays.

    `image` must already be padded to a multiple of 2^levels * 2^poolings, so level
    grids nest exactly and every level's grid is divisible by the U-Net's poolings.
    """
    return [
        box_downsample(image, downsample_factor(level, num_levels))[None, ..., None]
        for level in range(1, num_levels + 1)
    ]


def predict_levels(
    model: nn.Module,
    variables: Any,
    image_hu: np.ndarray,
    config: ml_collections.ConfigDict,
    options: Any = None,
) -> list[np.ndarray]:
    """Label maps of every pyramid level for a whole canonical HU volume, at its own grid.

    By default each level is one tile over its whole grid (one forward pass of the
    pyramid); `options` (inference.TilingOptions) slides smaller tiles instead.
    """
    # Imported here: inference builds on this module's padding and pyramid volumes.
    from autocontext_jax import inference

    multiple = 2**config.pyramid.levels * 2**config.model.num_poolings
    if options is None:
        whole = max(n + (-n % multiple) for n in image_hu.shape) // 2
        options = inference.TilingOptions(tile_size=whole, weighting="constant")
    image = normalize_hu(image_hu, config.data)
    probs = inference.predict_pyramid(
        model, variables, image, normalized_pad_value(config.data), options
    )
    return [
        inference.upsample_to_native(p, downsample_factor(s, len(probs)), image_hu.shape)
        for s, p in enumerate(probs, start=1)
    ]


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes 1..K-1; a class absent from both maps scores 1, from one map 0."""
    scores = np.empty(num_classes - 1)
    for k in range(1, num_classes):
        p, r = prediction == k, reference == k
        total = p.sum() + r.sum()
        scores[k - 1] = 1.0 if total == 0 else 2.0 * np.logical_and(p, r).sum() / total
    return scores


def evaluate_cases(
    model: nn.Module,
    variables: Any,
    files: Sequence[dataset_lib.CaseFiles],
    config: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """Per-case, per-level, per-class Dice of the pyramid on `files`."""
    num_classes = config.model.num_classes
    per_level: list[list[list[float]]] = [[] for _ in range(config.pyramid.levels)]
    for case_files in tqdm.tqdm(files, desc="evaluate", leave=False):
        case = dataset_lib.load_case(case_files, num_classes)
        for level, labels in enumerate(predict_levels(model, variables, case.image, config)):
            per_level[level].append(dice_per_class(labels, case.label, num_classes).tolist())
    return {
        "case_ids": [f.case_id for f in files],
        "classes": list(class_names(num_classes)[1:]),
        "dice": {f"level_{s + 1}": scores for s, scores in enumerate(per_level)},
    }


def summarize(scores: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
    """Avg, Std, Min, Max over cases of each class and of the per-case class average."""
    table = np.asarray(scores, dtype=np.float64)
    table = np.concatenate([table, table.mean(axis=1, keepdims=True)], axis=1)
    return {
        "Avg": table.mean(axis=0),
        "Std": table.std(axis=0),
        "Min": table.min(axis=0),
        "Max": table.max(axis=0),
    }


def dice_table(result: dict[str, Any]) -> str:
    """Markdown tables of Dice (%) per level, as in Table 1 of the paper."""
    header = ["Dice (%)", *result["classes"], "Avg."]
    lines = []
    for level, scores in result["dice"].items():
        summary = summarize(scores)
        lines.append(f"\n{level.replace('_', ' ').capitalize()} ({len(scores)} held-out cases)\n")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in SUMMARY_ROWS:
            cells = [f"{100 * v:.1f}" for v in summary[row]]
            lines.append("| " + " | ".join([row, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    workdir: str | pathlib.Path, result: dict[str, Any], files: Sequence[dataset_lib.CaseFiles]
) -> None:
    """Write eval_dice.json (per case) and eval_dice.md (summary tables) into `workdir`."""
    workdir = pathlib.Path(workdir)
    (workdir / "eval_dice.json").write_text(json.dumps(result, indent=2) + "\n")
    (workdir / "eval_dice.md").write_text(dice_table(result))
