"""A scan in for inference, a label map out: both in the scan's own geometry.

The scan goes to the network's grid by training's own transform
(`data.preprocess.preprocess_image`); this module reads and checks scans and writes label
maps with the scan's header.
"""

from __future__ import annotations

import os
import pathlib

import nibabel as nib
import numpy as np

from autocontext_jax.data.dataset import DatasetError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


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


def write_label_map(
    labels: np.ndarray, reference: nib.Nifti1Image, path: str | os.PathLike
) -> None:
    """Write uint8 `labels` with the header of `reference` (affine, codes, zooms) to `path`.

    The file is written under a temporary name in the same folder and renamed, so an
    existing file is never left half-overwritten.
    """
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    # The scan's intensity scaling and display window do not apply to labels.
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0.0, float(labels.max(initial=0))
    image = nib.Nifti1Image(labels.astype(np.uint8), None, header)
    _atomic_save(image, pathlib.Path(path))


def _atomic_save(image: nib.Nifti1Image, path: pathlib.Path) -> None:
    if not is_nifti_name(path):
        raise DatasetError(f"{path}: the output name must end in .nii or .nii.gz")
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    # Same folder (so the rename is atomic), same suffix (so nibabel compresses alike).
    temporary = path.parent / f".{case_name(path)}.tmp-{os.getpid()}{suffix}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise DatasetError(f"{path}: cannot write there ({error})") from error
    finally:
        temporary.unlink(missing_ok=True)
