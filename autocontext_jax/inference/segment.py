"""The one road from a scan to labels: the run's plan, the tiled pyramid, back onto the scan.

`predict`, `evaluate`, `plot` and the end-of-run evaluation all segment through
`segment`, so what a report scores, a figure draws and a file holds are the same labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from autocontext_jax.data.geometry import Geometry, Scan
from autocontext_jax.data.preprocess import planned_grid, preprocess_scan
from autocontext_jax.data.sampling import downsample_factor
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


def segment(
    run: Run,
    scan: Scan,
    options: TilingOptions | None = None,
    all_levels: bool = True,
    probabilities: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Segmentation:
    """Segment `scan` with `run`: every level's labels (or the finest's) on the scan's grid.

    The scan goes through the run's own plan (resampling, normalisation); each level
    slides `options`' tiles (default: the run's, twice the training crop) coarse to fine;
    each level's probabilities are interpolated once, straight onto the scan's canonical
    grid, and the argmax is taken there. `progress(n)` is called as tiles finish.
    """
    options = options or default_options(run.config)
    check_options(options, run.model.num_poolings)
    volume, geometry = preprocess_scan(scan, run.plan)
    model = run.model
    probs = predict_pyramid(
        model, run.variables, volume, run.plan.pad_value, options, progress=progress
    )
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
        tiles=count_tiles(model, volume.shape, options),
    )


def tiles_of(run: Run, scan: Scan, options: TilingOptions | None = None) -> int:
    """How many tiles `segment` evaluates for `scan` (for a progress bar)."""
    options = options or default_options(run.config)
    shape, _ = planned_grid(scan, run.plan)
    return count_tiles(run.model, shape, options)
