"""Generating one phantom case: its tissues painted, rendered to HU, and its affine.

Geometry is specified in millimetres for a reference body that fills the default field of view
(192 x 168 x 144 mm) and is scaled to the random body of each case, so a different voxel spacing
gives the same anatomy in mm. Vessel radii are absolute millimetres (only shrunk for small fields
of view). Voxel axes point to the patient's left, anterior and superior; the written affine
says so (LAS+: its first column is negative), so the liver lies on the patient's right in world
coordinates and a viewer shows the anatomy the right way round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autocontext_jax.data.labels import PAPER_CLASS_NAMES
from autocontext_jax.phantom.anatomy import _T, _TISSUES, _tissue_labels
from autocontext_jax.phantom.fields import _smooth_noise
from autocontext_jax.phantom.painters import _paint_tissues, _Painter

DEFAULT_SHAPE = (128, 112, 96)  # voxels (x, y, z)
DEFAULT_SPACING = (1.5, 1.5, 1.5)  # mm

# A drawn case is redrawn when a class covers less than this volume.
_MIN_CLASS_MM3 = 300.0
_MAX_DRAWS = 8


def _render(rng: np.random.Generator, p: _Painter) -> np.ndarray:
    """CT image of the painted tissues: HU per tissue, smooth inhomogeneity, blur, noise, int16."""
    hu = np.array([rng.uniform(*t.hu) for t in _TISSUES], dtype=np.float32)
    # Late arterial phase: the portal vein enhances less than the arteries, by a random margin
    # wide enough for a small network to tell the two vessel trees apart in minutes.
    artery, portal = _T["artery"], _T["portal_vein"]
    hu[portal] = np.clip(hu[artery] - rng.uniform(50.0, 90.0), 150.0, 220.0)
    hu[_T["air"] + 1 :] += rng.uniform(-5.0, 5.0)  # per-scan calibration offset, not for air
    image = hu[p.tissue]
    # Slight smooth inhomogeneity within organs (and everywhere else).
    image += rng.uniform(3.0, 6.0) * _smooth_noise(rng, p.full(), 40.0)
    sigma_mm = rng.uniform(0.9, 1.2)  # partial volume / scanner point spread
    image = ndimage.gaussian_filter(image, sigma=sigma_mm / p.spacing, truncate=3.0)
    # Quantum noise of a low-noise reconstruction (thin vessels stay visible at 1.5 mm).
    image += rng.normal(0.0, rng.uniform(6.0, 14.0), size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def generate_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image int16 HU, label uint8) arrays of `shape` for one random phantom case."""
    shape = tuple(int(n) for n in shape)
    spacing_arr = np.asarray(spacing, dtype=float)
    to_label = _tissue_labels()
    min_voxels = max(10, int(_MIN_CLASS_MM3 / float(np.prod(spacing_arr))))
    for _ in range(_MAX_DRAWS):
        painter = _Painter(rng, shape, spacing_arr)
        _paint_tissues(painter)
        label = to_label[painter.tissue]
        counts = np.bincount(label.ravel(), minlength=len(PAPER_CLASS_NAMES))
        # A draw whose random anatomy lost a structure (e.g. out of a small field of view) is
        # redrawn from the same stream, so every case has every class.
        if counts.min() >= min_voxels:
            return _render(rng, painter), label
    raise RuntimeError(f"phantom draw lacks classes after {_MAX_DRAWS} tries: counts {counts}")


def _case_affine(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float]
) -> np.ndarray:
    """LAS+ affine (voxel x runs to the patient's left), centred near world 0 (+-3 cm)."""
    directions = np.array([-1.0, 1.0, 1.0])
    steps = directions * np.asarray(spacing, dtype=float)
    centre = (np.asarray(shape) - 1) / 2.0 * steps
    affine = np.diag([*steps, 1.0])
    affine[:3, 3] = -centre + rng.uniform(-30.0, 30.0, 3)
    return affine
