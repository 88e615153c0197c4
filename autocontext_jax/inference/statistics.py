"""Per structure, what a segmentation measures on its scan: volume in ml, and HU inside it.

    statistics = structure_statistics(labels, scan.image, scan.geometry, run.class_names)

Computed on the scan's own grid (the canonical voxels the reader gives, the labels
`segment` returns on it), so a voxel's volume is the scan's: |det| of its affine's 3x3
part, which an oblique or sheared grid also gets right. Every structure of the model is
listed; one the segmentation does not contain has volume 0 and no intensities (None).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from autocontext_jax.data.geometry import Geometry

CSV_COLUMNS = ("case", "structure", "voxels", "volume_ml", "mean_hu", "std_hu")
MM3_PER_ML = 1000.0


def voxel_volume_ml(geometry: Geometry) -> float:
    """The volume of one voxel of the scan, in ml."""
    return abs(float(np.linalg.det(geometry.original_affine[:3, :3]))) / MM3_PER_ML


def structure_statistics(
    labels: np.ndarray, image: np.ndarray, geometry: Geometry, class_names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """{structure: {voxels, volume_ml, mean_hu, std_hu}} of every class but background.

    `labels` and `image` lie on one grid (the scan's canonical one); mean and std (the
    population std) of the image's values inside each structure, None where it is absent.
    """
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    flat = labels.ravel().astype(np.intp)
    values = image.ravel().astype(np.float64)
    size = len(class_names)
    counts = np.bincount(flat, minlength=size)[:size]
    sums = np.bincount(flat, weights=values, minlength=size)[:size]
    voxel_ml = voxel_volume_ml(geometry)
    statistics = {}
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        count = int(counts[k])
        mean = std = None
        if count:
            mean = float(sums[k] / count)
            # Two passes for the spread: sums of squares lose digits on HU near 1000.
            inside = values[flat == k]
            std = float(np.sqrt(np.mean((inside - mean) ** 2)))
        statistics[name] = {
            "voxels": count,
            "volume_ml": count * voxel_ml,
            "mean_hu": mean,
            "std_hu": std,
        }
    return statistics


def statistics_csv(per_case: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """One row per case and structure: voxels, volume (ml), mean and std HU (empty if absent)."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return f"{value:.10g}" if isinstance(value, float) else str(value)

    for case, structures in per_case.items():
        for name, row in structures.items():
            writer.writerow([case, name, *(cell(row[column]) for column in CSV_COLUMNS[2:])])
    return stream.getvalue()
