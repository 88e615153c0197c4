"""Spatial augmentation of the paper: translation, 3D rotation, scaling, elastic deformation.

One transform is drawn per example and applied with ONE resampling of the physical region
that the coarsest pyramid level sees (image linear, labels nearest); every finer level is
cut from that warped region, so all levels see the same deformed anatomy. Output voxel o
of the region (edge E) reads the volume at

    centre + t + M (o - E // 2) + u(o)

with M = rotation / scale and u a smooth displacement field, so the identity transform
reads exactly the voxels an unaugmented crop does. Intensity augmentation runs on the
device (data/device_augment.py).

With `augment.device` on (data/device_augment.py: spatial_on_device) the host only cuts
the raw box around the centre that the transform can read (device_region) and ships it
with the transform's parameters; the device warps it (data/device_augment.py:
device_pyramid_crops) to the same crops, to interpolation tolerance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np
from scipy import ndimage

from autocontext_jax.data.sampling import (
    box_downsample,
    class_fractions,
    downsample_factor,
    extract_box,
    level_region,
)

# Elastic control-point displacements are normal draws truncated at this many standard
# deviations, so the region a transform reads has a known bound (the device path ships a
# box of fixed size). A draw beyond 6 sigma has a probability of 2e-9.
ELASTIC_CLIP_STD = 6.0
SPATIAL_PARTS = ("rotation", "scale", "translation", "elastic")


@dataclasses.dataclass(frozen=True)
class SpatialTransform:
    """A sampled transform: input offset = matrix @ output offset + translation + elastic."""

    matrix: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,), native voxels
    # (3, g, g, g) displacements (native voxels) at g^3 control points spread over the
    # region, or None for no elastic deformation.
    elastic: np.ndarray | None = None


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """The rotation by `angles` (radians) about the first, second and third axes, in turn."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        rotation = np.eye(3)
        rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
        matrix = rotation @ matrix
    return matrix


def sample_spatial_transform(
    rng: np.random.Generator, augment: ml_collections.ConfigDict
) -> SpatialTransform | None:
    """Draw each part with its probability from `augment`; None when no part is drawn."""
    matrix, translation, elastic, drawn = np.eye(3), np.zeros(3), None, False
    # Every draw happens whether or not it is used, so one part's probability does not
    # change the values another part gets for the same example.
    apply = rng.random(4) < np.array(
        [
            augment.rotation_probability,
            augment.scale_probability,
            augment.translation_probability,
            augment.elastic_probability,
        ]
    )
    angles = np.deg2rad(rng.uniform(-1.0, 1.0, 3) * augment.rotation_degrees)
    scale = rng.uniform(1.0 - augment.scale, 1.0 + augment.scale)
    shift = rng.uniform(-1.0, 1.0, 3) * augment.translation_voxels
    points = augment.elastic_control_points
    normal = rng.normal(size=(3, points, points, points))
    field = np.clip(normal, -ELASTIC_CLIP_STD, ELASTIC_CLIP_STD) * augment.elastic_voxels
    if apply[0]:
        matrix, drawn = rotation_matrix(angles), True
    if apply[1]:
        # Scale > 1 magnifies: the region reads a smaller patch of the volume.
        matrix, drawn = matrix / scale, True
    if apply[2]:
        translation, drawn = shift, True
    if apply[3] and augment.elastic_voxels > 0:
        elastic, drawn = field, True
    return SpatialTransform(matrix, translation, elastic) if drawn else None


