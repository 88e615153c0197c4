"""NIfTI in, NIfTI out: scans read into voxels and a `Geometry`, results written with it.

Reading reorients a scan to RAS+ and records the grid and header it came with; writing
takes a volume on that canonical grid and the same `Geometry`, undoes the reorientation
and writes the scan's own affine, qform/sform codes and voxel sizes, so the output
overlays the input in any viewer. Every file is written atomically (data/atomic.py).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from autocontext_jax.data.atomic import write_atomically
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.geometry import Geometry, Scan, canonical_to_original, image_geometry

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# nnU-Net names the one CT channel of case CASE `CASE_0000.nii.gz` and its labels `CASE.nii.gz`.
CHANNEL_SUFFIX = "_0000"


def is_nifti_name(path: str | os.PathLike) -> bool:
    """Whether the file name ends in .nii or .nii.gz."""
    return str(path).endswith(NIFTI_SUFFIXES)


def case_name(path: str | os.PathLike) -> str:
    """The file name without its NIfTI suffix."""
    name = pathlib.Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_id(path: str | os.PathLike) -> str:
    """The case a scan file holds, as nnU-Net names it: `case_0000.nii.gz` -> `case`."""
    return case_name(path).removesuffix(CHANNEL_SUFFIX)


def read_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """The NIfTI image at `path`, with a 3D shape (a trailing axis of 1 is dropped)."""
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for foreign or corrupt files
        raise DatasetError(f"{path}: cannot read as NIfTI ({error})") from error
    if not isinstance(image, nib.Nifti1Image):
        # nibabel also opens Analyze, MGH, MINC...: formats without a NIfTI header to copy.
        raise DatasetError(f"{path}: not a NIfTI file ({type(image).__name__})")
    return checked_3d(image, path)


def check_affine(affine: np.ndarray, path: str | os.PathLike) -> None:
    """Raise a DatasetError naming `path` when its voxel-to-world affine is unusable.

    A NaN or infinite entry, or a singular 3x3 part (a zero voxel size, two axes along
    one direction), leaves no orientation to reorient by and no voxel volume: nibabel
    would fail deep inside (an SVD that does not converge, "cannot drop coordinates").
    """
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise DatasetError(
            f"{path}: its affine (the header's voxel-to-world sform/qform) holds NaN or "
            "infinite values"
        )
    if np.linalg.matrix_rank(affine[:3, :3]) < 3:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        raise DatasetError(
            f"{path}: its affine (the header's voxel-to-world sform/qform) is singular "
            f"(voxel sizes {np.round(spacing, 4).tolist()} mm, or two axes along one direction)"
        )


def checked_3d(image: nib.Nifti1Image, path: str | os.PathLike) -> nib.Nifti1Image:
    """`image` as a 3D volume with a usable affine, or a DatasetError naming `path`."""
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {shape}")
    check_affine(image.affine, path)
    return image


def canonical_voxels(image: nib.Nifti1Image, path: str | os.PathLike) -> np.ndarray:
    """The whole voxel array of `image` reoriented to RAS+."""
    canonical = nib.as_closest_canonical(image)
    try:
        # Reading every voxel is where a truncated file fails.
        return np.asarray(canonical.dataobj)
    except Exception as error:
        raise DatasetError(f"{path}: cannot read the voxel data ({error})") from error


def finite_hu(data: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """The voxels as float32, or a DatasetError naming `path` for NaN or infinite ones."""
    hu = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(hu)):
        raise DatasetError(f"{path}: contains NaN or infinite intensities")
    return hu


def scan_from_image(image: nib.Nifti1Image, path: str | os.PathLike = "<image>") -> Scan:
    """The scan of an opened NIfTI image: HU voxels in RAS+ order and the image's geometry."""
    image = checked_3d(image, path)
    geometry = image_geometry(image, nib.as_closest_canonical(image))
    return Scan(finite_hu(canonical_voxels(image, path), path), geometry, source=str(path))


def read_scan(path: str | os.PathLike) -> Scan:
    """Read a CT scan: float32 HU voxels in RAS+ order and the file's geometry."""
    return scan_from_image(read_nifti(path), path)


def read_label_voxels(
    path: str | os.PathLike, expected: Geometry, image_path: str | os.PathLike
) -> np.ndarray:
    """The raw label ids of a label file in RAS+ order, checked to lie on `expected`'s grid."""
    label = read_nifti(path)
    if tuple(label.shape) != tuple(expected.original_shape):
        raise DatasetError(
            f"{path}: label shape {label.shape} differs from the shape "
            f"{expected.original_shape} of {image_path}"
        )
    if not np.allclose(label.affine, expected.original_affine, atol=1e-3):
        raise DatasetError(f"{path}: label affine differs from that of {image_path}")
    return canonical_voxels(label, path)


def _header(geometry: Geometry, dtype: np.dtype, shape: Sequence[int]) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(tuple(shape))
    if geometry.zooms is not None:
        # Read from a file: its qform and sform exactly, an absent one (code 0) included, so
        # a viewer that prefers either finds what it found in the scan.
        header.set_qform(geometry.qform, code=geometry.qform_code)
        header.set_sform(geometry.sform, code=geometry.sform_code)
    else:
        # Rebuilt from a cache, without a header: both forms carry the affine.
        header.set_qform(geometry.original_affine, code=1)
        header.set_sform(geometry.original_affine, code=1)
    if geometry.zooms is not None:
        header.set_zooms(geometry.zooms)
    header.set_xyzt_units(*geometry.xyzt_units)
    return header


def write_label_map(labels: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> None:
    """Write uint8 labels on the scan's canonical grid to `path`, in the scan's own geometry.

    The reorientation is undone and the header carries the scan's affine, qform/sform
    codes and voxel sizes; the file is written atomically.
    """
    path = pathlib.Path(path)
    if not is_nifti_name(path):
        raise DatasetError(f"{path}: the output name must end in .nii or .nii.gz")
    if tuple(labels.shape) != geometry.canonical_shape:
        raise ValueError(
            f"labels of shape {labels.shape} are not on the scan's canonical grid "
            f"{geometry.canonical_shape}"
        )
    volume = canonical_to_original(np.asarray(labels, np.uint8), geometry)
    header = _header(geometry, np.uint8, volume.shape)
    header["cal_min"], header["cal_max"] = 0.0, float(volume.max(initial=0))
    image = nib.Nifti1Image(volume, None, header)
    _write(path, lambda temporary: nib.save(image, temporary))


def write_probabilities(
    probabilities: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike,
    class_names: Sequence[str],
) -> None:
    """Write float16 (X, Y, Z, K) probabilities on the canonical grid to `path` as .npz.

    NIfTI has no float16 type; the arrays are stored in the voxel order of the scan's file,
    with its affine.
    """
    volume = canonical_to_original(np.asarray(probabilities), geometry).astype(np.float16)

    def save(temporary: pathlib.Path) -> None:
        np.savez(
            temporary,
            probabilities=volume,
            affine=np.asarray(geometry.original_affine),
            classes=np.asarray(class_names),
        )

    _write(pathlib.Path(path), save)


def _write(path: pathlib.Path, write) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, write)
    except OSError as error:
        raise DatasetError(f"{path}: cannot write there ({error})") from error
