"""Sliding-window inference of the auto-context pyramid over whole volumes, coarse to fine.

Each level slides tiles over its own grid; level s > 1 takes level s-1's blended softmax,
upsampled x2 with the pyramid's own `upsample_and_crop`, as context everywhere. Tiles
are blended with a separable weight (gaussian or constant), so the per-voxel sum of
weights is an outer product of three 1D sums and normalisation is exact without a 3D
weight volume. Host memory holds one float32 probability volume per level and nothing
per tile; device memory holds one batch of tiles.
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

from autocontext_jax import parallel
from autocontext_jax.evaluate import pad_to_multiple, pyramid_volumes
from autocontext_jax.models import conv
from autocontext_jax.models.pyramid import AutoContextPyramid, upsample_and_crop
from autocontext_jax.models.unet import UNet3D

WEIGHTINGS = ("gaussian", "constant")
# Output-grid probabilities interpolated at a time (128 MB of float32) when a level's
# output is brought to the native or the scan's grid.
SLAB_VALUES = 2**25
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


def _level_network(model: AutoContextPyramid) -> UNet3D:
    # A level's parameters are the subtree `level_s` of the pyramid's, so a standalone
    # U-Net with the same fields applies them unchanged.
    return UNet3D(
        num_classes=model.num_classes,
        width=model.width,
        num_poolings=model.num_poolings,
        dtype=model.dtype,
        bn_momentum=model.bn_momentum,
    )


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
) -> Callable[..., jax.Array]:
    """A jitted (variables, images, coarse_context) -> weighted softmax of a batch of tiles.

    `images` is (B, *tile_shape, C); `coarse_context` is (B, *(tile_shape / 2 + 2), K),
    the previous level's probabilities with a one-voxel margin, or None without context.
    The batch is split over the mesh; the weights are replicated. Cached, so a folder of
    scans compiles each level and tile shape once.
    """
    net = _level_network(model)
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
            context = upsample_and_crop(coarse_context, tile_shape)
            x = jnp.concatenate([images, context.astype(images.dtype)], axis=-1)
        total = 0.0
        for axes in flips:
            logits = net.apply(variables, jnp.flip(x, axes) if axes else x, train=False)
            probs = jax.nn.softmax(logits, axis=-1)
            total = total + (jnp.flip(probs, axes) if axes else probs)
        return total * (weight / len(flips))

    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(
        predict,
        in_shardings=(replicated, sharded, sharded if with_context else None),
        out_shardings=sharded,
        compiler_options=conv.compiler_options(),
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
    options: TilingOptions,
    mesh: Mesh,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Blended softmax (X, Y, Z, K) of one level over its (X, Y, Z, C) grid.

    `coarse_probs` is the previous level's output on a grid half as fine, or None for
    the first level (or a pyramid without context).
    """
    grid = image.shape[:3]
    tile_shape = tuple(min(options.tile_size, n) for n in grid)
    starts = [tile_starts(n, t, options.overlap) for n, t in zip(grid, tile_shape, strict=True)]
    corners = list(itertools.product(*starts))
    with_context = coarse_probs is not None
    predictor = make_tile_predictor(
        model, tile_shape, options.weighting, options.mirror, with_context, mesh
    )
    batch_size = options.tiles_per_batch * mesh.size
    sharding = parallel.batch_sharded(mesh)
    if with_context:
        # One replicated voxel around the coarse volume: the edge behaviour of a resize.
        padded = np.pad(coarse_probs, [(1, 1)] * 3 + [(0, 0)], mode="edge")
    accumulator = np.zeros((*grid, model.num_classes), np.float32)

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
        for n, s, t in zip(grid, starts, tile_shape, strict=True)
    ]
    # In place, slab by slab: no second volume of the level's size.
    for x in range(grid[0]):
        accumulator[x] /= (sums[0][x] * np.multiply.outer(sums[1], sums[2]))[..., None]
    return accumulator


def count_tiles(
    shape: Sequence[int], num_levels: int, num_poolings: int, options: TilingOptions
) -> int:
    """Number of tiles the pyramid evaluates for a native volume of `shape` (no mirroring)."""
    padded = [n + (-n % (2 ** (num_levels + num_poolings))) for n in shape]
    total = 0
    for level in range(1, num_levels + 1):
        factor = 2 ** (num_levels - level + 1)
        grid = [n // factor for n in padded]
        total += math.prod(
            len(tile_starts(n, min(options.tile_size, n), options.overlap)) for n in grid
        )
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
    multiple = 2**model.num_levels * 2**model.num_poolings
    volumes = pyramid_volumes(pad_to_multiple(image, multiple, pad_value), model.num_levels)
    outputs: list[np.ndarray] = []
    for level, volume in enumerate(volumes, start=1):
        context = outputs[-1] if level > 1 and model.mode != "none" else None
        outputs.append(
            predict_level(
                model,
                level_variables(variables, level),
                volume[0],
                context,
                options,
                mesh,
                progress,
            )
        )
    return outputs


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
