"""Aligned pyramid crops and the Grain pipeline that serves them."""

import itertools
import json

import numpy as np
import pytest
from conftest import make_tiny_config

from autocontext_jax.data import cache
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.dataset import Case
from autocontext_jax.data.geometry import Geometry
from autocontext_jax.data.pipeline import (
    PyramidExampleSampler,
    crop_centre,
    prepare_case,
    train_batches,
)
from autocontext_jax.data.plan import Plan
from autocontext_jax.data.sampling import (
    box_downsample,
    class_fractions,
    extract_region,
    level_region,
    pyramid_crops,
)


def test_extract_region_pads_outside_the_volume():
    volume = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    cube = extract_region(volume, (-1, 1, 2), 3, -5.0)
    assert cube.shape == (3, 3, 3)
    assert np.all(cube[0] == -5.0)
    np.testing.assert_array_equal(cube[1:, :2, :1], volume[:2, 1:3, 2:3])
    assert np.all(cube[:, :, 1:] == -5.0)
    assert np.all(extract_region(volume, (10, 0, 0), 2, 7.0) == 7.0)


def test_class_fractions_are_block_averages_of_the_one_hot_labels():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, size=(8, 4, 6)).astype(np.uint8)
    fractions = class_fractions(label, 2, 4)
    assert fractions.shape == (4, 2, 3, 4)
    np.testing.assert_allclose(fractions.sum(-1), 1.0, rtol=1e-6)
    block = label[2:4, 0:2, 4:6]
    assert fractions[1, 0, 2, 3] == pytest.approx(np.mean(block == 3))


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_finer_crops_cover_the_central_half_of_the_coarser_ones(levels):
    rng = np.random.default_rng(levels)
    image = rng.normal(size=(70, 60, 50)).astype(np.float32)
    label = rng.integers(0, 3, size=image.shape).astype(np.uint8)
    crop = 8
    out = pyramid_crops(image, label, (30, 20, 40), crop, levels, 3, -3.0)
    assert out["image"].shape == (levels, crop, crop, crop, 1)
    assert out["label"].shape == (levels, crop, crop, crop, 3)
    for s in range(levels - 1):
        coarse, fine = out["image"][s, ..., 0], out["image"][s + 1, ..., 0]
        quarter = crop // 4
        centre = coarse[quarter:-quarter, quarter:-quarter, quarter:-quarter]
        np.testing.assert_allclose(box_downsample(fine, 2), centre, rtol=1e-5, atol=1e-5)


def test_level_regions_are_centred_on_the_sampled_voxel():
    start, edge = level_region((50, 60, 70), 16, 1, 2)
    assert edge == 64 and start == (18, 28, 38)
    start, edge = level_region((50, 60, 70), 16, 2, 2)
    assert edge == 32 and start == (34, 44, 54)


@pytest.fixture(scope="module")
def preprocessed(tiny_phantom, tmp_path_factory):
    config = make_tiny_config(tiny_phantom)
    config.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
    files = dataset_lib.list_cases(tiny_phantom)
    plan, cached = cache.ensure_preprocessed(config, files, files)
    return [cached[f.case_id] for f in files], plan


def _sampler(preprocessed, config):
    cases, plan = preprocessed
    return PyramidExampleSampler(cases, config, plan)


def test_each_batch_draws_from_different_volumes(preprocessed, tiny_config):
    tiny_config.train.batch_size = 4
    sampler = _sampler(preprocessed, tiny_config)
    for step in range(20):
        cases = sampler.cases_for_step(step)
        assert len(set(cases.tolist())) == 4


def test_crops_are_centred_on_foreground(preprocessed, tiny_config):
    tiny_config.pyramid.levels = 1
    tiny_config.data.centre_sampling = "foreground"
    # Rotation and scaling keep the centre voxel where it is; translation and elastic
    # deformation move it on purpose.
    for part in ("rotation", "scale"):
        tiny_config.augment[f"{part}_probability"] = 0.5
    tiny_config.augment.translation_probability = 0.0
    tiny_config.augment.elastic_probability = 0.0
    sampler = _sampler(preprocessed, tiny_config)
    for example in range(12):
        label = sampler(example)["label"][0]
        c = label.shape[0] // 2
        # The centre voxel's block (or one of its neighbours') contains foreground.
        assert label[c - 1 : c + 1, c - 1 : c + 1, c - 1 : c + 1, 1:].sum() > 0


