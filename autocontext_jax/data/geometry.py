"""The geometry of a scan: made by the reader, carried untouched to the writer.

A scan is read once (data/nifti.py) into its voxels in canonical RAS+ order and a
`Geometry`: the grid and header it came with, the canonical grid, and once preprocessed,
the resampled grid the model sees. Everything that brings a result back onto the scan
(reorientation, the writer's header) reads it from this object, never from elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import nibabel as nib
import numpy as np

RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The voxel grid of a scan as read, of its canonical (RAS+) version, and once
    preprocessed, of the resampled grid the model sees (None before preprocessing).

    The header fields (qform, sform and their codes, voxel sizes, units) are those of the
    file read, so that a label map written with this geometry carries the same header; a
    geometry rebuilt from a preprocessing cache has none (None).
    """

    original_shape: tuple[int, ...]
    original_affine: np.ndarray
    canonical_affine: np.ndarray
    spacing: tuple[float, float, float]
    preprocessed_shape: tuple[int, int, int] | None = None
    preprocessed_spacing: tuple[float, float, float] | None = None
    qform: np.ndarray | None = None
    qform_code: int = 0
    sform: np.ndarray | None = None
    sform_code: int = 0
    zooms: tuple[float, float, float] | None = None
    xyzt_units: tuple[str, str] = ("mm", "sec")

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """The shape of the scan reoriented to RAS+ (a permutation of the original shape)."""
        order = nib.orientations.io_orientation(self.original_affine)[:, 0].astype(int)
        shape = [0, 0, 0]
        for axis, target in enumerate(order):
            shape[target] = int(self.original_shape[axis])
        return tuple(shape)

    def to_json(self) -> dict:
        """A JSON-serialisable description of the grids (the header fields are not kept)."""
        return {
            "original_shape": list(self.original_shape),
            "original_affine": self.original_affine.tolist(),
            "canonical_affine": self.canonical_affine.tolist(),
            "spacing": list(self.spacing),
            "preprocessed_shape": _list_or_none(self.preprocessed_shape),
            "preprocessed_spacing": _list_or_none(self.preprocessed_spacing),
        }

    @classmethod
    def from_json(cls, data: dict) -> Geometry:
        """The geometry that `to_json` described."""
        return cls(
            original_shape=tuple(int(n) for n in data["original_shape"]),
            original_affine=np.asarray(data["original_affine"], dtype=np.float64),
            canonical_affine=np.asarray(data["canonical_affine"], dtype=np.float64),
            spacing=tuple(float(z) for z in data["spacing"]),
            preprocessed_shape=_tuple_or_none(data.get("preprocessed_shape"), int),
            preprocessed_spacing=_tuple_or_none(data.get("preprocessed_spacing"), float),
        )


def _list_or_none(values) -> list | None:
    return None if values is None else list(values)


def _tuple_or_none(values, kind) -> tuple | None:
    return None if values is None else tuple(kind(v) for v in values)


def image_geometry(image: nib.Nifti1Image, canonical: nib.Nifti1Image) -> Geometry:
    """The geometry of a NIfTI scan and of its canonical version, before any resampling."""
    affine = np.asarray(canonical.affine, dtype=np.float64)
    header = image.header
    qform, qform_code = header.get_qform(coded=True)
    sform, sform_code = header.get_sform(coded=True)
    return Geometry(
        original_shape=tuple(int(n) for n in image.shape),
        original_affine=np.asarray(image.affine, dtype=np.float64),
        canonical_affine=affine,
        # Column norms, not the header's zooms: right for oblique affines too.
        spacing=tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)),
        qform=None if qform is None else np.asarray(qform, np.float64),
        qform_code=int(qform_code),
        sform=None if sform is None else np.asarray(sform, np.float64),
        sform_code=int(sform_code),
        zooms=tuple(float(z) for z in header.get_zooms()[:3]),
        xyzt_units=tuple(header.get_xyzt_units()),
    )


def canonical_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel size along R, A, S of a grid with voxel-to-world `affine`."""
    zooms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    spacing = [0.0, 0.0, 0.0]
    for axis, target in enumerate(nib.orientations.io_orientation(affine)[:, 0].astype(int)):
        spacing[target] = float(zooms[axis])
    return tuple(spacing)


def canonical_to_original(volume: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Undo the reorientation to RAS+ of a (X, Y, Z, ...) volume on the canonical grid."""
    to_original = nib.orientations.ornt_transform(
        RAS, nib.orientations.io_orientation(geometry.original_affine)
    )
    return np.ascontiguousarray(nib.orientations.apply_orientation(volume, to_original))


def grid_map(old_shape: Sequence[int], new_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset): voxel j of the new grid sits at old voxel coordinate scale * j + offset.

    Both grids span the same extent, with voxel centres at half-voxel positions.
    """
    scale = np.asarray(old_shape, np.float64) / np.asarray(new_shape, np.float64)
    return scale, 0.5 * scale - 0.5


def target_grid(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The shape covering the same extent at `target` spacing, and its exact spacing."""
    new_shape = tuple(
        max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)
    )
    new_spacing = tuple(s * n / m for n, s, m in zip(shape, spacing, new_shape, strict=True))
    return new_shape, new_spacing


def preprocessed_affine(geometry: Geometry) -> np.ndarray:
    """The voxel-to-world affine of the preprocessed grid."""
    scale, offset = grid_map(geometry.canonical_shape, geometry.preprocessed_shape)
    grid = np.eye(4)
    grid[:3, :3] = np.diag(scale)
    grid[:3, 3] = offset
    return geometry.canonical_affine @ grid


@dataclasses.dataclass(frozen=True)
class Scan:
    """A scan as the reader made it: float32 HU voxels in RAS+ order and their geometry."""

    image: np.ndarray  # (X, Y, Z), canonical (RAS+) voxel order
    geometry: Geometry
    source: str = ""  # the file it was read from, for messages ("" when not from a file)
