"""The whole pyramid over a whole volume, coarse to fine."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from autocontext_jax.data.sampling import box_downsample, downsample_factor
from autocontext_jax.inference.tiling import (
    TilingOptions,
    check_options,
    level_variables,
    predict_level,
    tile_starts,
)
from autocontext_jax.models import context
from autocontext_jax.models.pyramid import AutoContextPyramid
from autocontext_jax.runtime import parallel


def pad_to_multiple(volume: np.ndarray, multiple: int, value: float) -> np.ndarray:
    """Pad a 3D volume at its far ends so that every size is a multiple of `multiple`."""
    pad = [(0, -n % multiple) for n in volume.shape]
    return np.pad(volume, pad, constant_values=value)


def pyramid_volumes(image: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """The padded normalised volume downsampled for each level, as (1, X, Y, Z, 1) arrays.

    `image` must already be padded to the pyramid's `padding_multiple`, so level grids
    nest exactly and every level's grid is divisible by the U-Net's poolings.
    """
    return [
        box_downsample(image, downsample_factor(level, num_levels))[None, ..., None]
        for level in range(1, num_levels + 1)
    ]


def count_tiles(model: AutoContextPyramid, shape: Sequence[int], options: TilingOptions) -> int:
    """Number of tiles the pyramid evaluates for a volume of `shape` (no mirroring)."""
    padded = [n + (-n % model.padding_multiple) for n in shape]
    total = 0
    for level in range(1, model.num_levels + 1):
        grid = [n // downsample_factor(level, model.num_levels) for n in padded]
        total += math.prod(len(tile_starts(n, options.tile_size, options.overlap)) for n in grid)
    return total


def predict_pyramid(
    model: AutoContextPyramid,
    variables: dict[str, Any],
    image: np.ndarray,
    pad_value: float,
    options: TilingOptions,
    mesh: Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Blended softmax of every level, coarsest first, for a normalised (X, Y, Z) volume.

    The volume is padded at its far ends with `pad_value` to a multiple of
    2^levels * 2^poolings, so level grids nest exactly; level s's output covers the padded
    volume downsampled by 2^(S-s+1). By default the tiles are spread over this process's
    own devices: in a multi-host run every process predicts on its own, from its own copy
    of the (replicated) variables.
    """
    check_options(options, model.num_poolings)
    mesh = mesh or parallel.make_local_mesh()
    variables = jax.tree.map(parallel.local_copy, variables)
    padded = pad_to_multiple(image, model.padding_multiple, pad_value)
    volumes = pyramid_volumes(padded, model.num_levels)

    def run_level(level: int, coarser: np.ndarray | None) -> np.ndarray:
        variables_of_level = level_variables(variables, level)
        volume = volumes[level - 1][0]
        return predict_level(
            model, variables_of_level, volume, coarser, pad_value, options, mesh, progress
        )

    return context.coarse_to_fine(model.num_levels, model.mode, run_level)
