"""Reading NIfTI datasets in the Medical Segmentation Decathlon / nnU-Net layout."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import ml_collections
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
    """The voxel grid of a scan as read from disk, of its canonical (RAS) version and, once
    preprocessed, of the resampled grid the model sees (None before preprocessing)."""

    original_shape: tuple[int, ...]
    original_affine: np.ndarray
    canonical_affine: np.ndarray
    spacing: tuple[float, float, float]
    preprocessed_shape: tuple[int, int, int] | None = None
    preprocessed_spacing: tuple[float, float, float] | None = None

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """The shape of the scan reoriented to RAS+ (a permutation of the original shape)."""
        order = nib.orientations.io_orientation(self.original_affine)[:, 0].astype(int)
        shape = [0, 0, 0]
        for axis, target in enumerate(order):
            shape[target] = int(self.original_shape[axis])
        return tuple(shape)

    def to_json(self) -> dict:
        """A JSON-serialisable description of this geometry."""
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


@dataclasses.dataclass(frozen=True)
class Case:
    """One scan in canonical orientation: HU image, integer labels and its geometry."""

    case_id: str
    image: np.ndarray  # float32 Hounsfield units, (X, Y, Z) in RAS+ voxel order
    label: np.ndarray  # uint8 model classes, same shape
    geometry: Geometry


def list_cases(data_dir: str | os.PathLike) -> list[CaseFiles]:
    """The training cases of the MSD / nnU-Net dataset whose `dataset.json` is in `data_dir`.

    An MSD `dataset.json` lists its image/label pairs under "training"; an nnU-Net v2 one
    does not, and the cases are then `imagesTr/CASE_0000<ending>` with
    `labelsTr/CASE<ending>` (`file_ending`, default ".nii.gz").
    """
    root = pathlib.Path(data_dir)
    manifest = root / "dataset.json"
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: no dataset.json (expected the MSD/nnU-Net layout)")
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{manifest}: not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise DatasetError(f"{manifest}: expected a JSON object")
    entries = meta.get("training")
    if entries is None and "file_ending" in meta:
        entries = _nnunet_v2_entries(root, manifest, meta)
    if not isinstance(entries, list):
        raise DatasetError(f"{manifest}: no 'training' list of image/label pairs")
    pairs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f"{manifest}: training entry {index} lacks 'image' or 'label'")
        pairs.append((root / entry["image"], root / entry["label"]))
    return _checked_cases(pairs, str(manifest))


def _nnunet_v2_entries(root: pathlib.Path, manifest: pathlib.Path, meta: dict) -> list[dict]:
    ending = meta["file_ending"]
    channels = meta.get("channel_names", {"0": "CT"})
    if len(channels) != 1:
        raise DatasetError(f"{manifest}: {len(channels)} input channels; only CT (1) is supported")
    entries = []
    for image in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
        case_id = image.name[: -len(f"_0000{ending}")]
        entries.append({"image": f"imagesTr/{image.name}", "label": f"labelsTr/{case_id}{ending}"})
    expected = meta.get("numTraining")
    if expected is not None and expected != len(entries):
        raise DatasetError(
            f"{manifest}: numTraining is {expected} but imagesTr holds {len(entries)} "
            f"images named CASE_0000{ending}"
        )
    return entries


def list_pairs(
    pairs: Sequence[Sequence[str]], base_dir: str | os.PathLike = "."
) -> list[CaseFiles]:
    """Cases given as a plain list of (image, label) paths, relative ones under `base_dir`."""
    root = pathlib.Path(base_dir)
    checked = []
    for index, pair in enumerate(pairs):
        if len(pair) != 2:
            raise DatasetError(f"config.data.pairs[{index}]: expected (image, label), got {pair!r}")
        checked.append((root / pair[0], root / pair[1]))
    return _checked_cases(checked, "config.data.pairs", by_label=False)


def list_dataset(data_config: ml_collections.ConfigDict) -> list[CaseFiles]:
    """The cases of `data.pairs` when given, else of the dataset.json in `data.dir`."""
    if data_config.get("pairs"):
        return list_pairs(data_config.pairs, data_config.dir)
    return list_cases(data_config.dir)


def _checked_cases(
    pairs: list[tuple[pathlib.Path, pathlib.Path]], source: str, by_label: bool = True
) -> list[CaseFiles]:
    """CaseFiles of existing, uniquely named (image, label) pairs listed in `source`."""
    cases, seen = [], set()
    for image, label in pairs:
        # MSD names a case by its label file (CASE.nii.gz beside CASE_0000.nii.gz); a plain
        # pair by its image, e.g. ct.nii.gz -> "ct".
        case_id = _case_id(label) if by_label else _case_id(image).removesuffix("_0000")
        if case_id in seen:
            raise DatasetError(
                f"{label if by_label else image}: case id {case_id!r} is listed twice in {source}"
            )
        seen.add(case_id)
        for path in (image, label):
            if not path.is_file():
                raise DatasetError(f"{path}: listed in {source} but missing")
        cases.append(CaseFiles(case_id, image, label))
    if not cases:
        raise DatasetError(f"{source}: the dataset has no training cases")
    return cases


def _case_id(label_path: pathlib.Path) -> str:
    name = label_path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return label_path.stem


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


def checked_3d(image: nib.Nifti1Image, path: str | os.PathLike) -> nib.Nifti1Image:
    """`image` as a 3D volume, or a DatasetError naming `path` when it has more axes."""
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {shape}")
    return image


def canonical_voxels(
    image: nib.Nifti1Image, path: str | os.PathLike
) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The RAS+ reoriented image and its whole voxel array."""
    canonical = nib.as_closest_canonical(image)
    try:
        # Reading every voxel is where a truncated file fails.
        data = np.asarray(canonical.dataobj)
    except Exception as error:
        raise DatasetError(f"{path}: cannot read the voxel data ({error})") from error
    return canonical, data


