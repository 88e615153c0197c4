"""Our tiled pyramid inference rebuilt on MONAI's `sliding_window_inference`, to time them.

The networks are torch_reference.UNet3D with the JAX levels' weights copied in. Each level
runs `sliding_window_inference` over its whole grid, coarsest first, as
autocontext_jax/inference/pyramid.py runs `predict_level`:

- the same tile (`roi_size`), overlap, batch of tiles (`sw_batch_size`) and blending
  weight: the separable Gaussian of inference/tiling.py, sigma = 1/8 of the tile, the
  same as MONAI's `mode="gaussian", sigma_scale=0.125`, except where it is small: ours
  floors each axis's weight at 1e-3, MONAI floors the 3D product. We hand MONAI ours as
  `roi_weight_map` so that the outputs can be compared voxel for voxel; the map is built
  once a call, so the timing does not depend on which one is used;
- the same padded volume and per-level box-downsampled grids (our own functions, timed on
  both sides);
- level s > 1 takes level s-1's softmax, upsampled x2 (trilinear, half-voxel centres)
  and concatenated as K input channels. Ours upsamples each tile's context inside the
  jitted tile program; here the whole coarse output is upsampled once, as a MONAI user
  would, and MONAI cuts the tiles out of the concatenated volume. Both give the same
  values: ours replicates the coarse volume's edge, as the trilinear resize does;
- an axis shorter than a tile is padded at its far end before MONAI sees it (image with
  the pad value, context with its edge), as ours pads it; MONAI would pad both ends.

What cannot match: where the tiles start. Ours spreads the starts evenly over the grid
(even voxels, for the context's alignment), MONAI steps by int(tile * (1 - overlap)) and
puts the last tile flush with the end. Both use the same number of tiles when
tile * (1 - overlap) is a whole number, so the work is the same; the outputs agree to
float32 rounding only on grids where the two layouts coincide (`aligned_shape`).

Needs `pip install torch==2.13.0 monai` (never dependencies of the package).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import monai
import numpy as np
import torch
import torch_reference
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch.nn import functional

from autocontext_jax.data.sampling import downsample_factor
from autocontext_jax.inference import tiling
from autocontext_jax.inference.pyramid import pad_to_multiple, pyramid_volumes
from autocontext_jax.models import context
from autocontext_jax.models.pyramid import AutoContextPyramid
from autocontext_jax.runtime import environment


def use_all_cores() -> int:
    """Give torch one intra-op thread per schedulable core, as XLA's CPU client takes; the count."""
    cores = environment.usable_cores()
    torch.set_num_threads(cores)
    return cores


def level_networks(variables: dict[str, Any], num_levels: int) -> list[torch_reference.UNet3D]:
    """The torch U-Net of every pyramid level, coarsest first, with the JAX weights copied in."""
    host = jax.tree.map(np.asarray, variables)
    return [
        torch_reference.unet_from_flax(tiling.level_variables(host, level))
        for level in range(1, num_levels + 1)
    ]


def with_random_statistics(variables: dict[str, Any], seed: int) -> dict[str, Any]:
    """`variables` as host arrays, every bias and BatchNorm statistic and scale drawn at random.

    At initialisation these are 0, 1 and 1, so a swapped or missed copy into torch would go
    unnoticed by the comparison; neither network's speed depends on their values.
    """
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: Any) -> np.ndarray:
        leaf = np.asarray(leaf)
        name = path[-1].key
        if name in ("bias", "mean"):
            return rng.normal(0.0, 0.2, leaf.shape).astype(leaf.dtype)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, variables)


def versions() -> str:
    """The torch and MONAI versions, for the benchmark's output."""
    return f"torch {torch.__version__}, MONAI {monai.__version__}"


def monai_starts(size: int, tile: int, overlap: float) -> list[int]:
    """The tile starts MONAI uses along an axis of `size` voxels (already padded to a tile)."""
    # monai.inferers.utils._get_scan_interval's rule: one tile when it fits exactly, else
    # a step of int(tile * (1 - overlap)), at least 1.
    step = tile if size == tile else max(int(tile * (1 - overlap)), 1)
    return [s.start for (s,) in dense_patch_slices((size,), (tile,), (step,))]


def starts_coincide(size: int, tile: int, overlap: float) -> bool:
    """Whether our tile starts and MONAI's are the same along an axis of `size` voxels."""
    size = max(size, tile)
    return tiling.tile_starts(size, tile, overlap) == monai_starts(size, tile, overlap)


