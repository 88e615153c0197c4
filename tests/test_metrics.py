"""Dice, HD95 and surface Dice on masks with known answers, and the summary files."""

import csv
import io
import json

import numpy as np
import pytest

from autocontext_jax.evaluation import metrics, reports


def _sphere(shape, spacing, radius_mm, centre=None):
    """A ball of `radius_mm` in physical space on a grid of the given spacing."""
    centre = [n // 2 for n in shape] if centre is None else centre
    grid = np.indices(shape, dtype=np.float64)
    squared = sum(((grid[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return squared <= radius_mm**2


def test_identical_masks_score_perfectly():
    mask = _sphere((20, 20, 20), (1.0, 1.0, 1.0), 6.0)
    scores = metrics.structure_metrics(mask, mask, (1.0, 1.0, 1.0), tolerance_mm=0.0)
    assert scores == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5), (1.5, 0.8, 3.0)])
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 2])
def test_hd95_of_a_shifted_sphere_is_the_shift_in_mm(spacing, axis, shift):
    shape = tuple(int(40 / s) for s in spacing)
    reference = _sphere(shape, spacing, radius_mm=12.0)
    prediction = np.roll(reference, shift, axis=axis)
    scores = metrics.structure_metrics(prediction, reference, spacing, tolerance_mm=0.1)
    assert scores["hd95"] == pytest.approx(shift * spacing[axis])
    # Surface voxels of the caps are the shift away; those on the sides are closer.
    assert 0.0 < scores["nsd"] < 1.0
    assert 0.0 < scores["dice"] < 1.0
    generous = metrics.structure_metrics(prediction, reference, spacing, shift * spacing[axis])
    assert generous["nsd"] == 1.0


def test_surface_dice_counts_the_voxels_within_the_tolerance():
    reference = np.zeros((10, 10, 10), bool)
    reference[2:8, 2:8, 2:8] = True
    prediction = np.roll(reference, 1, axis=0)
    # Of each cube's 152 surface voxels, 40 are 2 mm from the other surface: a whole face
    # (36) and the 2x2 centre of the opposite face, buried 2 voxels deep in the other cube.
    spacing = (2.0, 1.0, 1.0)
    within_one = metrics.structure_metrics(prediction, reference, spacing, tolerance_mm=1.0)
    assert within_one["nsd"] == pytest.approx((152 - 40) / 152)
    assert within_one["hd95"] == pytest.approx(2.0)
    assert within_one["dice"] == pytest.approx(5 / 6)


def test_empty_masks_follow_the_documented_conventions():
    empty = np.zeros((5, 6, 7), bool)
    organ = empty.copy()
    organ[2, 3, 3] = True
    spacing = (1.0, 2.0, 3.0)
    assert metrics.structure_metrics(empty, empty, spacing, 1.0) == {
        "dice": 1.0,
        "hd95": 0.0,
        "nsd": 1.0,
    }
    diagonal = np.sqrt((4 * 1.0) ** 2 + (5 * 2.0) ** 2 + (6 * 3.0) ** 2)
    for prediction, reference in ((empty, organ), (organ, empty)):
        scores = metrics.structure_metrics(prediction, reference, spacing, 1.0)
        assert scores == {"dice": 0.0, "hd95": pytest.approx(diagonal), "nsd": 0.0}
        assert all(np.isfinite(v) for v in scores.values())


def test_a_single_voxel_organ_is_its_own_surface():
    organ = np.zeros((5, 5, 5), bool)
    organ[0, 0, 0] = True  # at the border of the volume
    assert metrics.surface(organ).sum() == 1
    other = np.roll(organ, 3, axis=2)
    scores = metrics.structure_metrics(other, organ, (1.0, 1.0, 2.5), 1.0)
    assert scores == {"dice": 0.0, "hd95": pytest.approx(7.5), "nsd": 0.0}


def test_mismatched_inputs_are_refused():
    cube = np.zeros((2, 2, 2), bool)
    with pytest.raises(ValueError, match="shape"):
        metrics.structure_metrics(cube, np.zeros((2, 2, 3), bool), (1, 1, 1), 1)
    with pytest.raises(ValueError, match="spacing"):
        metrics.structure_metrics(cube, cube, (1, 0, 1), 1)


def test_case_metrics_lists_every_structure():
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[1:4, 1:4, 1:4] = 1
    reference[5:7, 5:7, 5:7] = 2
    prediction = reference.copy()
    prediction[prediction == 2] = 0
    scores = metrics.case_metrics(prediction, reference, 4, (1.0, 1.0, 1.0), 1.0)
    assert scores["dice"] == [1.0, 0.0, 1.0]
    assert scores["hd95"] == [0.0, pytest.approx(np.sqrt(3) * 7), 0.0]
    assert scores["nsd"] == [1.0, 0.0, 1.0]


def _result():
    return {
        "case_ids": ["a", "b"],
        "classes": ["artery", "vein"],
        "nsd_tolerance_mm": 1.5,
        "dice": {"level_1": [[0.5, 1.0], [0.7, 0.8]]},
        "hd95": {"level_1": [[4.0, 0.0], [2.0, 1.0]]},
        "nsd": {"level_1": [[0.6, 1.0], [0.8, 0.9]]},
    }


def test_reports_hold_the_summary_in_three_formats(tmp_path):
    result = _result()
    reports.write_report(tmp_path, result)
    markdown = (tmp_path / "eval_summary.md").read_text()
    assert "| Avg | 60.0 | 90.0 | 75.0 |" in markdown
    assert "| HD95 (mm) | artery | vein | Avg. |" in markdown
    assert "| Max | 4.00 | 1.00 | 2.00 |" in markdown
    assert "| NSD@1.5mm (%) | artery | vein | Avg. |" in markdown
    rows = list(csv.DictReader(io.StringIO((tmp_path / "eval_summary.csv").read_text())))
    assert len(rows) == 3 * 4
    std = next(r for r in rows if r["metric"] == "hd95" and r["statistic"] == "Std")
    assert float(std["artery"]) == pytest.approx(1.0) and float(std["Avg."]) == pytest.approx(0.25)
    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    assert summary["nsd"]["level_1"]["Min"] == pytest.approx(
        {"artery": 0.6, "vein": 0.9, "Avg.": 0.8}
    )
    assert json.loads((tmp_path / "eval_cases.json").read_text()) == result
