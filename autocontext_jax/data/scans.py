"""Scans in any supported format: NIfTI through nibabel; DICOM series, NRRD and MetaImage
through SimpleITK (an optional extra: `pip install -e ".[io]"`).

Every reader returns the same `Scan`. A SimpleITK image (LPS world coordinates: origin,
spacing, direction) becomes the NIfTI image of the same grid in RAS (the x and y world
axes negated), so the label map data/nifti.py writes from its geometry lies on exactly
the input's physical grid in ITK-based viewers.
"""

from __future__ import annotations

import os
import pathlib

import nibabel as nib
import numpy as np

from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.geometry import Scan
from autocontext_jax.data.nifti import (
    CHANNEL_SUFFIX,
    case_name,
    check_affine,
    is_nifti_name,
    read_scan,
    scan_from_image,
)

try:  # Optional: NIfTI needs nothing more.
    import SimpleITK as sitk  # noqa: N813 (the name SimpleITK's own documentation uses)
except ImportError:  # pragma: no cover - depends on the install
    sitk = None

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
# ITK's world is LPS, NIfTI's RAS: the same point with x and y negated.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_scan_name(path: str | os.PathLike) -> bool:
    """Whether a file name is that of a scan format this package reads."""
    return is_nifti_name(path) or str(path).lower().endswith(ITK_SUFFIXES)


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """A folder without any other scan file in it is read as one DICOM series."""
    path = pathlib.Path(path)
    return path.is_dir() and not any(is_scan_name(p) for p in path.iterdir() if p.is_file())


def scan_case_id(path: str | os.PathLike) -> str:
    """The case of a scan: its name without format and nnU-Net `_0000` suffixes."""
    name = case_name(path)
    for suffix in ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name.removesuffix(CHANNEL_SUFFIX)


def _simpleitk(path: pathlib.Path):
    if sitk is None:
        raise DatasetError(
            f'{path}: reading DICOM, NRRD or MetaImage needs SimpleITK: pip install -e ".[io]"'
        )
    return sitk


def read_itk_image(path: str | os.PathLike):
    """The SimpleITK image of a DICOM series folder or a NRRD / MetaImage file."""
    path = pathlib.Path(path)
    itk = _simpleitk(path)
    try:
        if path.is_dir():
            reader = itk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise DatasetError(f"{path}: no DICOM series in this folder")
            if len(series) > 1:
                raise DatasetError(
                    f"{path}: {len(series)} DICOM series; put each in its own folder"
                )
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            return reader.Execute()
        return itk.ReadImage(str(path))
    except RuntimeError as error:
        raise DatasetError(
            f"{path}: cannot read ({str(error).strip().splitlines()[-1]})"
        ) from error


def nifti_of_itk(image, path: str | os.PathLike) -> nib.Nifti1Image:
    """The NIfTI image (RAS affine, x-y-z voxel order) of a 3D scalar SimpleITK image."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"{path}: expected a 3D scalar volume, got {image.GetDimension()}D")
    voxels = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK arrays are (z, y, x)
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), np.float64).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), np.float64)
    lps[:3, 3] = image.GetOrigin()
    affine = LPS_TO_RAS @ lps
    check_affine(affine, path)
    nifti = nib.Nifti1Image(voxels, affine)
    nifti.header.set_qform(affine, code=1)
    nifti.header.set_sform(affine, code=1)
    return nifti


def read_any_scan(path: str | os.PathLike) -> Scan:
    """Read a NIfTI file, a DICOM series folder, or a NRRD / MetaImage file into a Scan."""
    path = pathlib.Path(path)
    if is_nifti_name(path):
        return read_scan(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    return scan_from_image(nifti_of_itk(read_itk_image(path), path), path)
