"""Resampling a volume onto another grid of the same extent: images by splines, labels per class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autocontext_jax.data.geometry import grid_map


def resample_image(volume: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """A 3D float volume resampled onto `new_shape` (spline `order`: 1 linear, 3 cubic)."""
    if tuple(volume.shape) == tuple(new_shape):
        return np.asarray(volume, dtype=np.float32)
    scale, offset = grid_map(volume.shape, new_shape)
    return ndimage.affine_transform(
        np.asarray(volume, dtype=np.float32),
        scale,
        offset,
        output_shape=tuple(new_shape),
        output=np.float32,
        order=order,
        mode="nearest",
        prefilter=order > 1,
    )


def resample_labels(labels: np.ndarray, new_shape: Sequence[int], method: str) -> np.ndarray:
    """A uint8 label map resampled onto `new_shape`.

    `linear_argmax` interpolates each class's indicator linearly and takes the argmax, so
    a vessel one voxel wide survives a change of spacing; `nearest` copies the nearest voxel.
    """
    labels = np.asarray(labels, dtype=np.uint8)
    if tuple(labels.shape) == tuple(new_shape):
        return labels.copy()
    scale, offset = grid_map(labels.shape, new_shape)
    if method == "nearest":
        return ndimage.affine_transform(
            labels, scale, offset, output_shape=tuple(new_shape), order=0, mode="nearest"
        )
    best = np.full(tuple(new_shape), -1.0, np.float32)
    out = np.zeros(tuple(new_shape), np.uint8)
    for k in np.unique(labels):
        weight = ndimage.affine_transform(
            (labels == k).astype(np.float32),
            scale,
            offset,
            output_shape=tuple(new_shape),
            output=np.float32,
            order=1,
            mode="nearest",
        )
        better = weight > best
        best[better], out[better] = weight[better], k
    return out