def _smooth_field(control: np.ndarray, edge: int) -> np.ndarray:
    """Control-point displacements spread over edge^3 voxels with separable Gaussian weights.

    A tensor product of three (edge x g) weight matrices: three small matrix products
    instead of a spline resampling of the whole field.
    """
    points = control.shape[1]
    positions = (np.arange(points) + 0.5) * edge / points
    sigma = edge / points
    grid = np.arange(edge)[:, None]
    weights = np.exp(-0.5 * ((grid - positions[None, :]) / sigma) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    weights = weights.astype(np.float32)
    field = np.einsum("xi,cijk->cxjk", weights, control.astype(np.float32))
    field = np.einsum("yj,cxjk->cxyk", weights, field)
    return np.einsum("zk,cxyk->cxyz", weights, field)


def source_coordinates(centre: Sequence[int], edge: int, transform: SpatialTransform) -> np.ndarray:
    """The (3, E, E, E) volume coordinates that the E^3 output region reads."""
    offsets = (np.arange(edge) - edge // 2).astype(np.float32)
    matrix = transform.matrix.astype(np.float32)
    coordinates = np.empty((3, edge, edge, edge), np.float32)
    for i in range(3):
        coordinates[i] = (
            np.float32(centre[i] + transform.translation[i])
            + matrix[i, 0] * offsets[:, None, None]
            + matrix[i, 1] * offsets[None, :, None]
            + matrix[i, 2] * offsets[None, None, :]
        )
    if transform.elastic is not None:
        coordinates += _smooth_field(transform.elastic, edge)
    return coordinates


def warp_region(
    image: np.ndarray,
    label: np.ndarray,
    centre: Sequence[int],
    edge: int,
    transform: SpatialTransform,
    image_pad_value: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The E^3 region around `centre` read through `transform`: image linear, labels nearest.

    Only the block of the (possibly memory-mapped) volume that the coordinates touch is
    read; outside the volume the image is `image_pad_value` and the labels background.
    """
    coordinates = source_coordinates(centre, edge, transform)
    low = np.floor(coordinates.reshape(3, -1).min(axis=1)).astype(int) - 1
    high = np.ceil(coordinates.reshape(3, -1).max(axis=1)).astype(int) + 2
    coordinates -= low.astype(np.float32)[:, None, None, None]
    image_block = extract_box(image, low, high, np.float32(image_pad_value))
    label_block = extract_box(label, low, high, np.uint8(0))
    warped_image = ndimage.map_coordinates(
        image_block, coordinates, order=1, mode="constant", cval=image_pad_value, prefilter=False
    )
    warped_label = ndimage.map_coordinates(
        label_block, coordinates, order=0, mode="constant", cval=0, prefilter=False
    )
    return warped_image.astype(np.float32, copy=False), warped_label.astype(np.uint8, copy=False)


def augmented_pyramid_crops(
    image: np.ndarray,
    label: np.ndarray,
    centre: Sequence[int],
    transform: SpatialTransform,
    crop_size: int,
    num_levels: int,
    num_classes: int,
    image_pad_value: float,
) -> dict[str, np.ndarray]:
    """Like sampling.pyramid_crops, with every level cut from one warped coarsest region."""
    _, edge = level_region(centre, crop_size, 1, num_levels)
    region_image, region_label = warp_region(image, label, centre, edge, transform, image_pad_value)
    images, labels = [], []
    for level in range(1, num_levels + 1):
        factor = downsample_factor(level, num_levels)
        first = edge // 2 - (factor * crop_size) // 2
        window = (slice(first, first + factor * crop_size),) * 3
        images.append(box_downsample(region_image[window], factor))
        labels.append(class_fractions(region_label[window], factor, num_classes))
    return {"image": np.stack(images)[..., None], "label": np.stack(labels)}


def spatial_augmentation_on(augment: ml_collections.ConfigDict) -> bool:
    """Whether `augment` can draw any spatial transform at all."""
    elastic = augment.elastic_probability > 0 and augment.elastic_voxels > 0
    return elastic or any(augment[f"{part}_probability"] > 0 for part in SPATIAL_PARTS[:3])


def read_extent_bound(augment: ml_collections.ConfigDict, edge: int) -> int:
    """An upper bound, per axis, on the native voxels a warped E^3 region reads.

    The max row sum of a product of rotations is at most the product of theirs, each at
    most cos a + sin a; scaling by 1 - s stretches it by 1 / (1 - s); the smoothed elastic
    field is a convex combination of its control points (at most ELASTIC_CLIP_STD sigma);
    translation moves the region without growing it. +5: warp_region's margins, rounding.
    """
    stretch = 1.0
    if augment.rotation_probability > 0:
        angle = min(np.deg2rad(abs(augment.rotation_degrees)), np.pi / 4)
        stretch *= (np.cos(angle) + np.sin(angle)) ** 3
    if augment.scale_probability > 0:
        stretch /= 1.0 - augment.scale
    elastic = 0.0
    if augment.elastic_probability > 0:
        elastic = 2 * ELASTIC_CLIP_STD * abs(augment.elastic_voxels)
    return int(np.ceil((edge - 1) * stretch + elastic)) + 5


def _read_low_corner(centre: Sequence[int], edge: int, transform: SpatialTransform) -> np.ndarray:
    """The low corner of the block warp_region reads, from the region's corners alone."""
    first, last = -(edge // 2), edge - 1 - edge // 2
    # A linear function over a box is smallest at a corner: per term, the smaller end.
    affine = np.minimum(transform.matrix * first, transform.matrix * last).sum(axis=1)
    lowest = np.asarray(centre, np.float64) + transform.translation + affine
    if transform.elastic is not None:
        lowest += transform.elastic.reshape(3, -1).min(axis=1)
    return np.floor(lowest).astype(int) - 1


def device_region(
    image: np.ndarray,
    label: np.ndarray,
    centre: Sequence[int],
    transform: SpatialTransform | None,
    edge: int,
    box_shape: Sequence[int],
    control_points: int,
    image_pad_value: float,
) -> dict[str, np.ndarray]:
    """The raw box the device warps into the crops, and the transform's parameters.

    The box has the fixed `box_shape` (device_box_shape) and starts where the transform's
    reads start, or at the volume's first voxel: everything the warp reads inside the
    volume lies in it, so a read outside the box is outside the volume (padding).
    """
    if transform is None:
        transform = SpatialTransform(np.eye(3), np.zeros(3))
    start = np.maximum(_read_low_corner(centre, edge, transform), 0)
    end = start + np.asarray(box_shape)
    elastic = transform.elastic
    if elastic is None:
        elastic = np.zeros((3, control_points, control_points, control_points))
    return {
        "image_box": extract_box(image, start, end, np.float32(image_pad_value)),
        "label_box": extract_box(label, start, end, np.uint8(0)),
        # Where output offset 0 reads, in box coordinates.
        "origin": (np.asarray(centre) + transform.translation - start).astype(np.float32),
        "matrix": transform.matrix.astype(np.float32),
        "elastic": elastic.astype(np.float32),
        "pad_value": np.float32(image_pad_value),
    }


def device_box_shape(
    augment: ml_collections.ConfigDict, edge: int, volume_shapes: Sequence[Sequence[int]]
) -> tuple[int, int, int]:
    """The fixed shape of the device path's raw boxes: the read bound, or the largest volume."""
    bound = read_extent_bound(augment, edge)
    largest = np.max(np.asarray(volume_shapes), axis=0)
    return tuple(int(min(bound, n)) for n in largest)
