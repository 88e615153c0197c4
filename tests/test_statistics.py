"""Per-structure volume and HU of a segmentation, on the scan's own grid."""

import csv
import io
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import TOTALSEG_EXAMPLE, run_autocontext

from autocontext_jax.data.geometry import Geometry
from autocontext_jax.data.labels import class_names
from autocontext_jax.inference.statistics import statistics_csv, structure_statistics


def _geometry(affine):
    return Geometry(
        original_shape=(6, 5, 4),
        original_affine=affine,
        canonical_affine=affine,
        spacing=(1.0, 1.0, 1.0),
    )


def test_volumes_are_voxel_counts_times_the_voxel_volume_and_absent_structures_are_zero():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8)
    image = rng.normal(50, 20, size=labels.shape).astype(np.float32)
    # An oblique, sheared grid: a voxel's volume is |det| of the 3x3 part, not a product.
    affine = np.eye(4)
    affine[:3, :3] = [[0.8, 0.3, 0.0], [-0.2, 0.9, 0.0], [0.0, 0.1, 2.5]]
    names = class_names(8)
    found = structure_statistics(labels, image, _geometry(affine), names)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert list(found) == list(names[1:])
    for k, name in enumerate(names[1:], start=1):
        inside = image[labels == k].astype(np.float64)
        assert found[name]["voxels"] == inside.size
        assert found[name]["volume_ml"] == pytest.approx(inside.size * voxel_ml, rel=1e-12)
        if inside.size:
            assert found[name]["mean_hu"] == pytest.approx(inside.mean(), rel=1e-9)
            assert found[name]["std_hu"] == pytest.approx(inside.std(), rel=1e-9)
        else:
            assert found[name]["volume_ml"] == 0 and found[name]["mean_hu"] is None
    rows = list(csv.DictReader(io.StringIO(statistics_csv({"case": found}))))
    assert len(rows) == 7 and rows[-1]["volume_ml"] == "0" and rows[-1]["mean_hu"] == ""


def _check_against_files(statistics, output, scan_path, names):
    """Each structure's voxels and volume are those of the written label map on the scan."""
    labels = nib.load(output)
    values = np.asarray(labels.dataobj)
    scan = nib.load(scan_path)
    hu = scan.get_fdata()
    voxel_ml = abs(np.linalg.det(scan.affine[:3, :3])) / 1000
    assert labels.shape == scan.shape
    for k, name in enumerate(names[1:], start=1):
        count = int(np.sum(values == k))
        assert statistics[name]["voxels"] == count
        assert statistics[name]["volume_ml"] == pytest.approx(count * voxel_ml, rel=1e-8)
        if count:
            assert statistics[name]["mean_hu"] == pytest.approx(hu[values == k].mean(), rel=1e-4)


@pytest.mark.slow
def test_predict_writes_json_beside_one_output_and_one_csv_over_a_folder(
    tiny_run, tiny_phantom, tmp_path
):
    names = class_names(8)
    scans = sorted((tiny_phantom / "imagesTr").glob("*_0000.nii.gz"))[:2]
    single = tmp_path / "one" / "seg.nii.gz"
    result = run_autocontext(
        "predict", f"--workdir={tiny_run}", f"--input={scans[0]}", f"--output={single}",
        "--statistics",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "one" / "seg_statistics.json").read_text())
    assert written["case"] == "phantom_000"
    _check_against_files(written, single, scans[0], names)
    folder = tmp_path / "images"
    folder.mkdir()
    for scan in scans:
        shutil.copy(scan, folder / scan.name)
    result = run_autocontext(
        "predict", f"--workdir={tiny_run}", f"--input={folder}", f"--output={tmp_path / 'segs'}",
        "--statistics",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "segs" / "statistics.csv").open()))
    assert [row["case"] for row in rows] == ["phantom_000"] * 7 + ["phantom_001"] * 7
    for case, scan in zip(("phantom_000", "phantom_001"), scans, strict=True):
        table = {
            row["structure"]: {
                "voxels": int(row["voxels"]),
                "volume_ml": float(row["volume_ml"]),
                "mean_hu": float(row["mean_hu"]) if row["mean_hu"] else None,
            }
            for row in rows
            if row["case"] == case
        }
        _check_against_files(table, tmp_path / "segs" / f"{case}.nii.gz", scan, names)


@pytest.mark.slow
@pytest.mark.skipif(
    not TOTALSEG_EXAMPLE.is_dir(), reason=f"the real example case is not at {TOTALSEG_EXAMPLE}"
)
def test_statistics_of_the_real_example_ct_match_its_label_map(tiny_run, tmp_path):
    output = tmp_path / "seg.nii.gz"
    scan = TOTALSEG_EXAMPLE / "ct.nii.gz"
    result = run_autocontext(
        "predict", f"--workdir={tiny_run}", f"--input={scan}", f"--output={output}",
        "--statistics", "--tile_size=16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "seg_statistics.json").read_text())
    _check_against_files(written, output, scan, class_names(8))
