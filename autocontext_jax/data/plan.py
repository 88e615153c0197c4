"""The preprocessing plan: target spacing, interpolation and intensity normalisation.

A plan is made once from a run's training cases (the median spacing, and for
`foreground_zscore` the statistics of their foreground, as nnU-Net) and kept beside the
run's checkpoints as WORKDIR/plan.json: every scan the run ever sees, in training,
evaluation, plotting or prediction, goes through exactly this plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence

import ml_collections
import numpy as np

from autocontext_jax.data.atomic import write_json_atomically
from autocontext_jax.data.dataset import CaseFiles, load_run_case
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.geometry import canonical_spacing
from autocontext_jax.data.nifti import read_nifti
from autocontext_jax.data.workers import parallel_map

# nnU-Net's CT normalisation: percentiles and moments of this many foreground voxels a case.
FOREGROUND_SAMPLES_PER_CASE = 10_000
FOREGROUND_PERCENTILES = (0.5, 99.5)
RUN_PLAN_FILE = "plan.json"


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

    @classmethod
    def window(
        cls, data_config: ml_collections.ConfigDict, target_spacing: Sequence[float]
    ) -> Plan:
        """The plan of the config's fixed HU window (`data.intensity_clip`, mean, std)."""
        return cls(
            target_spacing=tuple(float(s) for s in target_spacing),
            clip=tuple(float(c) for c in data_config.intensity_clip),
            mean=float(data_config.intensity_mean),
            std=float(data_config.intensity_std),
            pad_value_hu=float(data_config.pad_value_hu),
            image_order=int(data_config.image_interpolation_order),
            label_interpolation=str(data_config.label_interpolation),
        )

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


def save_run_plan(workdir: str | os.PathLike, plan: Plan) -> None:
    """Keep the plan beside a run's checkpoints: WORKDIR/plan.json."""
    write_json_atomically(pathlib.Path(workdir) / RUN_PLAN_FILE, {"plan": plan.to_json()}, indent=1)


def load_run_plan(workdir: str | os.PathLike) -> Plan:
    """The plan a run trained with, from its own WORKDIR/plan.json."""
    path = pathlib.Path(workdir) / RUN_PLAN_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: missing; the run has no preprocessing plan")
    try:
        return Plan.from_json(json.loads(path.read_text())["plan"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{path}: not a valid plan ({error})") from error


def _foreground_samples(job: tuple) -> tuple[np.ndarray, str | None]:
    """Up to FOREGROUND_SAMPLES_PER_CASE foreground intensities of a case, or an error."""
    files, data_config, num_classes, seed = job
    try:
        case = load_run_case(files, data_config, num_classes)
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
                spacings.append(canonical_spacing(read_nifti(files.image).affine))
            except DatasetError:
                # Preprocessing the case reports it (or skips it) with the same message.
                if not data.skip_bad_cases:
                    raise
        if not spacings:
            raise DatasetError("no training case has a readable header to take a spacing from")
        target = tuple(float(s) for s in np.median(np.array(spacings), axis=0))
    window = Plan.window(data, target)
    if data.normalization == "window":
        return window
    jobs = [(f, data, config.model.num_classes, config.seed) for f in train_files]
    results = parallel_map(_foreground_samples, jobs, workers, "foreground statistics")
    errors = [message for _, message in results if message is not None]
    if errors and not data.skip_bad_cases:
        raise DatasetError("\n".join(errors))
    samples = np.concatenate([values for values, _ in results])
    if len(samples) == 0:
        raise DatasetError("no training case has foreground voxels to normalise with")
    return dataclasses.replace(
        window,
        clip=tuple(float(p) for p in np.percentile(samples, FOREGROUND_PERCENTILES)),
        mean=float(samples.mean()),
        std=float(max(samples.std(), 1e-6)),
    )
