"""Reading NIfTI datasets in the Medical Segmentation Decathlon / nnU-Net layout."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from autocontext_jax.data.atomic import write_json_atomically
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.geometry import Geometry, Scan
from autocontext_jax.data.labels import read_labels
from autocontext_jax.data.nifti import case_id as scan_case_id
from autocontext_jax.data.nifti import read_scan


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """Where one training case lives on disk."""

    case_id: str
    image: pathlib.Path
    label: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Case:
    """One scan in canonical orientation: HU image, integer labels and its geometry."""

    case_id: str
    image: np.ndarray  # float32 Hounsfield units, (X, Y, Z) in RAS+ voxel order
    label: np.ndarray  # uint8 model classes, same shape
    geometry: Geometry

    @property
    def scan(self) -> Scan:
        """The case's image and geometry, as a reader of an unlabelled scan gives them."""
        return Scan(self.image, self.geometry)


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
    if data_config.pairs:
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
        case_id = _case_id(label) if by_label else scan_case_id(image)
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


def load_case(
    files: CaseFiles,
    num_classes: int,
    label_map: Sequence[Sequence[int]] = (),
    unmapped: str = "background",
) -> Case:
    """Read a case, reorient it to RAS+, check that image and label agree, remap the labels."""
    scan = read_scan(files.image)
    labels = read_labels(files.label, scan.geometry, num_classes, label_map, unmapped, files.image)
    return Case(files.case_id, scan.image, labels, scan.geometry)


def load_run_case(
    files: CaseFiles, data_config: ml_collections.ConfigDict, num_classes: int
) -> Case:
    """`load_case` with the label map of a run's `data` config, as training reads it."""
    return load_case(files, num_classes, data_config.label_map, data_config.unmapped_labels)


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


def split_dataset(
    files: list[CaseFiles], data_config: ml_collections.ConfigDict
) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """The run's (train, held-out) split: `data.num_val_cases` cases by `data.split_seed`.

    Every command that needs the training cases (training, preprocess) splits here. A
    cross-validated run (`data.fold` >= 0) takes its fold instead: `fold_split`.
    """
    return split_cases(files, data_config.num_val_cases, data_config.split_seed)


# The folds of a dataset, written once beside its cache and shared by every run on it
# (nnU-Net's splits_final.json), so runs of different configs hold out the same cases.
FOLDS_FILE = "folds.json"


def make_folds(case_ids: Sequence[str], num_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """The folds: the sorted case ids in a seeded order, cut into k parts of near-equal size.

    Fold i holds out its part ("val") and trains on the rest ("train"); every case is held
    out by exactly one fold. Sorting first makes the folds independent of listing order.
    """
    ids = sorted(case_ids)
    if not 2 <= num_folds <= len(ids):
        raise DatasetError(
            f"config.data.num_folds={num_folds}: needs from 2 to as many folds as the "
            f"dataset's {len(ids)} cases"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for part in np.array_split(order, num_folds):
        held_out = {ids[i] for i in part}
        folds.append({"train": [c for c in ids if c not in held_out], "val": sorted(held_out)})
    return folds


def folds_content(case_ids: Sequence[str], num_folds: int, seed: int) -> dict:
    """What the folds file of these cases, k and seed holds."""
    return {
        "num_folds": num_folds,
        "split_seed": seed,
        "folds": make_folds(case_ids, num_folds, seed),
    }


def ensure_folds(
    path: str | os.PathLike, case_ids: Sequence[str], num_folds: int, seed: int
) -> dict:
    """The folds file at `path`: written when missing, else checked against these folds.

    A file whose folds differ (another k, seed or set of cases) is a DatasetError naming
    it: runs on one dataset must share one set of folds to be compared case by case.
    """
    path = pathlib.Path(path)
    expected = folds_content(case_ids, num_folds, seed)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, expected, indent=1)
        return expected
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    if saved != json.loads(json.dumps(expected)):
        held = sorted(c for fold in saved.get("folds", []) for c in fold.get("val", []))
        raise DatasetError(
            f"{path}: its folds (num_folds={saved.get('num_folds')}, "
            f"split_seed={saved.get('split_seed')}, {len(held)} cases) disagree with this "
            f"run's (num_folds={num_folds}, split_seed={seed}, {len(case_ids)} cases); runs "
            "on one dataset share its folds: use the file's settings, or delete it to "
            "re-split (runs trained on the old folds are then not comparable)"
        )
    return saved


def folds_digest(path: str | os.PathLike) -> str:
    """The sha256 of a folds file, which every run trained on it records in split.json."""
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def fold_split(
    files: list[CaseFiles], data_config: ml_collections.ConfigDict, folds_path: str | os.PathLike
) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """(train, held-out) of fold `data.fold` of the dataset's folds file (made when missing)."""
    content = ensure_folds(
        folds_path, [f.case_id for f in files], data_config.num_folds, data_config.split_seed
    )
    fold = content["folds"][data_config.fold]
    by_id = {f.case_id: f for f in files}
    return [by_id[c] for c in fold["train"]], [by_id[c] for c in fold["val"]]


# The split a run trained with, kept in its workdir.
SPLIT_FILE = "split.json"


def write_split(
    workdir: str | os.PathLike,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    fold: Mapping[str, Any] | None = None,
) -> None:
    """Keep a run's (train, held-out) case ids, and its fold record, in WORKDIR/split.json.

    `fold` is {"fold": -1} for the held-out split, or the fold, num_folds, and the folds
    file's path and sha256 for a cross-validated run (`fold_record`).
    """
    split = {"train": list(train_ids), "val": list(val_ids), **(fold or {"fold": -1})}
    write_json_atomically(pathlib.Path(workdir) / SPLIT_FILE, split)


def fold_record(
    data_config: ml_collections.ConfigDict, folds_path: str | os.PathLike
) -> dict[str, Any]:
    """What split.json says of a run's fold: -1, or the fold and the folds file it came from."""
    if data_config.fold < 0:
        return {"fold": -1}
    return {
        "fold": int(data_config.fold),
        "num_folds": int(data_config.num_folds),
        "folds_file": str(pathlib.Path(folds_path).absolute()),
        "folds_sha256": folds_digest(folds_path),
    }


def read_split(workdir: str | os.PathLike) -> dict[str, Any]:
    """The {"train": [...], "val": [...], "fold": ...} case ids and fold record of a run."""
    path = pathlib.Path(workdir) / SPLIT_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: no split.json; pass --data DIR to choose cases")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
