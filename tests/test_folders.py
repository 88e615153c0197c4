"""Folders of label maps against references: partial references, unmatched cases, messages."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import assert_one_line_error, run_autocontext

from autocontext_jax.data.errors import DatasetError
from autocontext_jax.evaluation.folders import evaluate_folders, summary_document
from autocontext_jax.evaluation.reports import summary_markdown

LABELLED = ["artery", "portal_vein", "liver"]  # classes 1-3; the references lack 4-7


def _folders(tiny_phantom, root, cases=2, keep=3):
    """predictions/ (the phantom's labels) and labels/ (the same, classes > `keep` erased)."""
    predictions, labels = root / "predictions", root / "labels"
    predictions.mkdir()
    labels.mkdir()
    for path in sorted((tiny_phantom / "labelsTr").glob("*.nii.gz"))[:cases]:
        image = nib.load(path)
        ids = np.asarray(image.dataobj).astype(np.uint8)
        # A prediction that differs from its reference a little in every structure.
        predicted = ids.copy()
        predicted[::2, ::3, ::2] = 0
        nib.save(nib.Nifti1Image(predicted, image.affine), predictions / path.name)
        partial = np.where(ids <= keep, ids, 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(partial, image.affine), labels / path.name)
    return predictions, labels


def test_structures_no_reference_holds_are_not_labelled_and_left_out_of_averages(
    tiny_phantom, tmp_path
):
    predictions, labels = _folders(tiny_phantom, tmp_path)
    result = evaluate_folders(predictions, labels, num_classes=8)
    assert result["not_labelled"] == ["spleen", "stomach", "gallbladder", "pancreas"]
    document = summary_document(result)
    assert document["not_labelled"] == result["not_labelled"]
    for case in document["cases"].values():
        assert case["dice"]["spleen"] is None and case["dice"]["liver"] is not None
    dice = np.asarray(result["dice"]["final_level"])[:, :3]  # the labelled classes
    assert document["mean"]["dice"]["Avg."] == pytest.approx(dice.mean(axis=1).mean())
    assert document["mean"]["dice"]["pancreas"] is None
    assert json.loads(json.dumps(document, allow_nan=False)) == document  # valid JSON
    table = summary_markdown(result)
    assert "| Avg | " in table and " - |" in table
    assert "Not labelled in the references (shown as -, left out of every average): " in table
    # Told which structures the references label: the others are not labelled.
    result = evaluate_folders(predictions, labels, num_classes=8, labelled=["liver"])
    assert result["not_labelled"] == [c for c in result["classes"] if c != "liver"]
    # A dataset.json beside the labels that lists only some structures says the same.
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "3": "liver"}}))
    output = tmp_path / "summary.json"
    result = run_autocontext(
        "evaluate", f"--predictions={predictions}", f"--labels={labels}", f"--summary={output}"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text())["not_labelled"] == [
        "artery", "portal_vein", "spleen", "stomach", "gallbladder", "pancreas"
    ]  # fmt: skip
    result = run_autocontext(
        "evaluate", f"--predictions={predictions}", f"--labels={labels}",
        f"--summary={output}", "--classes=liver,artery",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "artery" not in json.loads(output.read_text())["not_labelled"]


def test_unmatched_cases_are_one_warning_line_and_an_error_with_strict(tiny_phantom, tmp_path):
    predictions, labels = _folders(tiny_phantom, tmp_path, cases=3)
    (predictions / "phantom_000.nii.gz").unlink()
    shutil.move(labels / "phantom_002.nii.gz", tmp_path / "away.nii.gz")
    output = tmp_path / "summary.json"
    args = [f"--predictions={predictions}", f"--labels={labels}", f"--summary={output}"]
    result = run_autocontext("evaluate", *args)
    assert result.returncode == 0, result.stderr
    [warning] = result.stderr.splitlines()
    assert warning == (
        "Warning: 1 predicted cases have no reference, not scored: ['phantom_002']; "
        "1 references have no prediction, not scored: ['phantom_000']"
    )
    assert list(json.loads(output.read_text())["cases"]) == ["phantom_001"]
    output.unlink()
    result = run_autocontext("evaluate", *args, "--strict")
    assert_one_line_error(result, "Bad input: ")
    assert "(--strict)" in result.stderr and not output.exists()


def test_a_prediction_off_the_references_grid_is_named_as_the_prediction(tiny_phantom, tmp_path):
    predictions, labels = _folders(tiny_phantom, tmp_path, cases=1)
    [path] = predictions.iterdir()
    image = nib.load(path)
    smaller = np.asarray(image.dataobj)[:-2]
    nib.save(nib.Nifti1Image(smaller, image.affine), path)
    with pytest.raises(DatasetError, match=f"differs from the shape .* of the prediction {path}"):
        evaluate_folders(predictions, labels, num_classes=8)
