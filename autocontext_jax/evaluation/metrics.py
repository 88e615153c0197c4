"""Segmentation metrics in millimetres: Dice, HD95 and normalised surface Dice (NSD).

Conventions, so that no table holds a NaN:

* The surface of a mask is its voxels with a face neighbour (6-connectivity) outside it;
  the border of the volume counts as outside. Distances are Euclidean between voxel
  centres, in mm from the voxel spacing (anisotropic spacing included).
* HD95 is the larger of the two directed 95th percentiles of surface-to-surface distances
  (as MONAI's `compute_hausdorff_distance(percentile=95)`); NSD at tolerance t is the share
  of surface voxels of both masks lying within t mm of the other surface (voxels counted,
  as MONAI's `compute_surface_dice` without sub-voxel areas).
* Both masks empty (a structure absent and correctly not predicted): Dice 1, HD95 0, NSD 1.
* One mask empty: Dice 0, NSD 0, and HD95 the diagonal of the volume in mm, the largest
  distance two voxels of that grid can have, so a missed or hallucinated organ is the worst
  finite score rather than inf or NaN.

Reorienting a scan permutes and flips its axes only, so metrics on the canonical (RAS) grid
with its spacing equal those on the original grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("dice", "hd95", "nsd")
# Face connectivity: a voxel is on the surface when one of its 6 face neighbours is outside.
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice overlap of two boolean masks; 1 when both are empty."""
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Distance in mm between the centres of opposite corner voxels of a grid."""
    return float(np.linalg.norm([(n - 1) * s for n, s in zip(shape, spacing, strict=True)]))


def surface(mask: np.ndarray) -> np.ndarray:
    """The voxels of a boolean 3D mask that have a face neighbour outside it."""
    interior = ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=0)
    return mask & ~interior


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel, grown by one voxel inside the grid."""
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other_axes))
        box.append(slice(max(present[0] - 1, 0), min(present[-1] + 2, mask.shape[axis])))
    return tuple(box)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of `a` to the surface of `b`, and back.

    Both masks must be non-empty. Work happens in the bounding box of the two masks: the
    nearest surface voxel always lies inside it, and the box is usually far smaller.
    """
    box = _bounding_box(a | b)
    a, b = a[box], b[box]
    surface_a, surface_b = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    return to_b[surface_a], to_a[surface_b]


def structure_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float,
) -> dict[str, float]:
    """Dice, HD95 (mm) and NSD at `tolerance_mm` of two boolean masks, as documented above."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference {reference.shape}")
    if len(spacing) != prediction.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {tuple(spacing)} must be {prediction.ndim} positive mm sizes")
    predicted, present = bool(prediction.any()), bool(reference.any())
    if not predicted and not present:
        return {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    if predicted != present:
        worst = volume_diagonal_mm(prediction.shape, spacing)
        return {"dice": 0.0, "hd95": worst, "nsd": 0.0}
    to_reference, to_prediction = surface_distances(prediction, reference, spacing)
    hd95 = max(np.percentile(to_reference, 95), np.percentile(to_prediction, 95))
    within = np.count_nonzero(to_reference <= tolerance_mm) + np.count_nonzero(
        to_prediction <= tolerance_mm
    )
    return {
        "dice": dice(prediction, reference),
        "hd95": float(hd95),
        "nsd": within / (to_reference.size + to_prediction.size),
    }


def case_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    num_classes: int,
    spacing: Sequence[float],
    tolerance_mm: float,
) -> dict[str, list[float]]:
    """Each metric of classes 1..K-1 of two label maps: {"dice": [...], "hd95": ..., "nsd": ...}."""
    scores: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for k in range(1, num_classes):
        values = structure_metrics(prediction == k, reference == k, spacing, tolerance_mm)
        for name in METRIC_NAMES:
            scores[name].append(values[name])
    return scores
