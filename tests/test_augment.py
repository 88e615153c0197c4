"""Spatial augmentation: one warp per example keeps labels on their anatomy at every level."""

import jax
import numpy as np
import pytest
from conftest import make_tiny_config
from scipy import ndimage

from autocontext_jax.data import augment, device_augment
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


CROP, LEVELS, EDGE = 8, 2, 32


@pytest.fixture(scope="module")
def device_crops():
    """The device path's warp of a batch of raw boxes, compiled once per box shape."""
    return jax.jit(lambda batch: device_augment.device_pyramid_crops(batch, CROP, LEVELS, 8))


def _on_device(device_crops, image, label, centre, transform, config, pad=-7.0):
    box = augment.device_box_shape(config, EDGE, [image.shape])
    region = augment.device_region(
        image, label, centre, transform, EDGE, box, config.elastic_control_points, pad
    )
    out = device_crops({key: np.asarray(value)[None] for key, value in region.items()})
    return {key: np.asarray(value[0]) for key, value in out.items()}


def _one_part(part):
    config = _strong_config()
    for other in augment.SPATIAL_PARTS:
        if other != part:
            config[f"{other}_probability"] = 0.0
    return config


@pytest.mark.parametrize("part", [*augment.SPATIAL_PARTS, "all"])
@pytest.mark.parametrize("seed", range(2))
def test_device_and_host_warps_cut_the_same_crops(device_crops, part, seed):
    image, label = _blocks_volume()
    image += np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)
    config = _strong_config() if part == "all" else _one_part(part)
    transform = augment.sample_spatial_transform(np.random.default_rng(seed), config)
    # Centred, and at a corner, where the reads leave the volume.
    for centre in (CENTRE, (3, 37, 2)):
        host = augment.augmented_pyramid_crops(image, label, centre, transform, CROP, LEVELS, 8, -7)
        device = _on_device(device_crops, image, label, centre, transform, config)
        np.testing.assert_allclose(device["image"], host["image"], atol=1e-2)
        assert np.abs(device["image"] - host["image"]).mean() < 1e-3
        # Nearest neighbour may differ only where rounding meets a tie: not in these.
        np.testing.assert_array_equal(device["label"], host["label"])


def test_the_device_box_is_cut_from_a_volume_larger_than_it(device_crops):
    rng = np.random.default_rng(5)
    label = np.zeros((160, 150, 140), np.uint8)
    label[60:100, 50:110, 40:90] = 2
    label[75:85, 30:120, 60:70] = 6
    image = label * np.float32(50.0) + rng.normal(size=label.shape).astype(np.float32)
    config = _strong_config()
    assert augment.device_box_shape(config, EDGE, [label.shape]) < label.shape
    for seed in range(3):
        transform = augment.sample_spatial_transform(np.random.default_rng(seed), config)
        host = augment.augmented_pyramid_crops(image, label, (80, 75, 70), transform, CROP, 2, 8, 0)
        device = _on_device(device_crops, image, label, (80, 75, 70), transform, config, 0.0)
        np.testing.assert_allclose(device["image"], host["image"], atol=1e-2)
        np.testing.assert_array_equal(device["label"], host["label"])


def test_no_transform_on_the_device_cuts_exactly_the_unaugmented_crops(device_crops):
    image, label = _blocks_volume()
    plain = pyramid_crops(image, label, (5, 30, 18), CROP, LEVELS, 8, -7.0)
    device = _on_device(device_crops, image, label, (5, 30, 18), None, _strong_config())
    np.testing.assert_allclose(device["image"], plain["image"], rtol=1e-6)
    np.testing.assert_array_equal(device["label"], plain["label"])


@pytest.mark.parametrize("part", [*augment.SPATIAL_PARTS, "all"])
def test_labels_stay_aligned_to_the_image_under_every_device_warp(part):
    image, label = _blocks_volume()
    config = _strong_config() if part == "all" else _one_part(part)
    warp = jax.jit(device_augment.warp_box, static_argnums=1)
    box = augment.device_box_shape(config, EDGE, [SHAPE])
    uniform = ndimage.maximum_filter(label, 3) == ndimage.minimum_filter(label, 3)
    for seed in range(2):
        transform = augment.sample_spatial_transform(np.random.default_rng(seed), config)
        assert transform is not None
        region = augment.device_region(image, label, CENTRE, transform, EDGE, box, 4, 0.0)
        warped_image, warped_label = (np.asarray(a) for a in warp(region, EDGE))
        nearest_class = np.rint(warped_image / 100.0)
        region["image_box"] = augment.device_region(
            uniform.astype(np.float32), label, CENTRE, transform, EDGE, box, 4, 1.0
        )["image_box"]
        region["pad_value"] = np.float32(1.0)
        pure = np.asarray(warp(region, EDGE)[0]) > 1 - 1e-6
        assert pure.mean() > 0.5
        np.testing.assert_array_equal(warped_label[pure], nearest_class[pure])
        assert np.mean(warped_label == nearest_class) > 0.85
        assert len(np.unique(warped_label)) >= 3


def test_auto_warps_on_the_device_only_on_an_accelerator_with_spatial_augmentation():
    paper, default = _strong_config(), make_tiny_config().augment
    assert not device_augment.spatial_on_device(paper, "cpu")
    assert device_augment.spatial_on_device(paper, "gpu")
    assert not device_augment.spatial_on_device(default, "tpu")
    default.device, paper.device = "device", "host"
    assert device_augment.spatial_on_device(default, "cpu")
    assert not device_augment.spatial_on_device(paper, "gpu")


def test_the_read_bound_covers_the_reads_of_extreme_transforms():
    config = _strong_config()
    bound = augment.read_extent_bound(config, EDGE)
    angle = np.deg2rad(config.rotation_degrees)
    elastic = np.full((3, 4, 4, 4), augment.ELASTIC_CLIP_STD * config.elastic_voxels)
    elastic[:, ::2] *= -1  # neighbouring control points pull apart
    for signs in np.ndindex(2, 2, 2):
        angles = np.where(np.array(signs) == 1, angle, -angle)
        matrix = augment.rotation_matrix(angles) / (1 - config.scale)
        transform = augment.SpatialTransform(matrix, np.full(3, 4.0), elastic)
        coordinates = augment.source_coordinates((0, 0, 0), EDGE, transform).reshape(3, -1)
        low = augment._read_low_corner((0, 0, 0), EDGE, transform)
        assert np.all(np.floor(coordinates.min(axis=1)) >= low + 1)
        assert np.all(np.floor(coordinates.max(axis=1)) + 1 < low + bound)
