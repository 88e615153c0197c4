"""The synthetic abdominal CT phantom: dataset layout, NIfTI files, labels and vessel thinness."""

import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from autocontext_jax import phantom
from autocontext_jax.data.labels import PAPER_CLASS_NAMES
from autocontext_jax.data.sampling import class_fractions
from autocontext_jax.evaluation.evaluate import dice_per_class

SHAPE = (64, 56, 48)
SPACING = (3.0, 3.0, 3.0)
NUM_CASES = 3
SEED = 5
ARTERY, PORTAL, LIVER = (PAPER_CLASS_NAMES.index(n) for n in ("artery", "portal_vein", "liver"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    """A small phantom dataset written with one worker."""
    out = tmp_path_factory.mktemp("phantom")
    path = phantom.write_phantom_dataset(out, NUM_CASES, seed=SEED, shape=SHAPE, spacing=SPACING)
    assert path == out / "dataset.json"
    return out


@pytest.fixture(scope="module")
def full_case() -> tuple[np.ndarray, np.ndarray]:
    """One case at the default 1.5 mm grid, where vessel sizes can be measured."""
    return phantom.generate_case(np.random.default_rng([0, 0]))


def _load(path: pathlib.Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    img = nib.load(path)
    return img, np.asarray(img.dataobj)


def _oracle(label: np.ndarray, factor: int) -> np.ndarray:
    """Majority class of each factor^3 block, repeated back to the input grid."""
    winner = class_fractions(label, factor, len(PAPER_CLASS_NAMES)).argmax(-1)
    return winner.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)


def _dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    return float(dice_per_class(a, b, len(PAPER_CLASS_NAMES))[c - 1])


def test_layout_and_dataset_json(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    names = [f"phantom_{i:03d}" for i in range(NUM_CASES)]
    assert meta["training"] == [
        {"image": f"./imagesTr/{n}_0000.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names
    ]
    assert meta["numTraining"] == NUM_CASES
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "CT"} and meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {name: i for i, name in enumerate(PAPER_CLASS_NAMES)}
    assert meta["file_ending"] == ".nii.gz"
    assert meta["name"] and meta["description"]
    for entry in meta["training"]:
        assert (dataset / entry["image"]).is_file() and (dataset / entry["label"]).is_file()
    # Atomic writes leave no temporary files behind.
    files = sorted(p.name for p in dataset.rglob("*") if p.is_file())
    assert len(files) == 2 * NUM_CASES + 1 and not any(f.startswith(".") for f in files)


def test_nifti_files_round_trip(dataset):
    for i in range(NUM_CASES):
        img, image = _load(dataset / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz")
        lab, label = _load(dataset / "labelsTr" / f"phantom_{i:03d}.nii.gz")
        assert image.shape == label.shape == SHAPE
        assert img.get_data_dtype() == np.int16 and image.dtype == np.int16
        assert lab.get_data_dtype() == np.uint8 and label.dtype == np.uint8
        for nifti in (img, lab):
            np.testing.assert_allclose(nifti.affine, img.affine)
            # LAS+, diagonal: voxel x runs to the patient's left.
            steps = np.array([-1.0, 1.0, 1.0]) * SPACING
            assert np.count_nonzero(nifti.affine[:3, :3] - np.diag(steps)) == 0
            assert nib.aff2axcodes(nifti.affine) == ("L", "A", "S")
            assert abs(nifti.affine[:3, 3] + (np.array(SHAPE) - 1) / 2 * steps).max() <= 30.0
            assert int(nifti.header["qform_code"]) == 1 and int(nifti.header["sform_code"]) == 1
            np.testing.assert_allclose(nifti.get_qform(), nifti.affine, atol=1e-4)
            assert nifti.header.get_xyzt_units()[0] == "mm"
        # Hounsfield-like: air outside the body, soft tissue, contrast and bone inside.
        assert image.min() >= -1024 and np.median(image[label == LIVER]) > 80
        assert np.percentile(image, 1) < -900 and image.max() > 400


def test_every_case_has_all_classes(dataset):
    for i in range(NUM_CASES):
        _, label = _load(dataset / "labelsTr" / f"phantom_{i:03d}.nii.gz")
        counts = np.bincount(label.ravel(), minlength=len(PAPER_CLASS_NAMES))
        assert len(counts) == len(PAPER_CLASS_NAMES) and counts.min() >= 10, counts


def test_generation_is_deterministic():
    a = phantom.generate_case(np.random.default_rng([SEED, 1]), SHAPE, SPACING)
    b = phantom.generate_case(np.random.default_rng([SEED, 1]), SHAPE, SPACING)
    c = phantom.generate_case(np.random.default_rng([SEED, 2]), SHAPE, SPACING)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])


def test_cases_do_not_depend_on_workers(dataset, tmp_path):
    phantom.write_phantom_dataset(tmp_path, 2, seed=SEED, shape=SHAPE, spacing=SPACING, workers=2)
    for i in range(2):
        for rel in (f"imagesTr/phantom_{i:03d}_0000.nii.gz", f"labelsTr/phantom_{i:03d}.nii.gz"):
            one, a = _load(dataset / rel)
            two, b = _load(tmp_path / rel)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(one.affine, two.affine)


def test_spacing_changes_sampling_not_anatomy(full_case):
    # The same draw at 3 mm is the 1.5 mm anatomy, sampled coarser.
    _, fine = full_case
    _, coarse = phantom.generate_case(np.random.default_rng([0, 0]), SHAPE, SPACING)
    down = _oracle(fine, 2)[::2, ::2, ::2]
    for c in range(1, len(PAPER_CLASS_NAMES)):
        assert _dice(down, coarse, c) > 0.8, PAPER_CLASS_NAMES[c]


def test_vessels_are_thin_tubes(full_case):
    _, label = full_case
    spacing = phantom.DEFAULT_SPACING
    for c in (ARTERY, PORTAL):
        inside = ndimage.distance_transform_edt(label == c, sampling=spacing)[label == c]
        assert np.percentile(inside, 90) < 5.0, PAPER_CLASS_NAMES[c]
    assert ndimage.distance_transform_edt(label == LIVER, sampling=spacing).max() > 15.0


def test_coarse_resolution_loses_the_vessels(full_case):
    _, label = full_case
    x2, x4 = _oracle(label, 2), _oracle(label, 4)
    vessels4 = [_dice(x4, label, c) for c in (ARTERY, PORTAL)]
    assert np.mean(vessels4) < 0.7 and max(vessels4) < 0.75, vessels4
    for c, d4 in zip((ARTERY, PORTAL), vessels4, strict=True):
        assert _dice(x2, label, c) > d4 + 0.1
    assert _dice(x4, label, LIVER) > 0.9


def test_cli_writes_a_default_case(tmp_path):
    command = [sys.executable, "-m", "autocontext_jax", "phantom", "--out", str(tmp_path)]
    done = subprocess.run([*command, "--num_cases", "1", "--seed", "3"], capture_output=True)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["numTraining"] == 1
    img, _ = _load(tmp_path / "imagesTr" / "phantom_000_0000.nii.gz")
    assert img.shape == phantom.DEFAULT_SHAPE
    np.testing.assert_allclose(img.header.get_zooms(), phantom.DEFAULT_SPACING)


def test_the_liver_is_on_the_patients_right_and_the_spleen_on_the_left(dataset):
    liver, spleen = PAPER_CLASS_NAMES.index("liver"), PAPER_CLASS_NAMES.index("spleen")
    for i in range(NUM_CASES):
        lab, label = _load(dataset / "labelsTr" / f"phantom_{i:03d}.nii.gz")

        def world_x(class_id, label=label, affine=lab.affine):
            centre = np.argwhere(label == class_id).mean(axis=0)
            return (affine @ [*centre, 1.0])[0]

        # NIfTI world coordinates are RAS+: x grows towards the patient's right.
        assert world_x(liver) > world_x(spleen)
