"""Label maps: the paper's label set, and a dataset's ids turned into the model's classes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.geometry import Geometry
from autocontext_jax.data.nifti import read_label_voxels

# Index i is model class i; the names follow Roth et al. (2018), Table 1.
PAPER_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "artery",
    "portal_vein",
    "liver",
    "spleen",
    "stomach",
    "gallbladder",
    "pancreas",
)
NUM_PAPER_CLASSES = len(PAPER_CLASS_NAMES)
# TotalSegmentator v2 "total" id -> paper class (../shared/data/totalseg_example/README.md).
TOTALSEGMENTATOR_TO_PAPER: tuple[tuple[int, int], ...] = (
    (52, 1),  # aorta -> artery
    (64, 2),  # portal_vein_and_splenic_vein -> portal vein
    (5, 3),  # liver
    (1, 4),  # spleen
    (6, 5),  # stomach
    (4, 6),  # gallbladder
    (7, 7),  # pancreas
)
# Label maps known by name (`predict --label_map=totalsegmentator`).
LABEL_MAP_PRESETS: dict[str, tuple[tuple[int, int], ...]] = {
    "totalsegmentator": TOTALSEGMENTATOR_TO_PAPER,
}


def class_names(num_classes: int) -> tuple[str, ...]:
    """Display names of the model's classes: the paper's for 8 classes, numbers otherwise."""
    if num_classes == NUM_PAPER_CLASSES:
        return PAPER_CLASS_NAMES
    return ("background",) + tuple(f"class_{k}" for k in range(1, num_classes))


def parse_label_map(text: str, num_classes: int) -> tuple[tuple[int, int], ...]:
    """(dataset id, class) pairs from a preset name or `ID:CLASS,ID:CLASS,...`, checked."""
    text = text.strip()
    if text.lower() in LABEL_MAP_PRESETS:
        return LABEL_MAP_PRESETS[text.lower()]
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        source, colon, target = item.partition(":")
        if not colon or not source.strip().isdigit() or not target.strip().isdigit():
            raise ValueError(
                f"label map {text!r}: expected ID:CLASS pairs such as 52:1,5:3 or one of "
                f"{sorted(LABEL_MAP_PRESETS)}, got {item!r}"
            )
        pairs.append((int(source), int(target)))
    if not pairs:
        raise ValueError(f"label map {text!r}: no ID:CLASS pair")
    sources = [source for source, _ in pairs]
    if len(set(sources)) != len(sources):
        raise ValueError(f"label map {text!r}: an id is mapped twice")
    outside = [target for _, target in pairs if target >= num_classes]
    if outside:
        raise ValueError(f"label map {text!r}: classes {outside} >= the model's {num_classes}")
    return tuple(pairs)


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
                f"{path}: label ids {found} outside the model's classes 0..{num_classes - 1} "
                f"(map other ids with config.data.label_map, or predict --label_map)"
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


def read_labels(
    path: str | os.PathLike,
    geometry: Geometry,
    num_classes: int,
    label_map: Sequence[Sequence[int]] = (),
    unmapped: str = "background",
    image_path: str | os.PathLike = "the scan",
) -> np.ndarray:
    """The label file of a scan as model classes on the scan's canonical grid.

    The file must lie on the scan's grid (`geometry`); its ids go through `label_map` as in
    training.
    """
    raw = read_label_voxels(path, geometry, image_path)
    return remap_labels(raw, num_classes, label_map, path, unmapped)