def test_batches_are_deterministic_and_resumable(preprocessed, tiny_config):
    tiny_config.train.steps = 5
    sampler = _sampler(preprocessed, tiny_config)
    full = list(train_batches(sampler, tiny_config, start_step=0))
    assert len(full) == 5
    assert full[0]["image"].shape == (2, 2, 8, 8, 8, 1)
    assert full[0]["label"].shape == (2, 2, 8, 8, 8, 8)
    again = list(train_batches(_sampler(preprocessed, tiny_config), tiny_config, 0))
    resumed = list(train_batches(sampler, tiny_config, start_step=3))
    for a, b in itertools.chain(zip(full, again, strict=True), zip(full[3:], resumed, strict=True)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_processes_share_the_global_batch(preprocessed, tiny_config):
    tiny_config.train.steps = 2
    tiny_config.train.batch_size = 4
    sampler = _sampler(preprocessed, tiny_config)
    whole = list(train_batches(sampler, tiny_config, 0))
    halves = [list(train_batches(sampler, tiny_config, 0, p, 2)) for p in range(2)]
    for step in range(2):
        joined = np.concatenate([halves[0][step]["image"], halves[1][step]["image"]])
        np.testing.assert_array_equal(joined, whole[step]["image"])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(preprocessed, tiny_config):
    tiny_config.train.steps = 3
    sampler = _sampler(preprocessed, tiny_config)
    in_process = list(train_batches(sampler, tiny_config, 0))
    tiny_config.data.worker_count = 2
    with_workers = list(train_batches(sampler, tiny_config, 0))
    for a, b in zip(in_process, with_workers, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def _case_with_classes():
    label = np.zeros((40, 40, 40), np.uint8)
    label[:30] = 3  # a large organ
    label[35, 35, 35] = 1  # a single vessel voxel
    label[36:38, 0:2, 0:2] = 6
    geometry = Geometry((40, 40, 40), np.eye(4), np.eye(4), (1.0, 1.0, 1.0))
    return Case("c", np.zeros(label.shape, np.float32), label, geometry)


def test_class_balanced_centres_visit_small_structures_as_often_as_large_ones(tiny_config):
    case = prepare_case(_case_with_classes(), Plan.window(tiny_config.data, (1.0, 1.0, 1.0)), "c")
    assert sorted(case.class_voxels) == [1, 3, 6]
    rng = np.random.default_rng(0)
    draws = [case.label[crop_centre(rng, case, "class_balanced")] for _ in range(3000)]
    counts = np.bincount(draws, minlength=8)
    assert counts[0] == 0
    np.testing.assert_allclose(counts[[1, 3, 6]] / 3000, 1 / 3, atol=0.04)
    uniform = [case.label[crop_centre(rng, case, "foreground")] for _ in range(3000)]
    # Uniform over foreground voxels: the single vessel voxel is almost never the centre.
    assert np.bincount(uniform, minlength=8)[1] < 10
    assert np.bincount(uniform, minlength=8)[0] == 0


# Two worker processes start three times: slow on a busy CPU.
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_saved_pipeline_state_resumes_with_the_batches_of_an_uninterrupted_run(
    preprocessed, tiny_config, workers
):
    tiny_config.train.steps = 5
    tiny_config.data.worker_count = workers
    full = list(train_batches(_sampler(preprocessed, tiny_config), tiny_config, 0))
    first = train_batches(_sampler(preprocessed, tiny_config), tiny_config, 0)
    for _ in range(4):  # the train loop reads ahead of the step it checkpoints
        next(first)
    # Through JSON, as the checkpoint stores it.
    saved = json.loads(json.dumps(first.state_at(2)))
    assert saved["grain"] is not None and saved["next_step"] == 2
    resumed = train_batches(_sampler(preprocessed, tiny_config), tiny_config, 2, saved_state=saved)
    rest = list(resumed)
    assert len(rest) == 3
    for a, b in zip(full[2:], rest, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # It continued the saved Grain iterator rather than starting a new one at step 2.
    assert resumed.state_at(5)["first_step"] == 0


def test_class_weights_oversample_the_classes_they_favour(tiny_config):
    case = prepare_case(_case_with_classes(), Plan.window(tiny_config.data, (1.0, 1.0, 1.0)), "c")
    rng = np.random.default_rng(0)
    weights = (0, 3, 0, 1, 0, 0, 0, 0)  # vessel three times the liver, gallbladder never
    draws = [case.label[crop_centre(rng, case, "class_balanced", weights)] for _ in range(4000)]
    counts = np.bincount(draws, minlength=8)
    assert counts[6] == 0
    assert counts[1] / counts[3] == pytest.approx(3.0, rel=0.15)
