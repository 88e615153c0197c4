"""Preprocessing once, cached: canonical orientation, a target spacing, normalised intensities.

Every case is reoriented to RAS+, resampled to the plan's spacing and normalised, then
stored in the cache folder as `CASE.image.npy` (float32), `CASE.label.npy` (uint8), both
memory-mappable, and `CASE.json` with its original geometry and what it was made from.
The JSON is written last and removed first, so a case is complete exactly when its JSON
names the current inputs; a rerun skips such cases. `plan.json` holds the `Plan`: the
spacing and intensity normalisation shared by training and inference.

Inference calls `preprocess_image` (the exact transform training applies to an image) and
`canonical_to_original` (the reorientation undone, once its probabilities are on the
canonical grid); `labels_to_original` inverts the whole transform for a label map.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import nibabel as nib
import numpy as np
import tqdm
from scipy import ndimage

from autocontext_jax.data.dataset import (
    CaseFiles,
    DatasetError,
    Geometry,
    canonical_voxels,
    checked_3d,
    finite_hu,
    image_geometry,
    load_case,
    read_nifti,
)

# Bump when the preprocessing of a case changes, so every cache is rebuilt.
PREPROCESS_VERSION = 1
# nnU-Net's CT normalisation: percentiles and moments of this many foreground voxels a case.
FOREGROUND_SAMPLES_PER_CASE = 10_000
FOREGROUND_PERCENTILES = (0.5, 99.5)
_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every case goes through: target spacing, interpolation, HU clip and z-score."""

    target_spacing: tuple[float, float, float]
    clip: tuple[float, float]
    mean: float
    std: float
    pad_value_hu: float
    image_order: int = 1
    label_interpolation: str = "linear_argmax"

    def normalize(self, hu: np.ndarray | float) -> np.ndarray:
        """Clip Hounsfield units to `clip`, subtract `mean`, divide by `std`; float32."""
        clipped = np.clip(np.asarray(hu, dtype=np.float32), *self.clip)
        return (clipped - np.float32(self.mean)) / np.float32(self.std)

    @property
    def pad_value(self) -> float:
        """The normalised intensity of everything outside a scan."""
        return float(self.normalize(self.pad_value_hu))

    def to_json(self) -> dict:
        """A JSON-serialisable description of the plan."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        """The plan that `to_json` described."""
        return cls(
            target_spacing=tuple(float(s) for s in data["target_spacing"]),
            clip=tuple(float(c) for c in data["clip"]),
            mean=float(data["mean"]),
            std=float(data["std"]),
            pad_value_hu=float(data["pad_value_hu"]),
            image_order=int(data["image_order"]),
            label_interpolation=str(data["label_interpolation"]),
        )


@dataclasses.dataclass(frozen=True)
class CachedCase:
    """Where one preprocessed case lives in the cache."""

    case_id: str
    image: pathlib.Path
    label: pathlib.Path
    meta: pathlib.Path


def cache_dir(data_config: ml_collections.ConfigDict) -> pathlib.Path:
    """`data.cache_dir`, or the dataset folder's name with `_preprocessed` beside it."""
    if data_config.cache_dir:
        return pathlib.Path(data_config.cache_dir)
    return pathlib.Path(str(data_config.dir).rstrip("/\\") + "_preprocessed")


def cached_case(root: pathlib.Path, case_id: str) -> CachedCase:
    """The cache paths of `case_id` under `root`."""
    return CachedCase(
        case_id,
        root / f"{case_id}.image.npy",
        root / f"{case_id}.label.npy",
        root / f"{case_id}.json",
    )


def load_cached(case: CachedCase) -> tuple[np.ndarray, np.ndarray]:
    """The memory-mapped normalised image and label map of a cached case."""
    return np.load(case.image, mmap_mode="r"), np.load(case.label, mmap_mode="r")


