"""Sliding-window inference of one pyramid level over its whole grid.

A level slides tiles of one fixed shape over its grid (padded up to a tile where it is
smaller, so a folder of scans of any size compiles each level once); level s > 1 takes
level s-1's blended softmax as context everywhere, by the rule of models/context.py.
Tiles are blended with a separable weight (gaussian or constant), so the per-voxel sum of
weights is an outer product of three 1D sums and normalisation is exact without a 3D
weight volume. Host memory holds one float32 probability volume per
level and nothing per tile; device memory holds one batch of tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from autocontext_jax.models import context, conv
from autocontext_jax.models.pyramid import AutoContextPyramid
from autocontext_jax.runtime import parallel

WEIGHTINGS = ("gaussian", "constant")
# Tile edge weights relative to the centre: low enough that a neighbour's centre wins,
# high enough that a voxel seen by a single tile (corners) keeps float32 precision.
GAUSSIAN_SIGMA_FRACTION = 1 / 8
GAUSSIAN_FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class TilingOptions:
    """How tiles are laid out, weighted and batched."""

    tile_size: int = 64  # edge in voxels of the level's own grid
    overlap: float = 0.5  # fraction of the tile shared with its neighbour, in [0, 1)
    weighting: str = "gaussian"  # gaussian | constant
    mirror: bool = False  # average over the 8 flips of the three axes
    tiles_per_batch: int = 1  # per device


def check_options(options: TilingOptions, num_poolings: int) -> None:
    """Raise ValueError naming the first option the network cannot use."""
    multiple = 2**num_poolings
    if options.tile_size < multiple or options.tile_size % multiple:
        raise ValueError(
            f"tile_size={options.tile_size}: must be a positive multiple of "
            f"2^num_poolings = {multiple}"
        )
    if not 0 <= options.overlap < 1:
        raise ValueError(f"overlap={options.overlap}: must be in [0, 1)")
    if options.weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={options.weighting!r}: one of {WEIGHTINGS}")
    if options.tiles_per_batch < 1:
        raise ValueError(f"tiles_per_batch={options.tiles_per_batch}: must be >= 1")


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Even start offsets of `tile`-voxel tiles covering `size` voxels, evenly spread.

    Neighbouring tiles share at least about `overlap * tile` voxels; the first starts at
    0 and the last ends at `size`. Starts are even so that a tile's context, taken from a
    grid half as fine, begins on a coarse voxel boundary.
    """
    if tile >= size:
        return [0]
    if size % 2 or tile % 2:
        raise ValueError(f"tile {tile} and grid size {size} must both be even")
    count = math.ceil((size - tile) / max(tile * (1 - overlap), 1)) + 1
    return [2 * round(i * (size - tile) / (count - 1) / 2) for i in range(count)]


def tile_corners(grid: Sequence[int], tile: int, overlap: float) -> list[tuple[int, int, int]]:
    """The start corners of the `tile`^3 tiles predict_level cuts a level's grid into.

    An axis shorter than a tile gets one tile, at 0 (predict_level pads it to the tile).
    """
    return list(itertools.product(*(tile_starts(n, tile, overlap) for n in grid)))


def tile_weight_1d(tile: int, weighting: str) -> np.ndarray:
    """The 1D blending weight of a tile; the 3D weight is the outer product of three."""
    if weighting == "constant":
        return np.ones(tile, np.float32)
    offsets = np.arange(tile) - (tile - 1) / 2
    weight = np.exp(-0.5 * (offsets / (GAUSSIAN_SIGMA_FRACTION * tile)) ** 2)
    return np.maximum(weight, GAUSSIAN_FLOOR).astype(np.float32)


def weight_sum_1d(size: int, starts: Sequence[int], weight: np.ndarray) -> np.ndarray:
    """Sum over the tiles of one axis of their weights at every voxel of that axis."""
    total = np.zeros(size, np.float64)
    for start in starts:
        total[start : start + len(weight)] += weight
    return total


def level_variables(variables: dict[str, Any], level: int) -> dict[str, Any]:
    """The parameters and BatchNorm statistics of pyramid `level` (1 = coarsest)."""
    name = f"level_{level}"
    return {"params": variables["params"][name], "batch_stats": variables["batch_stats"][name]}


@functools.lru_cache(maxsize=32)
def make_tile_predictor(
    model: AutoContextPyramid,
    tile_shape: tuple[int, int, int],
    weighting: str,
    mirror: bool,
    with_context: bool,
    mesh: Mesh,
    batch_statistics: bool = False,
) -> Callable[..., jax.Array]:
    """A jitted (variables, images, coarse_context) -> weighted softmax of a batch of tiles.

    `images` is (B, *tile_shape, C); `coarse_context` is (B, *(tile_shape / 2 + 2), K),
    the previous level's probabilities with a one-voxel margin, or None without context.
    The batch is split over the mesh; the weights are replicated. Cached, so a folder of
    scans compiles each level and tile shape once. `batch_statistics` normalises with
    each batch's own BatchNorm statistics, as training does (diagnostics only; the
    running statistics are left as they are).
    """
    net = model.level_network()
    weights = [tile_weight_1d(n, weighting) for n in tile_shape]
    weight = np.einsum("i,j,k->ijk", *weights)[None, ..., None]
    flips = (
        [axes for r in range(4) for axes in itertools.combinations((1, 2, 3), r)]
        if mirror
        else [()]
    )

    def predict(variables, images, coarse_context):
        x = images
        if with_context:
            # Upsample x2 with the margin, then drop it: identical to upsampling the whole
            # coarse volume, whose borders the caller replicated into the margin.
            x = context.finer_input(images, coarse_context)
        total = 0.0
        for axes in flips:
            flipped = jnp.flip(x, axes) if axes else x
            if batch_statistics:
                logits, _ = net.apply(variables, flipped, train=True, mutable=["batch_stats"])
            else:
                logits = net.apply(variables, flipped, train=False)
            probs = jax.nn.softmax(logits, axis=-1)
            total = total + (jnp.flip(probs, axes) if axes else probs)
        return total * (weight / len(flips))

    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(
        predict,
        in_shardings=(replicated, sharded, sharded if with_context else None),
        out_shardings=sharded,
        compiler_options=conv.compiler_options(model.conv_impl),
    )