def image_geometry(image: nib.Nifti1Image, canonical: nib.Nifti1Image) -> Geometry:
    """The geometry of a scan and of its canonical version, before any resampling."""
    affine = np.asarray(canonical.affine, dtype=np.float64)
    return Geometry(
        original_shape=tuple(int(n) for n in image.shape),
        original_affine=np.asarray(image.affine, dtype=np.float64),
        canonical_affine=affine,
        # Column norms, not the header's zooms: right for oblique affines too.
        spacing=tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)),
    )


def finite_hu(data: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """The voxels as float32, or a DatasetError naming `path` for NaN or infinite ones."""
    hu = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(hu)):
        raise DatasetError(f"{path}: contains NaN or infinite intensities")
    return hu


def remap_labels(
    raw: np.ndarray,
    num_classes: int,
    label_map: Sequence[Sequence[int]],
    path: str | os.PathLike,
    unmapped: str = "background",
) -> np.ndarray:
    """Dataset label ids as uint8 model classes.

    Without a `label_map` the ids are the classes and must lie in 0..num_classes-1. With
    one, its (dataset id, class) pairs say where each id goes; other ids become background,
    or raise when `unmapped` is "error".
    """
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        raise DatasetError(f"{path}: label map contains NaN or infinite values")
    ids = np.rint(raw).astype(np.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise DatasetError(f"{path}: negative label ids (minimum {low})")
    if not label_map:
        if high >= num_classes:
            found = sorted(set(np.unique(ids).tolist()) - set(range(num_classes)))
            raise DatasetError(
                f"{path}: label ids {found} outside the model's classes 0..{num_classes - 1}"
            )
        return ids.astype(np.uint8)
    mapped = {int(source): int(target) for source, target in label_map}
    present = np.unique(ids).tolist()
    if unmapped == "error":
        outside = [i for i in present if i != 0 and i not in mapped]
        if outside:
            raise DatasetError(
                f"{path}: label ids {outside} are not in config.data.label_map "
                f"(set config.data.unmapped_labels='background' to treat them as background)"
            )
    lookup = np.zeros(max(high, *mapped) + 1, dtype=np.uint8)
    for source, target in mapped.items():
        lookup[source] = target
    return lookup[ids]


def load_case(
    files: CaseFiles,
    num_classes: int,
    label_map: Sequence[Sequence[int]] = (),
    unmapped: str = "background",
) -> Case:
    """Read a case, reorient it to RAS+, check that image and label agree, remap the labels."""
    image = read_nifti(files.image)
    label = read_nifti(files.label)
    if image.shape != label.shape:
        raise DatasetError(
            f"{files.label}: label shape {label.shape} differs from image shape {image.shape}"
        )
    if not np.allclose(image.affine, label.affine, atol=1e-3):
        raise DatasetError(f"{files.label}: label affine differs from that of {files.image}")
    canonical_image, data = canonical_voxels(image, files.image)
    hu = finite_hu(data, files.image)
    _, raw_label = canonical_voxels(label, files.label)
    labels = remap_labels(raw_label, num_classes, label_map, files.label, unmapped)
    return Case(files.case_id, hu, labels, image_geometry(image, canonical_image))


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
