"""Dataset layouts, label maps, and the cached preprocessing that training and inference share."""

import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, TOTALSEG_EXAMPLE, load_config, make_tiny_config

from autocontext_jax.config.schema import ConfigError, validate_config
from autocontext_jax.data import cache, preprocess
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.geometry import preprocessed_affine
from autocontext_jax.data.labels import remap_labels
from autocontext_jax.data.nifti import read_scan, scan_from_image
from autocontext_jax.data.plan import Plan
from autocontext_jax.data.resample import resample_labels
from autocontext_jax.evaluation.evaluate import evaluate_cases
from autocontext_jax.inference import Run
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.init import init_variables


def _volume(shape=(20, 16, 12), seed=0):
    """A smooth image with a large organ (3) and a vessel two voxels wide (1)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    image = (x * 10.0 + y * 3.0 - z * 2.0 + rng.normal(size=shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[4:12, 3:10, 2:9] = 3
    label[14:16, 2:14, 6:8] = 1
    return image, label


def _write_case(root, case, image, label, affine, label_affine=None):
    for folder, name, array, aff in (
        ("imagesTr", f"{case}_0000.nii.gz", image, affine),
        ("labelsTr", f"{case}.nii.gz", label, affine if label_affine is None else label_affine),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, aff), root / folder / name)


def _msd(root, cases):
    image, label = _volume()
    for case in cases:
        _write_case(root, case, image, label, np.diag([2.0, 2.0, 3.0, 1.0]))
    entries = [
        {"image": f"imagesTr/{c}_0000.nii.gz", "label": f"labelsTr/{c}.nii.gz"} for c in cases
    ]
    (root / "dataset.json").write_text(json.dumps({"training": entries}))
    return root


def _config(root, tmp_path):
    config = make_tiny_config(root)
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.preprocess_workers = 0
    return config


def _lps_twin(image, affine):
    """The same scan stored with its first two axes reversed (LPS), as scanners write it."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = image.shape[0] - 1, image.shape[1] - 1
    return image[::-1, ::-1].copy(), affine @ flip


def _rotation(degrees):
    t = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rotation


def test_an_nnunet_v2_dataset_is_found_without_a_training_list(tmp_path):
    image, label = _volume()
    for case in ("b", "a"):
        _write_case(tmp_path, case, image, label, np.eye(4))
    meta = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 2}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    files = dataset_lib.list_cases(tmp_path)
    assert [f.case_id for f in files] == ["a", "b"]
    assert files[0].label == tmp_path / "labelsTr" / "a.nii.gz"
    meta["numTraining"] = 3
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="numTraining is 3"):
        dataset_lib.list_cases(tmp_path)


def test_plain_pairs_are_named_by_their_image_and_checked(tmp_path):
    _msd(tmp_path, ["a"])
    pairs = (("imagesTr/a_0000.nii.gz", "labelsTr/a.nii.gz"),)
    (files,) = dataset_lib.list_pairs(pairs, tmp_path)
    assert files.case_id == "a" and files.image.is_file()
    with pytest.raises(DatasetError, match="listed twice"):
        dataset_lib.list_pairs(pairs * 2, tmp_path)
    with pytest.raises(DatasetError, match=r"nope\.nii\.gz: listed in config\.data\.pairs"):
        dataset_lib.list_pairs((("nope.nii.gz", "labelsTr/a.nii.gz"),), tmp_path)


def test_the_label_map_remaps_ids_and_unmapped_ones_become_background():
    raw = np.array([0, 52, 5, 99, 7], np.uint8)
    mapped = remap_labels(raw, 8, ((52, 1), (5, 3), (7, 7)), "lab.nii.gz")
    np.testing.assert_array_equal(mapped, [0, 1, 3, 0, 7])
    with pytest.raises(DatasetError, match=r"lab\.nii\.gz: label ids \[99\] are not in"):
        remap_labels(raw, 8, ((52, 1), (5, 3), (7, 7)), "lab.nii.gz", "error")
    with pytest.raises(DatasetError, match=r"lab\.nii\.gz: label ids \[52, 99\] outside"):
        remap_labels(raw, 8, (), "lab.nii.gz")


@pytest.mark.parametrize("twin", ["lps", "oblique"])
def test_a_twin_scan_preprocesses_to_the_same_canonical_array_as_ras(twin):
    image, _ = _volume()
    ras = np.diag([1.5, 1.5, 2.5, 1.0])
    ras[:3, 3] = [-10.0, 20.0, 5.0]
    if twin == "lps":
        other_image, other_affine = _lps_twin(image, ras)
    else:
        # A few degrees of gantry tilt: the closest canonical axes are unchanged.
        other_image, other_affine = _lps_twin(image, _rotation(7.0) @ ras)
    plan = Plan((2.0, 2.0, 2.0), (-50.0, 200.0), 40.0, 50.0, -1000.0)
    expected, geometry = preprocess.preprocess_scan(
        scan_from_image(nib.Nifti1Image(image, ras)), plan
    )
    got, other_geometry = preprocess.preprocess_scan(
        scan_from_image(nib.Nifti1Image(other_image, other_affine)), plan
    )
    assert expected.shape == (15, 12, 15) == geometry.preprocessed_shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert other_geometry.canonical_shape == geometry.canonical_shape


