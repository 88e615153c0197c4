"""Reading NIfTI: a scan whose affine is unusable is one line naming it, in every command."""

import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, assert_one_line_error, run_autocontext

from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.nifti import read_scan

BAD_AFFINES = {
    "singular": (np.diag([1.0, 1.0, 0.0, 1.0]), "is singular"),
    "non-finite": (
        np.array([[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
        "holds NaN or infinite values",
    ),
}


def _with_affine(source, target, affine):
    """A copy of the NIfTI `source` whose sform (the only transform) is `affine`."""
    image = nib.load(source)
    header = image.header.copy()
    header.set_qform(None, code=0)
    header["sform_code"] = 2
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    # No affine given: nibabel keeps the header's sform as it is, however bad.
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, header=header), target)
    return target


@pytest.mark.parametrize("kind", list(BAD_AFFINES))
def test_a_bad_affine_is_a_dataset_error_naming_the_file(tiny_phantom, tmp_path, kind):
    affine, expected = BAD_AFFINES[kind]
    scan = sorted((tiny_phantom / "imagesTr").glob("*.nii.gz"))[0]
    bad = _with_affine(scan, tmp_path / "bad_0000.nii.gz", affine)
    with pytest.raises(DatasetError, match=f"{bad}: its affine .* {expected}"):
        read_scan(bad)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD_AFFINES))
def test_every_command_that_reads_scans_names_a_bad_affine_in_one_line(
    tiny_run, tiny_phantom, tmp_path, kind
):
    affine, expected = BAD_AFFINES[kind]
    images = sorted((tiny_phantom / "imagesTr").glob("*.nii.gz"))
    bad = _with_affine(images[0], tmp_path / "bad_0000.nii.gz", affine)
    result = run_autocontext(
        "predict", f"--workdir={tiny_run}", f"--input={bad}", f"--output={tmp_path / 's.nii.gz'}"
    )
    assert_one_line_error(result, f"Bad input: {bad}: its affine")
    assert expected in result.stderr
    # Training's planning and preprocessing: a dataset with one such case.
    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    broken = data / "imagesTr" / images[0].name
    _with_affine(images[0], broken, affine)
    result = run_autocontext(
        "preprocess", f"--config={REPO / 'configs' / 'default.py'}",
        f"--config.data.dir={data}", "--config.data.phantom_cases=0",
        f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.num_val_cases=1",
    )  # fmt: skip
    assert_one_line_error(result, f"{broken}: its affine")
    # evaluate: a prediction with such an affine.
    predictions, labels = tmp_path / "predictions", tmp_path / "labels"
    predictions.mkdir()
    labels.mkdir()
    reference = tiny_phantom / "labelsTr" / "phantom_000.nii.gz"
    shutil.copy(reference, labels / "phantom_000.nii.gz")
    _with_affine(reference, predictions / "phantom_000.nii.gz", affine)
    result = run_autocontext("evaluate", f"--predictions={predictions}", f"--labels={labels}")
    assert_one_line_error(result, f"{predictions / 'phantom_000.nii.gz'}: its affine")
