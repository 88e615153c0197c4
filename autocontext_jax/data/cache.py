"""The preprocessing cache: every case of a dataset once through its plan, on disk.

Every case is reoriented to RAS+, resampled to the plan's spacing and normalised, then
stored in the cache folder as `CASE.image.npy` (float32), `CASE.label.npy` (uint8), both
memory-mappable, and `CASE.json` with its original geometry and what it was made from.
The JSON is written last and removed first, so a case is complete exactly when its JSON
names the current inputs; a rerun skips such cases. The cache's own `plan.json` says
which plan its cases were made with; a run keeps its own copy (data/plan.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import warnings
from collections.abc import Sequence

import ml_collections
import numpy as np

from autocontext_jax.data.atomic import write_atomically, write_json_atomically
from autocontext_jax.data.dataset import CaseFiles
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.geometry import Geometry
from autocontext_jax.data.plan import Plan, make_plan
from autocontext_jax.data.preprocess import preprocess_case
from autocontext_jax.data.workers import parallel_map

# Bump when the preprocessing of a case changes, so every cache is rebuilt.
PREPROCESS_VERSION = 1


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


def read_geometry(case: CachedCase) -> Geometry:
    """The geometry stored with a cached case."""
    return Geometry.from_json(json.loads(case.meta.read_text())["geometry"])


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
        write_atomically(target.image, lambda temporary: np.save(temporary, image))
        write_atomically(target.label, lambda temporary: np.save(temporary, label))
        meta = {
            "case_id": files.case_id,
            "image_file": str(files.image),
            "label_file": str(files.label),
            "geometry": geometry.to_json(),
            "stamp": _case_stamp(files, plan, config),
        }
        write_json_atomically(target.meta, meta, indent=1)
    except DatasetError as error:
        return files.case_id, str(error)
    except Exception as error:  # a worker reports, never crashes: name the files
        return files.case_id, f"{files.image} / {files.label}: {type(error).__name__}: {error}"
    return files.case_id, None


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
        write_json_atomically(plan_path, {"key": key, "plan": plan.to_json()}, indent=1)
    cases = {f.case_id: cached_case(root, f.case_id) for f in files}
    stale = [f for f in files if not _is_current(cases[f.case_id], _case_stamp(f, plan, config))]
    jobs = [(f, plan, config, str(root)) for f in stale]
    failures = [
        (case_id, message)
        for case_id, message in parallel_map(_preprocess_job, jobs, workers, "preprocess")
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
