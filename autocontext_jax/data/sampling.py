"""Cutting aligned pyramid crops around a foreground voxel.

All levels are cut from one physical region: level s (factor f = 2^(S-s+1)) takes the
f*c native voxels per axis centred on the sampled voxel and averages them in f^3 blocks
to c voxels, so level s+1 covers exactly the central half of level s. Labels become
class fractions per block (soft one-hot), which keeps thin vessels visible at coarse
levels instead of letting a majority vote erase them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def downsample_factor(level: int, num_levels: int) -> int:
    """Downsample factor of pyramid `level` (1 = coarsest) in a pyramid of `num_levels`.

    Level s of S sees the image downsampled by 2^(S-s+1): the coarsest by 2^S, the
    finest by 2, each finer level the central half of the coarser one's field of view.
    """
    return 2 ** (num_levels - level + 1)


def level_region(
    centre: Sequence[int], crop_size: int, level: int, num_levels: int
) -> tuple[tuple[int, int, int], int]:
    """Native start corner and native edge length of the region that `level` sees."""
    factor = downsample_factor(level, num_levels)
    edge = factor * crop_size
    start = tuple(int(p) - edge // 2 for p in centre)
    return start, edge


def extract_box(
    volume: np.ndarray, low: Sequence[int], high: Sequence[int], pad_value: float | int
) -> np.ndarray:
    """`volume[low:high]` (per axis), padded with `pad_value` where it leaves the volume."""
    out = np.full(
        tuple(int(h - lo) for lo, h in zip(low, high, strict=True)), pad_value, volume.dtype
    )
    src, dst = [], []
    for lo, hi, n in zip(low, high, volume.shape, strict=True):
        a, b = max(lo, 0), min(hi, n)
        if a >= b:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def extract_region(
    volume: np.ndarray, start: Sequence[int], edge: int, pad_value: float | int
) -> np.ndarray:
    """The cube `volume[start : start + edge]`, padded with `pad_value` outside the volume."""
    return extract_box(volume, start, [s + edge for s in start], pad_value)


def _blocks(volume: np.ndarray, factor: int) -> np.ndarray:
    x, y, z = (n // factor for n in volume.shape)
    return volume.reshape(x, factor, y, factor, z, factor)


def box_downsample(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average a 3D volume, each of whose sizes is a multiple of `factor`, in factor^3 blocks."""
    return _blocks(volume, factor).mean(axis=(1, 3, 5), dtype=np.float32)


def class_fractions(label: np.ndarray, factor: int, num_classes: int) -> np.ndarray:
    """Fraction of each class in every factor^3 block of a 3D label volume: (..., K)."""
    shape = tuple(n // factor for n in label.shape)
    blocks = _blocks(label, factor).transpose(0, 2, 4, 1, 3, 5).reshape(-1, factor**3)
    # One bincount over (block, class) pairs: ten times faster than a pass per class.
    pairs = np.arange(len(blocks), dtype=np.int64)[:, None] * num_classes + blocks
    counts = np.bincount(pairs.ravel(), minlength=len(blocks) * num_classes)
    return (counts.reshape(*shape, num_classes) / np.float32(factor**3)).astype(np.float32)


def pyramid_crops(
    image: np.ndarray,
    label: np.ndarray,
    centre: Sequence[int],
    crop_size: int,
    num_levels: int,
    num_classes: int,
    image_pad_value: float,
) -> dict[str, np.ndarray]:
    """Aligned per-level crops: image (S, c, c, c, 1) and class fractions (S, c, c, c, K)."""
    images, labels = [], []
    for level in range(1, num_levels + 1):
        start, edge = level_region(centre, crop_size, level, num_levels)
        factor = downsample_factor(level, num_levels)
        images.append(box_downsample(extract_region(image, start, edge, image_pad_value), factor))
        # Outside the scan is background (class 0).
        labels.append(class_fractions(extract_region(label, start, edge, 0), factor, num_classes))
    return {"image": np.stack(images)[..., None], "label": np.stack(labels)}


def foreground_centre(rng: np.random.Generator, foreground: np.ndarray) -> tuple[int, int, int]:
    """A uniformly drawn voxel of the (N, 3) array of foreground voxel coordinates."""
    return tuple(int(v) for v in foreground[rng.integers(len(foreground))])
