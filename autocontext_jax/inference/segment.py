"""The one road from a scan to labels: the run's plan, the tiled pyramid, back onto the scan.

`predict`, `evaluate`, `plot` and the end-of-run evaluation all segment through
`segment`, so what a report scores, a figure draws and a file holds are the same labels.
An ensemble (a `Model` of several runs) takes the same road: each member runs its own
pyramid coarse to fine, and the members' softmax of each level is averaged before the
argmax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from autocontext_jax.data.geometry import Geometry, Scan
from autocontext_jax.data.preprocess import planned_grid, preprocess_scan
from autocontext_jax.data.sampling import downsample_factor
from autocontext_jax.inference.model import Model, as_model
from autocontext_jax.inference.pyramid import count_tiles, predict_pyramid
from autocontext_jax.inference.run import Run, default_options
from autocontext_jax.inference.tiling import TilingOptions, check_options
from autocontext_jax.inference.upsample import upsample_to_native


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """Labels of a scan on its canonical (RAS+) grid, and the geometry to write them with."""

    # uint8 labels of levels 1 (coarsest) .. S (finest); None for a level not asked for.
    levels: list[np.ndarray | None]
    # float16 (X, Y, Z, K) probabilities of the finest level, when asked for.
    probabilities: np.ndarray | None
    geometry: Geometry
    tiles: int

    @property
    def finest(self) -> np.ndarray:
        """The labels of the finest level: the pyramid's output."""
        return self.levels[-1]


def _cropped(levels: list[np.ndarray], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Each level's probabilities cut to `shapes` (members padded to different multiples)."""
    return [
        probs if probs.shape[:3] == shape else probs[: shape[0], : shape[1], : shape[2]]
        for probs, shape in zip(levels, shapes, strict=True)
    ]


def ensemble_pyramid(
    model: Model,
    volume: np.ndarray,
    options: TilingOptions,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Each level's softmax averaged over the members, each running its own pyramid.

    A single member's probabilities are returned untouched, so a one-member model is that
    run, bit for bit. Members padded to different multiples (other poolings) are averaged
    over the grid they share, which covers the whole scan.
    """
    total: list[np.ndarray] | None = None
    for member in model.members:
        probs = predict_pyramid(
            member.model,
            member.variables,
            volume,
            member.plan.pad_value,
            options,
            progress=progress,
        )
        if total is None:
            total = probs
            continue
        # Summed in float32 one member at a time: one member's levels are held at once.
        shapes = [
            tuple(min(a, b) for a, b in zip(t.shape[:3], p.shape[:3], strict=True))
            for t, p in zip(total, probs, strict=True)
        ]
        total = [
            np.add(t, p, dtype=np.float32)
            for t, p in zip(_cropped(total, shapes), _cropped(probs, shapes), strict=True)
        ]
        del probs
    if len(model.members) > 1:
        total = [t / np.float32(len(model.members)) for t in total]
    return total


def segment(
    model: Model | Run,
    scan: Scan,
    options: TilingOptions | None = None,
    all_levels: bool = True,
    probabilities: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Segmentation:
    """Segment `scan` with a run or an ensemble: every level's labels (or the finest's).

    The scan goes through the run's own plan (resampling, normalisation); each level
    slides `options`' tiles (default: the run's, twice the training crop) coarse to fine;
    each level's probabilities (averaged over an ensemble's members) are interpolated
    once, straight onto the scan's canonical grid, and the argmax is taken there.
    `progress(n)` is called as tiles finish.
    """
    model = as_model(model)
    options = options or default_options(model.config)
    check_options(options, model.num_poolings)
    volume, geometry = preprocess_scan(scan, model.plan)
    probs = ensemble_pyramid(model, volume, options, progress)
    finest = model.num_levels

    def on_scan_grid(level: int, labels_only: bool = True) -> np.ndarray:
        return upsample_to_native(
            probs[level - 1],
            downsample_factor(level, finest),
            volume.shape,
            labels_only,
            grid_shape=geometry.canonical_shape,
        )

    levels = [
        on_scan_grid(level) if all_levels or level == finest else None
        for level in range(1, finest + 1)
    ]
    return Segmentation(
        levels=levels,
        probabilities=on_scan_grid(finest, labels_only=False) if probabilities else None,
        geometry=geometry,
        tiles=sum(count_tiles(member.model, volume.shape, options) for member in model.members),
    )


def tiles_of(model: Model | Run, scan: Scan, options: TilingOptions | None = None) -> int:
    """How many tiles `segment` evaluates for `scan` (for a progress bar), over every member."""
    model = as_model(model)
    options = options or default_options(model.config)
    shape, _ = planned_grid(scan, model.plan)
    return sum(count_tiles(member.model, shape, options) for member in model.members)
