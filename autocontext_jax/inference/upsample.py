"""A level's probabilities brought onto the scan's grid: interpolated once, on the device."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Output-grid probabilities interpolated at a time (128 MB of float32) when a level's
# output is brought to the native or the scan's grid.
SLAB_VALUES = 2**25


def upsample_to_native(
    probs: np.ndarray,
    factor: int,
    native_shape: Sequence[int],
    labels_only: bool = True,
    grid_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Labels (uint8) or float16 probabilities of a level's output, on the native grid or another.

    `probs` covers the native volume (`native_shape`, padded at its far ends) downsampled
    by `factor`. The result is on `grid_shape`, a grid spanning the same extent as the
    native one (by default the native grid itself; the scan's canonical grid to undo
    preprocessing's resampling): each class is interpolated linearly (voxel centres at
    half-voxel positions, edges clamped), then the argmax is taken, so the probabilities
    are resampled once, with no intermediate label map. The work runs on the device, a
    slab of the first axis at a time, so only a slab of output-grid probabilities exists.
    """
    grid_shape = tuple(native_shape if grid_shape is None else grid_shape)
    maps = [
        _linear_map(out, native, coarse, factor)
        for out, native, coarse in zip(grid_shape, native_shape, probs.shape[:3], strict=True)
    ]
    channels = probs.shape[-1]
    if labels_only:
        out = np.empty(grid_shape, np.uint8)
    else:
        out = np.empty((*grid_shape, channels), np.float16)
    rows = max(1, min(grid_shape[0], SLAB_VALUES // (math.prod(grid_shape[1:]) * channels)))
    low, high, weight = maps[0]
    starts = range(0, grid_shape[0], rows)
    # Every slab reads the same number of coarse rows, so one compilation serves them all.
    span = max(int(high[i : i + rows].max() - low[i : i + rows].min()) + 1 for i in starts)
    for first in starts:
        count = min(rows, grid_shape[0] - first)
        base = min(int(low[first]), probs.shape[0] - span)
        pad = (0, rows - count)
        slab_map = tuple(
            np.pad(a[first : first + count], pad, mode="edge")
            for a in (low - base, high - base, weight)
        )
        slab = _interpolate_slab(
            jnp.asarray(probs[base : base + span]), slab_map, maps[1], maps[2], labels_only
        )
        out[first : first + count] = np.asarray(slab)[:count]
    return out


def _linear_map(
    size_out: int, size_native: int, size_coarse: int, factor: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, upper weight) of each output voxel along one axis."""
    # Voxel centres at half-voxel positions: output voxel i sits at native coordinate
    # (i + 1/2) * native / out - 1/2, and native coordinate x at coarse (x + 1/2) / f - 1/2.
    position = (np.arange(size_out) + 0.5) * (size_native / size_out) / factor - 0.5
    position = np.clip(position, 0, size_coarse - 1)
    low = np.floor(position).astype(np.int32)
    high = np.minimum(low + 1, size_coarse - 1)
    return low, high, (position - low).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("labels_only",))
def _interpolate_slab(
    probs: jax.Array, map_x: tuple, map_y: tuple, map_z: tuple, labels_only: bool
) -> jax.Array:
    for axis, (low, high, weight) in enumerate((map_x, map_y, map_z)):
        weight = weight.reshape((-1,) + (1,) * (probs.ndim - axis - 1))
        probs = jnp.take(probs, low, axis) * (1 - weight) + jnp.take(probs, high, axis) * weight
    if labels_only:
        return jnp.argmax(probs, axis=-1).astype(jnp.uint8)
    return probs.astype(jnp.float16)