def test_labels_return_exactly_to_the_original_grid():
    _, label = _volume()
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])
    plan = Plan((2.0, 2.0, 3.0), (-1000.0, 1000.0), 0.0, 1.0, -1000.0)
    nifti = nib.Nifti1Image(label.astype(np.float32), lps)
    _, geometry = preprocess.preprocess_scan(scan_from_image(nifti), plan)
    canonical = np.asarray(nib.as_closest_canonical(nifti).dataobj).astype(np.uint8)
    back = preprocess.labels_to_original(canonical, geometry)
    np.testing.assert_array_equal(back, label)
    with pytest.raises(ValueError, match="not on the preprocessed grid"):
        preprocess.labels_to_original(canonical[1:], geometry)


def test_resampling_keeps_a_thin_vessel_continuous_and_inverts_closely():
    image, label = _volume()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    plan = Plan((1.6, 1.6, 1.6), (-1000.0, 1000.0), 0.0, 1.0, -1000.0)
    _, geometry = preprocess.preprocess_scan(scan_from_image(nib.Nifti1Image(image, affine)), plan)
    coarse = resample_labels(label, geometry.preprocessed_shape, "linear_argmax")
    assert set(np.unique(coarse)) == {0, 1, 3}
    # Wider than the new voxel (1.6 mm) by a little: no gap along its length.
    ys = np.nonzero((coarse == 1).any(axis=(0, 2)))[0]
    np.testing.assert_array_equal(ys, np.arange(ys[0], ys[-1] + 1))
    assert len(ys) >= 7
    back = preprocess.labels_to_original(coarse, geometry)
    assert back.shape == label.shape
    assert np.mean(back == label) > 0.97
    # The grid's affine maps its centre onto the centre of the scan.
    centre = preprocessed_affine(geometry) @ [*((n - 1) / 2 for n in coarse.shape), 1]
    np.testing.assert_allclose(centre[:3], [(n - 1) / 2 for n in label.shape], atol=1e-9)


def test_the_cache_is_written_once_and_redone_when_an_input_changes(tmp_path):
    root = _msd(tmp_path / "data", ["a", "b"])
    config = _config(root, tmp_path)
    files = dataset_lib.list_cases(root)
    plan, cached = cache.ensure_preprocessed(config, files, files)
    image, label = cache.load_cached(cached["a"])
    assert isinstance(image, np.memmap) and image.dtype == np.float32 and label.dtype == np.uint8
    np.testing.assert_allclose(image, plan.normalize(_volume()[0]), rtol=1e-6)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert not [name for name in stamps if name.endswith(".tmp")]
    cache.ensure_preprocessed(config, files, files)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    # A changed label file, and a case whose JSON a crash never wrote, are redone.
    new_label = _volume()[1]
    new_label[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(new_label, np.diag([2.0, 2.0, 3.0, 1.0])), files[0].label)
    cached["b"].meta.unlink()
    cache.ensure_preprocessed(config, files, files)
    assert cache.load_cached(cached["a"])[1][0, 0, 0] == 3
    assert cached["b"].meta.is_file()
    geometry = cache.read_geometry(cached["b"])
    assert geometry.spacing == (2.0, 2.0, 3.0) and geometry.preprocessed_shape == (20, 16, 12)


def test_foreground_zscore_statistics_are_stored_with_the_cache(tmp_path):
    root = _msd(tmp_path / "data", ["a"])
    config = _config(root, tmp_path)
    config.data.normalization = "foreground_zscore"
    files = dataset_lib.list_cases(root)
    plan, _ = cache.ensure_preprocessed(config, files, files)
    image, label = _volume()
    foreground = image[label > 0]
    assert plan.mean == pytest.approx(foreground.mean(), rel=1e-5)
    assert plan.clip[0] == pytest.approx(np.percentile(foreground, 0.5), rel=1e-4)
    saved = json.loads((tmp_path / "cache" / "plan.json").read_text())["plan"]
    assert Plan.from_json(saved) == plan


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_case_stops_preprocessing_or_is_skipped_with_a_warning(tmp_path, workers):
    root = _msd(tmp_path / "data", ["a", "b"])
    bad = root / "labelsTr" / "b.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 16, 12), np.uint8), np.diag([2.0, 2.0, 3.0, 1.0])), bad)
    config = _config(root, tmp_path)
    # In worker processes too, the error reaches the caller with the file's name.
    config.data.preprocess_workers = workers
    files = dataset_lib.list_cases(root)
    with pytest.raises(DatasetError, match=r"b\.nii\.gz: the label map has no foreground"):
        cache.ensure_preprocessed(config, files, files[:1])
    config.data.skip_bad_cases = True
    with pytest.warns(UserWarning, match=r"case b: .*b\.nii\.gz"):
        _, cached = cache.ensure_preprocessed(config, files, files[:1])
    assert sorted(cached) == ["a"]