def load_plan(data_config: ml_collections.ConfigDict) -> Plan:
    """The plan stored with the cache of `data_config`'s dataset."""
    path = cache_dir(data_config) / "plan.json"
    if not path.is_file():
        raise DatasetError(f"{path}: no preprocessing plan; run autocontext_jax.preprocess first")
    return Plan.from_json(json.loads(path.read_text())["plan"])


RUN_PLAN_FILE = "plan.json"


def save_run_plan(workdir: str | os.PathLike, plan: Plan) -> None:
    """Keep the plan beside a run's checkpoints, so inference needs no dataset cache."""
    _write_json(pathlib.Path(workdir) / RUN_PLAN_FILE, {"plan": plan.to_json()})


def load_run_plan(workdir: str | os.PathLike, data_config: ml_collections.ConfigDict) -> Plan:
    """The plan a run trained with: its own copy, else the one in its dataset's cache."""
    path = pathlib.Path(workdir) / RUN_PLAN_FILE
    if path.is_file():
        return Plan.from_json(json.loads(path.read_text())["plan"])
    return load_plan(data_config)


def read_geometry(case: CachedCase) -> Geometry:
    """The geometry stored with a cached case."""
    return Geometry.from_json(json.loads(case.meta.read_text())["geometry"])


# ----------------------------------------------------------------------------- resampling


