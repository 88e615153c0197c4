"""Whole-volume prediction of every level and the Dice tables."""

import pathlib

import jax
import numpy as np
import pytest

from autocontext_jax import inference
from autocontext_jax.data.geometry import Geometry, Scan
from autocontext_jax.data.plan import Plan
from autocontext_jax.data.sampling import box_downsample
from autocontext_jax.evaluation.evaluate import dice_per_class
from autocontext_jax.evaluation.reports import dice_table
from autocontext_jax.inference.pyramid import pad_to_multiple, pyramid_volumes
from autocontext_jax.models import build_pyramid


def test_dice_per_class_follows_its_conventions():
    reference = np.zeros((4, 4, 4), np.uint8)
    reference[:2] = 1
    reference[2:, :2] = 2
    prediction = reference.copy()
    prediction[0] = 0  # class 1: 16 of 32 voxels found
    prediction[3, 3, 3] = 3  # class 3 absent from the reference
    scores = dice_per_class(prediction, reference, 5)
    assert scores[0] == pytest.approx(2 * 16 / (16 + 32))
    assert scores[1] == pytest.approx(1.0)
    assert scores[2] == 0.0  # predicted, not in the reference
    assert scores[3] == 1.0  # absent from both


def test_pad_to_multiple_pads_the_far_ends():
    volume = np.ones((5, 8, 9), np.float32)
    padded = pad_to_multiple(volume, 4, -2.0)
    assert padded.shape == (8, 8, 12)
    np.testing.assert_array_equal(padded[:5, :, :9], volume)
    assert np.all(padded[5:] == -2.0) and np.all(padded[:, :, 9:] == -2.0)


def test_pyramid_volumes_nest():
    image = np.random.default_rng(0).normal(size=(32, 16, 48)).astype(np.float32)
    coarse, fine = pyramid_volumes(image, 2)
    assert coarse.shape == (1, 8, 4, 12, 1) and fine.shape == (1, 16, 8, 24, 1)
    np.testing.assert_allclose(box_downsample(fine[0, ..., 0], 2), coarse[0, ..., 0], atol=1e-5)


@pytest.mark.slow
def test_predict_levels_returns_label_maps_on_the_input_grid(tiny_config):
    tiny_config.pyramid.levels = 3
    model = build_pyramid(tiny_config)
    images = [np.zeros((1, 2, 2, 2, 1), np.float32)] * 3
    variables = model.init(jax.random.key(0), images)
    image = np.random.default_rng(0).normal(size=(21, 13, 30)).astype(np.float32) * 100
    # A scan on the plan's grid (1 mm), in Hounsfield units.
    plan = Plan.window(tiny_config.data, (1.0, 1.0, 1.0))
    run = inference.Run(pathlib.Path("."), tiny_config, model, variables, 0, plan)
    geometry = Geometry(
        original_shape=image.shape,
        original_affine=np.eye(4),
        canonical_affine=np.eye(4),
        spacing=(1.0, 1.0, 1.0),
    )
    labels = inference.segment(run, Scan(image, geometry)).levels
    assert len(labels) == 3
    for level in labels:
        assert level.shape == (21, 13, 30) and level.dtype == np.uint8
        assert level.max() < tiny_config.model.num_classes


def test_dice_table_has_the_rows_of_the_paper():
    result = {
        "case_ids": ["a", "b"],
        "classes": ["artery", "vein"],
        "dice": {"level_1": [[0.5, 1.0], [0.7, 0.8]]},
    }
    table = dice_table(result)
    assert "| Dice (%) | artery | vein | Avg. |" in table
    assert "| Avg | 60.0 | 90.0 | 75.0 |" in table
    assert "| Min | 50.0 | 80.0 | 75.0 |" in table
    assert "| Max | 70.0 | 100.0 | 75.0 |" in table