def _batches(corners: list[tuple[int, int, int]], size: int) -> Iterator[list]:
    for i in range(0, len(corners), size):
        batch = corners[i : i + size]
        # The last batch repeats its final tile so every batch has one compiled shape.
        yield batch + [batch[-1]] * (size - len(batch))


def _region(corner: Sequence[int], tile_shape: Sequence[int], half: bool = False) -> tuple:
    if half:
        return tuple(
            slice(c // 2, c // 2 + t // 2 + 2) for c, t in zip(corner, tile_shape, strict=True)
        )
    return tuple(slice(c, c + t) for c, t in zip(corner, tile_shape, strict=True))


def predict_level(
    model: AutoContextPyramid,
    variables: dict[str, Any],
    image: np.ndarray,
    coarse_probs: np.ndarray | None,
    pad_value: float,
    options: TilingOptions,
    mesh: Mesh,
    progress: Callable[[int], None] | None = None,
    batch_statistics: bool = False,
) -> np.ndarray:
    """Blended softmax (X, Y, Z, K) of one level over its (X, Y, Z, C) grid.

    `coarse_probs` is the previous level's output on a grid half as fine, or None for
    the first level (or a pyramid without context). Every tile is `options.tile_size`
    voxels along each axis: an axis shorter than that is padded at its far end (image
    with `pad_value`, context with its edge) and cropped off again, so the predictor
    compiles once per level whatever the scan's size. `batch_statistics`: see
    `make_tile_predictor`.
    """
    grid = image.shape[:3]
    tile_shape = (options.tile_size,) * 3
    full = tuple(max(n, t) for n, t in zip(grid, tile_shape, strict=True))
    extra = [f - n for f, n in zip(full, grid, strict=True)]
    if any(extra):
        image = np.pad(image, [(0, e) for e in extra] + [(0, 0)], constant_values=pad_value)
    corners = tile_corners(grid, options.tile_size, options.overlap)
    starts = [tile_starts(n, t, options.overlap) for n, t in zip(full, tile_shape, strict=True)]
    with_context = coarse_probs is not None
    predictor = make_tile_predictor(
        model, tile_shape, options.weighting, options.mirror, with_context, mesh, batch_statistics
    )
    batch_size = options.tiles_per_batch * mesh.size
    sharding = parallel.batch_sharded(mesh)
    if with_context:
        # One replicated voxel around the coarse volume (the edge behaviour of a resize),
        # and the edge carried on over any padding of the grid.
        margins = [(1, 1 + e // 2) for e in extra] + [(0, 0)]
        padded = np.pad(coarse_probs, margins, mode="edge")
    accumulator = np.zeros((*full, model.num_classes), np.float32)

    def tiles(batch):
        images = np.stack([image[_region(corner, tile_shape)] for corner in batch])
        if not with_context:
            return jax.device_put(images, sharding), None
        # Coarse voxels c/2 - 1 .. (c + t)/2 + 1, shifted by the one-voxel edge padding.
        context = np.stack([padded[_region(corner, tile_shape, half=True)] for corner in batch])
        return jax.device_put(images, sharding), jax.device_put(context, sharding)

    def accumulate(batch, count, result):
        result = np.asarray(result)
        for corner, tile_probs in zip(batch[:count], result[:count], strict=True):
            accumulator[_region(corner, tile_shape)] += tile_probs
        if progress is not None:
            progress(count)

    # Dispatch batch k + 1 before reading batch k back, so host and device overlap.
    pending = None
    for index, batch in enumerate(_batches(corners, batch_size)):
        count = min(batch_size, len(corners) - index * batch_size)
        result = predictor(variables, *tiles(batch))
        if pending is not None:
            accumulate(*pending)
        pending = (batch, count, result)
    accumulate(*pending)

    sums = [
        weight_sum_1d(n, s, tile_weight_1d(t, options.weighting)).astype(np.float32)
        for n, s, t in zip(full, starts, tile_shape, strict=True)
    ]
    # In place, slab by slab: no second volume of the level's size.
    for x in range(grid[0]):
        accumulator[x] /= (sums[0][x] * np.multiply.outer(sums[1], sums[2]))[..., None]
    if any(extra):
        return np.ascontiguousarray(accumulator[: grid[0], : grid[1], : grid[2]])
    return accumulator