def aligned_shape(
    model: AutoContextPyramid, tile: int, overlap: float, limit: int = 4096
) -> tuple[int, int, int]:
    """A small native shape on whose every level grid our tile layout and MONAI's coincide.

    Along the first axis the finest level slides over at least two tiles, so the check
    covers the blending; the other two axes are one tile at the finest level.
    """
    multiple, levels = model.padding_multiple, model.num_levels

    def smallest(finest_at_least: int) -> int:
        for size in range(multiple, limit + 1, multiple):
            grids = [size // downsample_factor(level, levels) for level in range(1, levels + 1)]
            if grids[-1] >= finest_at_least and all(
                starts_coincide(grid, tile, overlap) for grid in grids
            ):
                return size
        raise ValueError(f"no size up to {limit} where the tile {tile} layouts coincide")

    across = smallest(tile)
    try:
        along = smallest(tile + 1)
    except ValueError:  # an overlap whose step is not a whole even number: one tile only
        along = across
    return (along, across, across)


@dataclasses.dataclass
class MonaiRun:
    """Every level's blended softmax, (1, K, X, Y, Z) coarsest first, and where tiles started."""

    probabilities: list[torch.Tensor]
    corners: list[set[tuple[int, int, int]]]  # per level, the tiles' start corners

    @property
    def tiles(self) -> int:
        """Number of tiles run over all levels (without mirroring)."""
        return sum(len(level) for level in self.corners)


def _flips(mirror: bool) -> list[tuple[int, ...]]:
    # The 8 flips of the three spatial axes of a (B, C, D, H, W) tensor, as our mirroring.
    return (
        [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)]
        if mirror
        else [()]
    )


def predict_level(
    net: torch_reference.UNet3D,
    image: torch.Tensor,
    coarse_probs: torch.Tensor | None,
    pad_value: float,
    options: tiling.TilingOptions,
    sw_batch_size: int,
) -> tuple[torch.Tensor, set[tuple[int, int, int]]]:
    """Blended softmax (1, K, X, Y, Z) of one level under MONAI, and the tiles' corners.

    `image` is (1, C, X, Y, Z); `coarse_probs` the previous level's output on a grid half
    as fine, or None.
    """
    grid = image.shape[2:]
    x = image
    if coarse_probs is not None:
        up = functional.interpolate(
            coarse_probs, scale_factor=2, mode="trilinear", align_corners=False
        )
        x = torch.cat([image, up], dim=1)
    extra = [max(options.tile_size - n, 0) for n in grid]
    if any(extra):
        # torch's pad lists the last axis first, (before, after) each: far end only.
        pad = [p for e in reversed(extra) for p in (0, e)]
        channels = image.shape[1]
        parts = [functional.pad(x[:, :channels], pad, value=pad_value)]
        if coarse_probs is not None:
            parts.append(functional.pad(x[:, channels:], pad, mode="replicate"))
        x = torch.cat(parts, dim=1)
    tile = (options.tile_size,) * 3
    weight = np.einsum("i,j,k->ijk", *[tiling.tile_weight_1d(n, options.weighting) for n in tile])
    corners: set[tuple[int, int, int]] = set()
    flips = _flips(options.mirror)

    def predictor(tiles: torch.Tensor, coordinates: list) -> torch.Tensor:
        corners.update(tuple(int(s.start) for s in where[2:]) for where in coordinates)
        total = 0.0
        for axes in flips:
            flipped = torch.flip(tiles, axes) if axes else tiles
            probs = torch.softmax(net(flipped), dim=1)
            total = total + (torch.flip(probs, axes) if axes else probs)
        return total / len(flips)

    probs = sliding_window_inference(
        x,
        roi_size=tile,
        sw_batch_size=sw_batch_size,
        predictor=predictor,
        overlap=options.overlap,
        mode=options.weighting,
        sigma_scale=tiling.GAUSSIAN_SIGMA_FRACTION,
        padding_mode="constant",
        cval=pad_value,
        roi_weight_map=torch.from_numpy(weight),
        with_coord=True,
    )
    return probs[:, :, : grid[0], : grid[1], : grid[2]], corners


def predict_pyramid(
    nets: list[torch_reference.UNet3D],
    model: AutoContextPyramid,
    image: np.ndarray,
    pad_value: float,
    options: tiling.TilingOptions,
    sw_batch_size: int = 1,
) -> MonaiRun:
    """Every level of the pyramid under MONAI for a normalised (X, Y, Z) volume, as ours runs it."""
    padded = pad_to_multiple(image, model.padding_multiple, pad_value)
    volumes = pyramid_volumes(padded, model.num_levels)
    corners: list[set[tuple[int, int, int]]] = []

    def run_level(level: int, coarser: torch.Tensor | None) -> torch.Tensor:
        # (1, X, Y, Z, C) channels-last to torch's (1, C, X, Y, Z).
        volume = torch.from_numpy(volumes[level - 1]).permute(0, 4, 1, 2, 3)
        probs, where = predict_level(
            nets[level - 1], volume, coarser, pad_value, options, sw_batch_size
        )
        corners.append(where)
        return probs

    with torch.inference_mode():
        probabilities = context.coarse_to_fine(model.num_levels, model.mode, run_level)
    return MonaiRun(probabilities, corners)


def channels_last(probs: torch.Tensor) -> np.ndarray:
    """A (1, K, X, Y, Z) MONAI output as our (X, Y, Z, K) numpy layout."""
    return probs[0].permute(1, 2, 3, 0).numpy()


def our_corners(
    model: AutoContextPyramid, shape: tuple[int, ...], tile: int, overlap: float
) -> list[set[tuple[int, int, int]]]:
    """Per level, the start corners of our tiles for a native `shape` (as predict_level)."""
    padded = [n + (-n % model.padding_multiple) for n in shape]
    out = []
    for level in range(1, model.num_levels + 1):
        grid = [n // downsample_factor(level, model.num_levels) for n in padded]
        out.append(set(tiling.tile_corners(grid, tile, overlap)))
    return out
