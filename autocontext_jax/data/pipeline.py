"""The Grain input pipeline: batches of aligned pyramid crops from different volumes.

Example e of the run is a pure function of (seed, e): its step e // B picks B distinct
volumes with a per-step permutation, and its own generator picks the foreground centre.
The dataset is therefore random-access, so a resumed run starts at its checkpoint's step
and draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from autocontext_jax.data.augment import (
    augmented_pyramid_crops,
    device_box_shape,
    device_region,
    sample_spatial_transform,
)
from autocontext_jax.data.cache import CachedCase, load_cached
from autocontext_jax.data.dataset import Case
from autocontext_jax.data.device_augment import spatial_on_device
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.plan import Plan
from autocontext_jax.data.sampling import foreground_centre, level_region, pyramid_crops


@dataclasses.dataclass
class PreparedCase:
    """A case ready for sampling: normalised image, labels, foreground voxels per class."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    # Class id -> (N, 3) coordinates of its voxels, for every foreground class present.
    class_voxels: dict[int, np.ndarray]


def index_case(case_id: str, image: np.ndarray, label: np.ndarray, path: str) -> PreparedCase:
    """A normalised image and its labels, with the voxels of every foreground class indexed."""
    coordinates = np.argwhere(label > 0).astype(np.int32)
    if len(coordinates) == 0:
        raise DatasetError(f"{path}: the label map has no foreground voxel to centre crops on")
    classes = np.asarray(label[tuple(coordinates.T)])
    order = np.argsort(classes, kind="stable")
    present, starts = np.unique(classes[order], return_index=True)
    groups = np.split(coordinates[order], starts[1:])
    return PreparedCase(
        case_id, image, label, {int(k): group for k, group in zip(present, groups, strict=True)}
    )


def prepare_case(case: Case, plan: Plan, path: str) -> PreparedCase:
    """Normalise the intensities of an in-memory case (on the plan's grid) and index it."""
    return index_case(case.case_id, plan.normalize(case.image), case.label, path)


def read_prepared_case(case: CachedCase) -> PreparedCase:
    """A preprocessed case, memory-mapped from the cache and indexed for sampling."""
    image, label = load_cached(case)
    return index_case(case.case_id, image, label, str(case.label))


def crop_centre(
    rng: np.random.Generator,
    case: PreparedCase,
    strategy: str,
    class_weights: Sequence[float] = (),
) -> tuple[int, int, int]:
    """A foreground voxel to centre the crops on.

    `foreground`: uniform over all foreground voxels (the paper). `class_balanced`: first a
    class among those present, then one of its voxels, so that small structures (vessels,
    gallbladder, pancreas) are seen as often as the liver; the class is drawn uniformly, or
    in proportion to `class_weights[k]` (one weight per model class) to oversample some.
    """
    if strategy == "class_balanced":
        classes = sorted(case.class_voxels)
        weights = np.array([class_weights[k] for k in classes]) if class_weights else None
        if weights is None or weights.sum() <= 0:
            chosen = classes[rng.integers(len(classes))]
        else:
            chosen = classes[rng.choice(len(classes), p=weights / weights.sum())]
        return foreground_centre(rng, case.class_voxels[chosen])
    index = int(rng.integers(sum(len(v) for v in case.class_voxels.values())))
    for voxels in case.class_voxels.values():
        if index < len(voxels):
            return tuple(int(v) for v in voxels[index])
        index -= len(voxels)
    raise AssertionError("unreachable: index is below the total count")