def test_an_unreadable_training_scan_is_named_or_skipped_while_planning(tmp_path):
    root = _msd(tmp_path / "data", ["a", "b"])
    (root / "imagesTr" / "b_0000.nii.gz").write_bytes(b"not a nifti file")
    config = _config(root, tmp_path)
    files = dataset_lib.list_cases(root)
    with pytest.raises(DatasetError, match=r"b_0000\.nii\.gz: cannot read as NIfTI"):
        cache.ensure_preprocessed(config, files, files)
    config.data.skip_bad_cases = True
    with pytest.warns(UserWarning, match=r"case b: .*b_0000\.nii\.gz: cannot read"):
        plan, cached = cache.ensure_preprocessed(config, files, files)
    assert sorted(cached) == ["a"] and plan.target_spacing == (2.0, 2.0, 3.0)


def test_label_ids_outside_the_label_map_are_named_when_strict(tmp_path):
    root = _msd(tmp_path / "data", ["a"])
    config = _config(root, tmp_path)
    config.data.label_map = ((3, 2),)
    config.data.unmapped_labels = "error"
    files = dataset_lib.list_cases(root)
    with pytest.raises(DatasetError, match=r"a\.nii\.gz: label ids \[1\] are not in"):
        cache.ensure_preprocessed(config, files, files)


@pytest.mark.skipif(
    not TOTALSEG_EXAMPLE.is_dir(), reason="the shared TotalSegmentator example is absent"
)
def test_the_totalsegmentator_example_is_remapped_to_the_paper_classes(tmp_path):
    config = load_config("totalseg_example")
    validate_config(config, 1)
    config.data.cache_dir = str(tmp_path / "cache")
    files = dataset_lib.list_dataset(config.data)
    plan, cached = cache.ensure_preprocessed(config, files, files)
    _, label = cache.load_cached(cached["ct"])
    counts = np.bincount(np.asarray(label).ravel(), minlength=8)
    # The README's voxel counts; the grid is unchanged at the median (own) spacing.
    np.testing.assert_array_equal(counts[1:], [997, 901, 38634, 9452, 4675, 1333, 644])
    assert plan.target_spacing == (3.0, 3.0, 3.0)


@pytest.mark.slow
@pytest.mark.skipif(
    not TOTALSEG_EXAMPLE.is_dir(), reason="the shared TotalSegmentator example is absent"
)
def test_the_totalsegmentator_example_preprocesses_and_trains_from_the_command_line(tmp_path):
    config = str(REPO / "configs" / "totalseg_example.py")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "autocontext_jax", "preprocess", "--config", config],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "1 of 1 cases preprocessed" in done.stdout
    assert (tmp_path / "data" / "totalseg_example_preprocessed" / "ct.label.npy").is_file()
    command = [sys.executable, "-m", "autocontext_jax.main", "--config", config]
    command += ["--workdir", "run", "--config.train.steps=2", "--config.train.log_every=1"]
    command += ["--config.train.warmup_steps=1"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert all(np.isfinite(json.loads(line)["loss"]) for line in lines)


@pytest.mark.slow
def test_evaluation_predicts_on_the_plan_grid_and_scores_on_the_scan_grid(tmp_path):
    root = _msd(tmp_path / "data", ["a"])
    config = _config(root, tmp_path)
    # Coarser than the scan (2, 2, 3 mm), so prediction runs on a smaller grid.
    config.data.target_spacing = (4.0, 4.0, 4.0)
    files = dataset_lib.list_cases(root)
    plan, _ = cache.ensure_preprocessed(config, files, files)
    model = build_pyramid(config)
    run = Run(tmp_path, config, model, init_variables(model, 0), 0, plan)
    result = evaluate_cases(run, files)
    scores = np.asarray(result["dice"]["level_2"])
    assert scores.shape == (1, 7) and np.all((scores >= 0) & (scores <= 1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("normalization", "percentile"),
        ("label_interpolation", "cubic"),
        ("image_interpolation_order", 2),
        ("unmapped_labels", "ignore"),
        ("target_spacing", (1.0, 0.0, 1.0)),
        ("label_map", ((52, 8),)),
        ("class_sampling_weights", (1.0, 2.0)),
    ],
)
def test_bad_data_fields_are_refused_by_name(field, value):
    config = make_tiny_config()
    config.data[field] = value
    with pytest.raises(ConfigError, match=f"config.data.{field}="):
        validate_config(config, 1)


def test_a_header_claiming_huge_voxels_is_named_before_resampling(tmp_path):
    path = tmp_path / "ct.nii.gz"
    # 32 voxels of 50 mm per axis at the plan's 1 mm: 1600^3 voxels, 16 GiB as float32.
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.diag([50.0] * 3 + [1])), path)
    plan = Plan((1.0, 1.0, 1.0), (-1000.0, 1000.0), 0.0, 1.0, -1000.0)
    scan = read_scan(path)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: .* over the limit"):
        preprocess.preprocess_scan(scan, plan)
    with pytest.raises(DatasetError, match=re.escape(str(path))):
        preprocess.planned_grid(scan, plan)
