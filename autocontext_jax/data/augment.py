"""Spatial augmentation of the paper: translation, 3D rotation, scaling, elastic deformation.

One transform is drawn per example and applied with ONE resampling of the physical region
that the coarsest pyramid level sees (image linear, labels nearest); every finer level is
cut from that warped region, so all levels see the same deformed anatomy. Output voxel o
of the region (edge E) reads the volume at

    centre + t + M (o - E // 2) + u(o)

with M = rotation / scale and u a smooth displacement field, so the identity transform
reads exactly the voxels an unaugmented crop does. Intensity augmentation runs on the
device (data/device_augment.py).
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
    field = rng.normal(size=(3, points, points, points)) * augment.elastic_voxels
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
