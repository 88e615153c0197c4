"""The transform every scan goes through before the network, and its inverse.

A scan (RAS+ voxels and their `Geometry`, data/nifti.py) is resampled to the plan's
spacing and normalised by the plan; `labels_to_original` brings a label map of the
preprocessed grid back onto the scan's own grid.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from autocontext_jax.data.dataset import CaseFiles, load_run_case
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.geometry import Geometry, Scan, canonical_to_original, target_grid
from autocontext_jax.data.plan import Plan
from autocontext_jax.data.resample import resample_image, resample_labels

# The most voxels a scan's resampled grid may have: 2^30 (4 GiB as float32; a 512 x 512
# x 1000-slice CT at its own spacing has a quarter of it). More means a header whose voxel
# size is wrong (50 mm claimed for 0.8 mm), and resampling would exhaust the memory.
MAX_PREPROCESSED_VOXELS = 2**30


def planned_grid(scan: Scan, plan: Plan) -> tuple[tuple[int, int, int], tuple[float, ...]]:
    """The (shape, spacing) of `scan` on the plan's grid; a DatasetError past the limit."""
    shape, spacing = target_grid(scan.image.shape, scan.geometry.spacing, plan.target_spacing)
    voxels = math.prod(shape)
    if voxels > MAX_PREPROCESSED_VOXELS:
        raise DatasetError(
            f"{scan.source or 'the scan'}: its {tuple(scan.image.shape)} voxels of "
            f"{tuple(round(s, 3) for s in scan.geometry.spacing)} mm would resample to "
            f"{shape} = {voxels:,} voxels at the plan's {tuple(plan.target_spacing)} mm, "
            f"over the limit of {MAX_PREPROCESSED_VOXELS:,}; is the voxel size in its "
            f"header right?"
        )
    return shape, spacing


def preprocess_scan(scan: Scan, plan: Plan) -> tuple[np.ndarray, Geometry]:
    """The exact transform training applies to an image: its model-ready array and geometry.

    Resamples the RAS+ voxels of `scan` to `plan.target_spacing` (spline order
    `plan.image_order`) and normalises them with `plan`. Returns the float32 (X, Y, Z)
    array and the scan's `Geometry` with the preprocessed grid filled in.
    """
    geometry = scan.geometry
    new_shape, new_spacing = planned_grid(scan, plan)
    image = plan.normalize(resample_image(scan.image, new_shape, plan.image_order))
    return image, dataclasses.replace(
        geometry, preprocessed_shape=new_shape, preprocessed_spacing=new_spacing
    )


def labels_to_original(labels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A label map on the preprocessed grid brought back onto the original scan's grid.

    Inverts `preprocess_image`: resamples `labels` (shape `geometry.preprocessed_shape`)
    to the canonical grid, per class linearly then argmax, and undoes the reorientation,
    so the result has `geometry.original_shape` and is aligned with the original affine.
    """
    if geometry.preprocessed_shape is None:
        raise ValueError("the geometry has no preprocessed grid: preprocess the image first")
    if tuple(labels.shape) != tuple(geometry.preprocessed_shape):
        raise ValueError(
            f"labels of shape {labels.shape} are not on the preprocessed grid "
            f"{geometry.preprocessed_shape}"
        )
    canonical = resample_labels(labels, geometry.canonical_shape, "linear_argmax")
    return canonical_to_original(canonical, geometry)


def preprocess_case(
    files: CaseFiles, plan: Plan, data_config: ml_collections.ConfigDict, num_classes: int
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """The normalised image, remapped labels and geometry of a case on the plan's grid."""
    case = load_run_case(files, data_config, num_classes)
    image, geometry = preprocess_scan(dataclasses.replace(case.scan, source=str(files.image)), plan)
    label = resample_labels(case.label, geometry.preprocessed_shape, plan.label_interpolation)
    if not label.any():
        raise DatasetError(f"{files.label}: the label map has no foreground voxel")
    return image, label, geometry