def target_grid(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The shape covering the same extent at `target` spacing, and its exact spacing."""
    new_shape = tuple(
        max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)
    )
    new_spacing = tuple(s * n / m for n, s, m in zip(shape, spacing, new_shape, strict=True))
    return new_shape, new_spacing


def _grid_map(old_shape: Sequence[int], new_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    # Voxel j of the new grid sits at old voxel coordinate scale * j + offset: both grids
    # span the same extent with voxel centres at half-voxel positions.
    scale = np.asarray(old_shape, np.float64) / np.asarray(new_shape, np.float64)
    return scale, 0.5 * scale - 0.5


def resample_image(volume: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """A 3D float volume resampled onto `new_shape` (spline `order`: 1 linear, 3 cubic)."""
    if tuple(volume.shape) == tuple(new_shape):
        return np.asarray(volume, dtype=np.float32)
    scale, offset = _grid_map(volume.shape, new_shape)
    return ndimage.affine_transform(
        np.asarray(volume, dtype=np.float32),
        scale,
        offset,
        output_shape=tuple(new_shape),
        output=np.float32,
        order=order,
        mode="nearest",
        prefilter=order > 1,
    )


def resample_labels(labels: np.ndarray, new_shape: Sequence[int], method: str) -> np.ndarray:
    """A uint8 label map resampled onto `new_shape`.

    `linear_argmax` interpolates each class's indicator linearly and takes the argmax, so
    a vessel one voxel wide survives a change of spacing; `nearest` copies the nearest voxel.
    """
    labels = np.asarray(labels, dtype=np.uint8)
    if tuple(labels.shape) == tuple(new_shape):
        return labels.copy()
    scale, offset = _grid_map(labels.shape, new_shape)
    if method == "nearest":
        return ndimage.affine_transform(
            labels, scale, offset, output_shape=tuple(new_shape), order=0, mode="nearest"
        )
    best = np.full(tuple(new_shape), -1.0, np.float32)
    out = np.zeros(tuple(new_shape), np.uint8)
    for k in np.unique(labels):
        weight = ndimage.affine_transform(
            (labels == k).astype(np.float32),
            scale,
            offset,
            output_shape=tuple(new_shape),
            output=np.float32,
            order=1,
            mode="nearest",
        )
        better = weight > best
        best[better], out[better] = weight[better], k
    return out


# ------------------------------------------------------------------ the transform and its inverse


def preprocess_canonical(
    hu: np.ndarray, geometry: Geometry, plan: Plan
) -> tuple[np.ndarray, Geometry]:
    """`preprocess_image` for a scan already read and reoriented (dataset.load_case)."""
    new_shape, new_spacing = target_grid(hu.shape, geometry.spacing, plan.target_spacing)
    image = plan.normalize(resample_image(hu, new_shape, plan.image_order))
    return image, dataclasses.replace(
        geometry, preprocessed_shape=new_shape, preprocessed_spacing=new_spacing
    )


def preprocess_image(
    image: nib.Nifti1Image, plan: Plan, path: str | os.PathLike = "<image>"
) -> tuple[np.ndarray, Geometry]:
    """The exact transform training applies to an image: its model-ready array and geometry.

    Reorients `image` to RAS+, resamples it to `plan.target_spacing` (spline order
    `plan.image_order`) and normalises it with `plan`. Returns the float32 (X, Y, Z) array
    and the `Geometry` that `labels_to_original` needs to bring a label map of that array
    back to `image`'s own grid. `path` names the file in error messages.
    """
    image = checked_3d(image, path)
    canonical, data = canonical_voxels(image, path)
    return preprocess_canonical(finite_hu(data, path), image_geometry(image, canonical), plan)


def labels_to_original(labels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A label map on the preprocessed grid brought back onto the original scan's grid.

    Inverts `preprocess_image`: resamples `labels` (shape `geometry.preprocessed_shape`)
    to the canonical grid, per class linearly then argmax, and undoes the reorientation,
    so the result has `geometry.original_shape` and is aligned with the original affine.
    """
    if geometry.preprocessed_shape is None:
        raise ValueError("the geometry has no preprocessed grid: preprocess the image first")
    if tuple(labels.shape) != tuple(geometry.preprocessed_shape):
        raise ValueError(
            f"labels of shape {labels.shape} are not on the preprocessed grid "
            f"{geometry.preprocessed_shape}"
        )
    canonical = resample_labels(labels, geometry.canonical_shape, "linear_argmax")
    return canonical_to_original(canonical, geometry)


def canonical_to_original(volume: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Undo the reorientation to RAS+ of a (X, Y, Z, ...) volume on the canonical grid."""
    to_original = nib.orientations.ornt_transform(
        _RAS, nib.orientations.io_orientation(geometry.original_affine)
    )
    return np.ascontiguousarray(nib.orientations.apply_orientation(volume, to_original))


def preprocessed_affine(geometry: Geometry) -> np.ndarray:
    """The voxel-to-world affine of the preprocessed grid."""
    scale, offset = _grid_map(geometry.canonical_shape, geometry.preprocessed_shape)
    grid = np.eye(4)
    grid[:3, :3] = np.diag(scale)
    grid[:3, 3] = offset
    return geometry.canonical_affine @ grid


def preprocess_case(
    files: CaseFiles, plan: Plan, data_config: ml_collections.ConfigDict, num_classes: int
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """The normalised image, remapped labels and geometry of a case on the plan's grid."""
    case = load_case(files, num_classes, data_config.label_map, data_config.unmapped_labels)
    image, geometry = preprocess_canonical(case.image, case.geometry, plan)
    label = resample_labels(case.label, geometry.preprocessed_shape, plan.label_interpolation)
    if not label.any():
        raise DatasetError(f"{files.label}: the label map has no foreground voxel")
    return image, label, geometry


# ----------------------------------------------------------------------------------- the plan


def canonical_spacing(path: str | os.PathLike) -> tuple[float, float, float]:
    """The voxel size of a scan along R, A, S, from its header alone."""
    affine = read_nifti(path).affine
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = [0.0, 0.0, 0.0]
    for axis, target in enumerate(nib.orientations.io_orientation(affine)[:, 0].astype(int)):
        spacing[target] = float(zooms[axis])
    return tuple(spacing)


def _foreground_samples(job: tuple) -> tuple[np.ndarray, str | None]:
    """Up to FOREGROUND_SAMPLES_PER_CASE foreground intensities of a case, or an error."""
    files, data_config, num_classes, seed = job
    try:
        case = load_case(files, num_classes, data_config.label_map, data_config.unmapped_labels)
    except DatasetError as error:
        return np.zeros(0, np.float32), str(error)
    values = case.image[case.label > 0]
    if len(values) == 0:
        return values, f"{files.label}: the label map has no foreground voxel"
    rng = np.random.default_rng([seed, _stable_hash(files.case_id)])
    count = min(len(values), FOREGROUND_SAMPLES_PER_CASE)
    return rng.choice(values, count, replace=False), None


def _stable_hash(text: str) -> int:
    """A stable non-negative integer of a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def make_plan(
    train_files: Sequence[CaseFiles], config: ml_collections.ConfigDict, workers: int = 1
) -> Plan:
    """The plan of `config.data`, with spacing and statistics taken from `train_files`."""
    data = config.data
    if data.target_spacing:
        target = tuple(float(s) for s in data.target_spacing)
    else:
        spacings = []
        for files in train_files:
            try:
                spacings.append(canonical_spacing(files.image))
            except DatasetError:
                # Preprocessing the case reports it (or skips it) with the same message.
                if not data.skip_bad_cases:
                    raise
        if not spacings:
            raise DatasetError("no training case has a readable header to take a spacing from")
        target = tuple(float(s) for s in np.median(np.array(spacings), axis=0))
    if data.normalization == "window":
        clip = tuple(float(c) for c in data.intensity_clip)
        mean, std = float(data.intensity_mean), float(data.intensity_std)
    else:
        jobs = [(f, data, config.model.num_classes, config.seed) for f in train_files]
        results = _parallel_map(_foreground_samples, jobs, workers, "foreground statistics")
        errors = [message for _, message in results if message is not None]
        if errors and not data.skip_bad_cases:
            raise DatasetError("\n".join(errors))
        samples = np.concatenate([values for values, _ in results])
        if len(samples) == 0:
            raise DatasetError("no training case has foreground voxels to normalise with")
        clip = tuple(float(p) for p in np.percentile(samples, FOREGROUND_PERCENTILES))
        mean, std = float(samples.mean()), float(max(samples.std(), 1e-6))
    return Plan(
        target_spacing=target,
        clip=clip,
        mean=mean,
        std=std,
        pad_value_hu=float(data.pad_value_hu),
        image_order=int(data.image_interpolation_order),
        label_interpolation=str(data.label_interpolation),
    )


# ------------------------------------------------------------------------------- the cache


def _file_stamp(path: pathlib.Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _plan_key(train_files: Sequence[CaseFiles], config: ml_collections.ConfigDict) -> str:
    data = config.data
    settings = {
        "version": PREPROCESS_VERSION,
        "fields": {
            name: data[name]
            for name in (
                "target_spacing",
                "normalization",
                "intensity_clip",
                "intensity_mean",
                "intensity_std",
                "pad_value_hu",
                "image_interpolation_order",
                "label_interpolation",
                "label_map",
                "unmapped_labels",
            )
        },
        "num_classes": config.model.num_classes,
        "seed": config.seed,
        "train": [[f.case_id, _file_stamp(f.image), _file_stamp(f.label)] for f in train_files],
    }
    text = json.dumps(settings, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()


def _case_stamp(files: CaseFiles, plan: Plan, config: ml_collections.ConfigDict) -> dict:
    return {
        "version": PREPROCESS_VERSION,
        "image": _file_stamp(files.image),
        "label": _file_stamp(files.label),
        "plan": plan.to_json(),
        "label_map": [list(pair) for pair in config.data.label_map],
        "unmapped_labels": config.data.unmapped_labels,
        "num_classes": config.model.num_classes,
    }


def _atomic_write(path: pathlib.Path, write: Callable[[Any], None], mode: str) -> None:
    # Unique per writer: several hosts of one run may preprocess into a shared folder.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(temporary, mode) as stream:
        write(stream)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def _write_json(path: pathlib.Path, data: dict) -> None:
    text = json.dumps(data, indent=1) + "\n"
    _atomic_write(path, lambda stream: stream.write(text), "w")


def _is_current(case: CachedCase, stamp: dict) -> bool:
    if not (case.meta.is_file() and case.image.is_file() and case.label.is_file()):
        return False
    try:
        return json.loads(case.meta.read_text()).get("stamp") == json.loads(json.dumps(stamp))
    except (json.JSONDecodeError, OSError):
        return False


def _preprocess_job(job: tuple) -> tuple[str, str | None]:
    """Preprocess and store one case; returns (case id, error message or None)."""
    files, plan, config, root = job
    target = cached_case(pathlib.Path(root), files.case_id)
    try:
        image, label, geometry = preprocess_case(files, plan, config.data, config.model.num_classes)
        target.meta.unlink(missing_ok=True)
        _atomic_write(target.image, lambda stream: np.save(stream, image), "wb")
        _atomic_write(target.label, lambda stream: np.save(stream, label), "wb")
        meta = {
            "case_id": files.case_id,
            "image_file": str(files.image),
            "label_file": str(files.label),
            "geometry": geometry.to_json(),
            "stamp": _case_stamp(files, plan, config),
        }
        _write_json(target.meta, meta)
    except DatasetError as error:
        return files.case_id, str(error)
    except Exception as error:  # a worker reports, never crashes: name the files
        return files.case_id, f"{files.image} / {files.label}: {type(error).__name__}: {error}"
    return files.case_id, None


def _parallel_map(function: Callable, jobs: list, workers: int, desc: str) -> list:
    """`function` over `jobs` in `workers` processes, in order, with a progress bar."""
    progress = dict(desc=desc, total=len(jobs), leave=False, disable=len(jobs) < 2)
    if workers <= 1 or len(jobs) <= 1:
        return [function(job) for job in tqdm.tqdm(jobs, **progress)]
    # Spawn, not fork: the caller may already run JAX threads, which fork would corrupt.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs))) as pool:
        return list(tqdm.tqdm(pool.imap(function, jobs), **progress))


def ensure_preprocessed(
    config: ml_collections.ConfigDict,
    files: Sequence[CaseFiles],
    train_files: Sequence[CaseFiles],
) -> tuple[Plan, dict[str, CachedCase]]:
    """Bring the cache up to date for `files`; the plan comes from `train_files`.

    Returns the plan and the cached cases by id. A bad case raises a DatasetError naming
    its file, or, with `data.skip_bad_cases`, is reported in a warning and left out.
    """
    root = cache_dir(config.data)
    root.mkdir(parents=True, exist_ok=True)
    workers = config.data.preprocess_workers
    plan_path = root / "plan.json"
    key = _plan_key(train_files, config)
    saved = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    if saved.get("key") == key:
        plan = Plan.from_json(saved["plan"])
    else:
        plan = make_plan(train_files, config, workers)
        _write_json(plan_path, {"key": key, "plan": plan.to_json()})
    cases = {f.case_id: cached_case(root, f.case_id) for f in files}
    stale = [f for f in files if not _is_current(cases[f.case_id], _case_stamp(f, plan, config))]
    jobs = [(f, plan, config, str(root)) for f in stale]
    failures = [
        (case_id, message)
        for case_id, message in _parallel_map(_preprocess_job, jobs, workers, "preprocess")
        if message is not None
    ]
    if failures and not config.data.skip_bad_cases:
        raise DatasetError("\n".join(message for _, message in failures))
    for case_id, message in failures:
        warnings.warn(f"Skipping case {case_id}: {message}", stacklevel=2)
        del cases[case_id]
    if not cases:
        raise DatasetError(f"{root}: no usable case is left after skipping the bad ones")
    return plan, cases