class PyramidExampleSampler:
    """Maps a global example index to one example of aligned pyramid crops."""

    def __init__(
        self,
        cases: Sequence[CachedCase],
        config: ml_collections.ConfigDict,
        plan: Plan,
        preloaded: dict[str, PreparedCase] | None = None,
    ) -> None:
        """Sample from preprocessed `cases`; `preloaded` ones are not read again."""
        self._files = list(cases)
        self._config = config
        self._batch_size = config.train.batch_size
        self._pad_value = plan.pad_value
        self._cache: dict[str, PreparedCase] = dict(preloaded or {})
        self._lock = threading.Lock()
        # Decided here, in the training process: worker processes must not start a backend.
        self.device_box: tuple[int, int, int] | None = None
        if spatial_on_device(config.augment, jax.default_backend()):
            shapes = [
                self._cache[c.case_id].image.shape
                if c.case_id in self._cache
                else np.load(c.image, mmap_mode="r").shape
                for c in self._files
            ]
            edge = level_region((0, 0, 0), config.data.crop_size, 1, config.pyramid.levels)[1]
            self.device_box = device_box_shape(config.augment, edge, shapes)

    def __getstate__(self) -> dict:
        """Worker processes read their own copies instead of unpickling every volume."""
        state = self.__dict__.copy()
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        """Restore after pickling, with an empty cache and a fresh lock."""
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def cases_for_step(self, step: int) -> np.ndarray:
        """Indices of the volumes of the global batch of `step`: distinct while possible."""
        rng = np.random.default_rng([self._config.seed, step])
        n, b = len(self._files), self._batch_size
        rounds = -(-b // n)
        return np.concatenate([rng.permutation(n) for _ in range(rounds)])[:b]

    def _case(self, index: int) -> PreparedCase:
        files = self._files[index]
        with self._lock:
            if files.case_id not in self._cache:
                self._cache[files.case_id] = read_prepared_case(files)
            return self._cache[files.case_id]

    def __call__(self, example: int) -> dict[str, np.ndarray]:
        """The pyramid crops of global example `example` (its raw box on the device path)."""
        step, slot = divmod(int(example), self._batch_size)
        case = self._case(int(self.cases_for_step(step)[slot]))
        rng = np.random.default_rng([self._config.seed, step, slot, 1])
        data = self._config.data
        centre = crop_centre(rng, case, data.centre_sampling, data.class_sampling_weights)
        # Its own generator: switching augmentation on or off keeps the crop centres.
        augment_rng = np.random.default_rng([self._config.seed, step, slot, 2])
        transform = sample_spatial_transform(augment_rng, self._config.augment)
        sizes = (
            self._config.data.crop_size,
            self._config.pyramid.levels,
            self._config.model.num_classes,
            self._pad_value,
        )
        if self.device_box is not None:
            edge = level_region(centre, data.crop_size, 1, self._config.pyramid.levels)[1]
            points = self._config.augment.elastic_control_points
            return device_region(
                case.image,
                case.label,
                centre,
                transform,
                edge,
                self.device_box,
                points,
                self._pad_value,
            )
        if transform is None:
            return pyramid_crops(case.image, case.label, centre, *sizes)
        return augmented_pyramid_crops(case.image, case.label, centre, transform, *sizes)


@dataclasses.dataclass(frozen=True)
class LocalToGlobalExample:
    """Maps this process's example index to the global one (its slots of each batch)."""

    global_batch: int
    local_batch: int
    first_slot: int

    def __call__(self, local_index: int) -> int:
        """The global example index of local example `local_index`."""
        step, slot = divmod(int(local_index), self.local_batch)
        return step * self.global_batch + self.first_slot + slot


class ResumableBatches:
    """The batches of this process, remembering the Grain state after each recent one.

    The train loop reads ahead of the step it runs (device prefetch), so the state to save
    with step k's checkpoint is the one after the k-th batch, not the iterator's current one.
    """

    def __init__(
        self, iterator: grain.DatasetIterator, first_step: int, next_step: int, worker_count: int
    ) -> None:
        """Wrap `iterator` over a dataset starting at `first_step`, now at `next_step`."""
        self._iterator = iterator
        self._first_step = first_step
        self._worker_count = worker_count
        self._next_step = next_step
        self._states: collections.OrderedDict[int, dict] = collections.OrderedDict()

    def __iter__(self) -> ResumableBatches:
        """The iterator itself."""
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch."""
        batch = next(self._iterator)
        self._next_step += 1
        self._states[self._next_step] = self._iterator.get_state()
        while len(self._states) > _KEPT_STATES:
            self._states.popitem(last=False)
        return batch

    def state_at(self, step: int) -> dict:
        """The JSON-serialisable state of the pipeline once step `step`'s batch was drawn."""
        if step == self._first_step:
            grain_state = None
        elif step in self._states:
            grain_state = self._states[step]
        else:
            raise KeyError(f"the pipeline state at step {step} is no longer kept")
        return {
            "first_step": self._first_step,
            "next_step": step,
            "worker_count": self._worker_count,
            "grain": grain_state,
        }


# More than the device prefetch reads ahead of the running step.
_KEPT_STATES = 16


def train_batches(
    sampler: PyramidExampleSampler,
    config: ml_collections.ConfigDict,
    start_step: int,
    process_index: int = 0,
    process_count: int = 1,
    saved_state: dict | None = None,
) -> ResumableBatches:
    """The share of this process in the global batches of steps start_step .. train.steps - 1.

    With the `saved_state` of a checkpoint at `start_step` the Grain iterator is restored
    from it; without one (or when the worker count changed, which changes Grain's state)
    the pipeline starts at `start_step`. Both give the same batches: batch k is a pure
    function of (seed, k).
    """
    first_step = start_step
    usable = (
        saved_state is not None
        and saved_state.get("next_step") == start_step
        and saved_state.get("worker_count") == config.data.worker_count
        and saved_state.get("grain") is not None
    )
    if usable:
        first_step = saved_state["first_step"]
    local_batch = config.train.batch_size // process_count
    to_global = LocalToGlobalExample(
        config.train.batch_size, local_batch, process_index * local_batch
    )
    dataset = (
        grain.MapDataset.range(first_step * local_batch, config.train.steps * local_batch)
        .map(to_global)
        .map(sampler)
        .batch(local_batch, drop_remainder=True)
    )
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=2)
    )
    if config.data.worker_count > 0:
        # Grain reads absl flags when it starts workers; outside an absl app (tests,
        # notebooks) nobody parsed them, so take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.data.worker_count)
        )
    iterator = iter(iter_dataset)
    if usable:
        iterator.set_state(saved_state["grain"])
    return ResumableBatches(iterator, first_step, start_step, config.data.worker_count)
