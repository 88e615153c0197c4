"""Reading MSD/nnU-Net datasets, and the clear errors that bad files get."""

import gzip
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.pipeline import prepare_case
from autocontext_jax.data.plan import Plan

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _write(path: pathlib.Path, array: np.ndarray, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def _dataset(
    root: pathlib.Path, image=None, label=None, affine=AFFINE, cases=("a",)
) -> pathlib.Path:
    rng = np.random.default_rng(0)
    if label is None:
        label = np.zeros((8, 6, 4), np.uint8)
        label[2:5, 2:4, 1:3] = 3
    if image is None:
        image = rng.normal(size=label.shape[:3]).astype(np.float32) * 100
    entries = []
    for case in cases:
        _write(root / "imagesTr" / f"{case}_0000.nii.gz", image, affine)
        _write(root / "labelsTr" / f"{case}.nii.gz", label)
        entries.append(
            {"image": f"./imagesTr/{case}_0000.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        )
    (root / "dataset.json").write_text(json.dumps({"training": entries}))
    return root


def test_a_valid_case_round_trips(tmp_path):
    root = _dataset(tmp_path)
    (files,) = dataset_lib.list_cases(root)
    case = dataset_lib.load_case(files, 8)
    assert files.case_id == "a"
    assert case.image.shape == (8, 6, 4) and case.image.dtype == np.float32
    assert case.label.dtype == np.uint8 and set(np.unique(case.label)) == {0, 3}
    assert case.geometry.spacing == (2.0, 2.0, 3.0)


def test_an_lps_scan_is_reoriented_to_ras(tmp_path):
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])
    label = np.zeros((8, 6, 4), np.uint8)
    label[0, 0, 0] = 1
    root = _dataset(tmp_path, label=label, affine=lps)
    # nibabel writes the label with the same affine, so both flip the same way.
    _write(root / "labelsTr" / "a.nii.gz", label, lps)
    case = dataset_lib.load_case(dataset_lib.list_cases(root)[0], 8)
    assert case.label[-1, -1, 0] == 1
    np.testing.assert_allclose(case.geometry.original_affine, lps)
    assert np.all(np.diag(case.geometry.canonical_affine)[:3] > 0)


def test_missing_dataset_json_names_the_folder(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json"):
        dataset_lib.list_cases(tmp_path)


def test_a_listed_but_missing_file_is_named(tmp_path):
    root = _dataset(tmp_path)
    (root / "labelsTr" / "a.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"a\.nii\.gz: listed in .* but missing"):
        dataset_lib.list_cases(root)


def test_duplicate_case_ids_are_refused(tmp_path):
    root = _dataset(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] *= 2
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="listed twice"):
        dataset_lib.list_cases(root)


def test_an_empty_dataset_is_refused(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DatasetError, match="no training cases"):
        dataset_lib.list_cases(tmp_path)


def test_a_truncated_file_is_named(tmp_path):
    root = _dataset(tmp_path)
    path = root / "imagesTr" / "a_0000.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DatasetError, match=r"a_0000\.nii\.gz: cannot read"):
        dataset_lib.load_case(dataset_lib.list_cases(root)[0], 8)


def test_shape_mismatch_is_named(tmp_path):
    root = _dataset(tmp_path)
    _write(root / "labelsTr" / "a.nii.gz", np.zeros((8, 6, 5), np.uint8))
    with pytest.raises(DatasetError, match="label shape"):
        dataset_lib.load_case(dataset_lib.list_cases(root)[0], 8)


def test_affine_mismatch_is_named(tmp_path):
    root = _dataset(tmp_path)
    label = np.asarray(nib.load(root / "labelsTr" / "a.nii.gz").dataobj)
    _write(root / "labelsTr" / "a.nii.gz", label, np.diag([1.0, 2.0, 3.0, 1.0]))
    with pytest.raises(DatasetError, match="affine"):
        dataset_lib.load_case(dataset_lib.list_cases(root)[0], 8)


def test_a_4d_image_is_refused(tmp_path):
    root = _dataset(tmp_path, image=np.zeros((8, 6, 4, 2), np.float32))
    with pytest.raises(DatasetError, match="expected a 3D volume"):
        dataset_lib.load_case(dataset_lib.list_cases(root)[0], 8)


def test_nan_intensities_are_refused(tmp_path):
    image = np.zeros((8, 6, 4), np.float32)
    image[1, 1, 1] = np.nan
    root = _dataset(tmp_path, image=image)
    with pytest.raises(DatasetError, match="NaN"):
        dataset_lib.load_case(dataset_lib.list_cases(root)[0], 8)


def test_label_ids_beyond_the_classes_are_named(tmp_path):
    label = np.zeros((8, 6, 4), np.uint8)
    label[0, 0, 0] = 9
    root = _dataset(tmp_path, label=label)
    with pytest.raises(DatasetError, match=r"label ids \[9\]"):
        dataset_lib.load_case(dataset_lib.list_cases(root)[0], 8)


def test_a_case_without_foreground_is_named(tmp_path, tiny_config):
    root = _dataset(tmp_path, label=np.zeros((8, 6, 4), np.uint8))
    files = dataset_lib.list_cases(root)[0]
    with pytest.raises(DatasetError, match="no foreground"):
        prepare_case(
            dataset_lib.load_case(files, 8),
            Plan.window(tiny_config.data, (2.0, 2.0, 3.0)),
            str(files.label),
        )


def test_the_split_is_seeded_and_disjoint(tmp_path):
    root = _dataset(tmp_path, cases=[f"c{i}" for i in range(6)])
    files = dataset_lib.list_cases(root)
    train, val = dataset_lib.split_cases(files, 2, seed=1)
    assert len(train) == 4 and len(val) == 2
    assert not {f.case_id for f in train} & {f.case_id for f in val}
    assert dataset_lib.split_cases(files, 2, seed=1)[1] == val
    with pytest.raises(DatasetError, match="num_val_cases"):
        dataset_lib.split_cases(files, 6, seed=1)


def test_the_folds_are_seeded_and_hold_out_every_case_exactly_once():
    ids = [f"case_{i:02d}" for i in range(13)]
    folds = dataset_lib.make_folds(ids, 5, seed=0)
    assert folds == dataset_lib.make_folds(list(reversed(ids)), 5, seed=0)  # listing order
    assert folds != dataset_lib.make_folds(ids, 5, seed=1)
    held_out = [case for fold in folds for case in fold["val"]]
    assert sorted(held_out) == ids  # every case once
    assert sorted(len(fold["val"]) for fold in folds) == [2, 2, 3, 3, 3]
    for fold in folds:
        assert sorted(fold["train"] + fold["val"]) == ids
        assert not set(fold["train"]) & set(fold["val"])
    with pytest.raises(DatasetError, match="num_folds=14: needs from 2"):
        dataset_lib.make_folds(ids, 14, seed=0)


def test_the_folds_file_is_written_once_and_a_disagreeing_one_is_refused(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    path = tmp_path / "cache" / dataset_lib.FOLDS_FILE
    written = dataset_lib.ensure_folds(path, ids, 5, seed=0)
    text = path.read_text()
    assert dataset_lib.ensure_folds(path, ids[::-1], 5, seed=0) == written
    assert path.read_text() == text  # read, not rewritten
    for num_folds, seed, cases in ((4, 0, ids), (5, 1, ids), (5, 0, ids[:9])):
        with pytest.raises(DatasetError) as refused:
            dataset_lib.ensure_folds(path, cases, num_folds, seed)
        message = str(refused.value)
        assert message.startswith(f"{path}: its folds (num_folds=5, split_seed=0, 10 cases)")
        assert "\n" not in message
    assert path.read_text() == text
