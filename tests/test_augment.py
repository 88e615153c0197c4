"""Spatial augmentation: one warp per example keeps labels on their anatomy at every level."""

import numpy as np
import pytest
from conftest import make_tiny_config
from scipy import ndimage

from autocontext_jax.data import augment
from autocontext_jax.data.sampling import box_downsample, pyramid_crops

SHAPE = (48, 40, 36)
CENTRE = (24, 20, 18)


def _blocks_volume():
    """Labels in boxes of several classes, and an image whose intensity is 100 x the label."""
    label = np.zeros(SHAPE, np.uint8)
    label[8:30, 6:26, 5:30] = 3
    label[18:40, 15:36, 10:20] = 5
    label[22:26, 4:38, 22:26] = 1
    label[30:34, 10:14, 8:30] = 7
    return label.astype(np.float32) * 100.0, label


def _strong_config():
    config = make_tiny_config().augment
    for part in ("rotation", "scale", "translation", "elastic"):
        config[f"{part}_probability"] = 1.0
    config.rotation_degrees = 30.0
    config.scale = 0.2
    config.elastic_voxels = 3.0
    return config


@pytest.mark.parametrize("seed", range(4))
def test_image_and_labels_stay_aligned_under_every_transform(seed):
    image, label = _blocks_volume()
    transform = augment.sample_spatial_transform(np.random.default_rng(seed), _strong_config())
    assert transform is not None and transform.elastic is not None
    warped_image, warped_label = augment.warp_region(image, label, CENTRE, 32, transform, 0.0)
    assert warped_image.shape == warped_label.shape == (32, 32, 32)
    nearest_class = np.rint(warped_image / 100.0)
    # Inside a class (its 3^3 neighbourhood uniform, so linear interpolation reads only that
    # class), the warped label is the class the warped image shows...
    uniform = ndimage.maximum_filter(label, 3) == ndimage.minimum_filter(label, 3)
    inside, _ = augment.warp_region(uniform.astype(np.float32), label, CENTRE, 32, transform, 1.0)
    pure = inside > 1 - 1e-6
    assert pure.mean() > 0.5
    np.testing.assert_array_equal(warped_label[pure], nearest_class[pure])
    # ...and elsewhere only boundary voxels, a thin shell around each box, may disagree.
    assert np.mean(warped_label == nearest_class) > 0.85
    assert len(np.unique(warped_label)) >= 3


def test_the_identity_transform_cuts_exactly_the_unaugmented_crops():
    image, label = _blocks_volume()
    identity = augment.SpatialTransform(np.eye(3), np.zeros(3))
    plain = pyramid_crops(image, label, CENTRE, 8, 2, 8, -7.0)
    warped = augment.augmented_pyramid_crops(image, label, CENTRE, identity, 8, 2, 8, -7.0)
    np.testing.assert_allclose(warped["image"], plain["image"], rtol=1e-6)
    np.testing.assert_array_equal(warped["label"], plain["label"])


def test_a_quarter_turn_rotates_the_region_about_its_centre():
    rng = np.random.default_rng(0)
    image = rng.normal(size=SHAPE).astype(np.float32)
    label = (image > 0).astype(np.uint8)
    turn = augment.SpatialTransform(augment.rotation_matrix((0.0, 0.0, np.pi / 2)), np.zeros(3))
    warped_image, warped_label = augment.warp_region(image, label, CENTRE, 16, turn, 0.0)
    # Output offset (x, y, z) reads input offset (-y, x, z): the first two axes turn.
    o = np.arange(16) - 8
    ox, oy, oz = np.meshgrid(o, o, o, indexing="ij")
    source = (CENTRE[0] - oy, CENTRE[1] + ox, CENTRE[2] + oz)
    np.testing.assert_allclose(warped_image, image[source], atol=1e-4)
    np.testing.assert_array_equal(warped_label, label[source])


def test_the_three_levels_of_an_augmented_example_show_the_same_anatomy():
    image, label = _blocks_volume()
    image += np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    transform = augment.sample_spatial_transform(np.random.default_rng(2), _strong_config())
    crop = 4
    out = augment.augmented_pyramid_crops(image, label, CENTRE, transform, crop, 3, 8, -7.0)
    assert out["image"].shape == (3, crop, crop, crop, 1)
    for s in range(2):
        coarse_centre = (slice(crop // 4, -crop // 4),) * 3
        np.testing.assert_allclose(
            box_downsample(out["image"][s + 1, ..., 0], 2),
            out["image"][s, ..., 0][coarse_centre],
            rtol=1e-5,
            atol=1e-4,
        )
        fine_fractions = out["label"][s + 1].reshape(crop // 2, 2, crop // 2, 2, crop // 2, 2, 8)
        np.testing.assert_allclose(
            fine_fractions.mean(axis=(1, 3, 5)), out["label"][s][coarse_centre], atol=1e-6
        )


def test_no_part_drawn_means_no_transform_and_probabilities_are_independent():
    config = _strong_config()
    for part in ("rotation", "scale", "translation", "elastic"):
        config[f"{part}_probability"] = 0.0
    assert augment.sample_spatial_transform(np.random.default_rng(0), config) is None
    config.translation_probability = 1.0
    shifted = augment.sample_spatial_transform(np.random.default_rng(0), config)
    config.rotation_probability = 1.0
    both = augment.sample_spatial_transform(np.random.default_rng(0), config)
    np.testing.assert_array_equal(shifted.translation, both.translation)
    assert np.abs(shifted.translation).max() <= config.translation_voxels
    np.testing.assert_allclose(both.matrix @ both.matrix.T, np.eye(3), atol=1e-12)
