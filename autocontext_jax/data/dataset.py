"""Reading NIfTI datasets in the Medical Segmentation Decathlon / nnU-Net layout."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import nibabel as nib
import numpy as np


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """Where one training case lives on disk."""

    case_id: str
    image: pathlib.Path
    label: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The voxel grid of a scan as read from disk, and of its canonical (RAS) version."""

    original_shape: tuple[int, ...]
    original_affine: np.ndarray
    canonical_affine: np.ndarray
    spacing: tuple[float, float, float]

    def to_json(self) -> dict:
        """A JSON-serialisable description of this geometry."""
        return {
            "original_shape": list(self.original_shape),
            "original_affine": self.original_affine.tolist(),
            "canonical_affine": self.canonical_affine.tolist(),
            "spacing": list(self.spacing),
        }


@dataclasses.dataclass(frozen=True)
class Case:
    """One scan in canonical orientation: HU image, integer labels and its geometry."""

    case_id: str
    image: np.ndarray  # float32 Hounsfield units, (X, Y, Z) in RAS+ voxel order
    label: np.ndarray  # uint8 model classes, same shape
    geometry: Geometry


def list_cases(data_dir: str | os.PathLike) -> list[CaseFiles]:
    """The training cases of the dataset whose `dataset.json` is in `data_dir`."""
    root = pathlib.Path(data_dir)
    manifest = root / "dataset.json"
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: no dataset.json (expected the MSD/nnU-Net layout)")
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{manifest}: not valid JSON ({error})") from error
    entries = meta.get("training")
    if not isinstance(entries, list):
        raise DatasetError(f"{manifest}: no 'training' list of image/label pairs")
    cases, seen = [], set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f"{manifest}: training entry {index} lacks 'image' or 'label'")
        image, label = root / entry["image"], root / entry["label"]
        case_id = _case_id(label)
        if case_id in seen:
            raise DatasetError(f"{manifest}: case id {case_id!r} is listed twice")
        seen.add(case_id)
        for path in (image, label):
            if not path.is_file():
                raise DatasetError(f"{path}: listed in {manifest} but missing")
        cases.append(CaseFiles(case_id, image, label))
    if not cases:
        raise DatasetError(f"{manifest}: the dataset has no training cases")
    return cases


def _case_id(label_path: pathlib.Path) -> str:
    name = label_path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return label_path.stem


def _load_nifti(path: pathlib.Path) -> tuple[nib.Nifti1Image, nib.Nifti1Image, np.ndarray]:
    """The header and the whole voxel array of a 3D NIfTI file, in RAS+ voxel order."""
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for foreign or corrupt files
        raise DatasetError(f"{path}: cannot read as NIfTI ({error})") from error
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {shape}")
    canonical = nib.as_closest_canonical(image)
    try:
        # Reading every voxel is where a truncated file fails.
        data = np.asarray(canonical.dataobj)
    except Exception as error:
        raise DatasetError(f"{path}: cannot read the voxel data ({error})") from error
    return image, canonical, data


def load_case(files: CaseFiles, num_classes: int) -> Case:
    """Read a case, reorient it to RAS+ and check that image and label agree."""
    image, canonical_image, hu = _load_nifti(files.image)
    label, _, raw_label = _load_nifti(files.label)
    if image.shape != label.shape:
        raise DatasetError(
            f"{files.label}: label shape {label.shape} differs from image shape {image.shape}"
        )
    if not np.allclose(image.affine, label.affine, atol=1e-3):
        raise DatasetError(f"{files.label}: label affine differs from that of {files.image}")
    hu = hu.astype(np.float32, copy=False)
    if not np.all(np.isfinite(hu)):
        raise DatasetError(f"{files.image}: contains NaN or infinite intensities")
    labels = np.rint(raw_label).astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        found = sorted(set(np.unique(labels).tolist()) - set(range(num_classes)))
        raise DatasetError(
            f"{files.label}: label ids {found} outside the model's classes 0..{num_classes - 1}"
        )
    geometry = Geometry(
        original_shape=tuple(int(n) for n in image.shape),
        original_affine=np.asarray(image.affine, dtype=np.float64),
        canonical_affine=np.asarray(canonical_image.affine, dtype=np.float64),
        spacing=tuple(float(z) for z in canonical_image.header.get_zooms()[:3]),
    )
    return Case(files.case_id, hu, labels.astype(np.uint8), geometry)


def split_cases(
    cases: list[CaseFiles], num_val: int, seed: int
) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """Split cases into (train, held-out) with a seeded permutation."""
    if not 0 <= num_val < len(cases):
        raise DatasetError(
            f"config.data.num_val_cases={num_val} must leave at least one training case "
            f"out of {len(cases)}"
        )
    order = np.random.default_rng(seed).permutation(len(cases))
    held_out = sorted(order[:num_val].tolist())
    train = [c for i, c in enumerate(cases) if i not in held_out]
    return train, [cases[i] for i in held_out]
