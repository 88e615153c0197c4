"""`autocontext check`: the offline self-test of an installation."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import run_autocontext

from autocontext_jax.cli.check import CheckError, same_header


def _scan(path, affine):
    rng = np.random.default_rng(0)
    data = rng.normal(0, 50, (20, 24, 16)).astype(np.int16)
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    nib.save(image, path)


def test_same_header_names_what_differs(tmp_path):
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])
    _scan(tmp_path / "a.nii.gz", affine)
    same_header(tmp_path / "a.nii.gz", tmp_path / "a.nii.gz")
    shifted = affine.copy()
    shifted[0, 3] = 2.0
    _scan(tmp_path / "b.nii.gz", shifted)
    with pytest.raises(CheckError, match="b.nii.gz: affine differs"):
        same_header(tmp_path / "b.nii.gz", tmp_path / "a.nii.gz")


@pytest.mark.slow
def test_check_passes_every_step_and_segments_the_users_scan(tmp_path):
    scan = tmp_path / "mine.nii.gz"
    _scan(scan, np.array([[0, 0, 3.0, -20], [-1.5, 0, 0, 10], [0, 1.5, 0, 5], [0, 0, 0, 1]]))
    command = [sys.executable, "-m", "autocontext_jax", "check", "--scan", str(scan)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line for line in result.stdout.splitlines() if line[:4] in ("PASS", "FAIL")]
    names = [line.split(":")[0].split(maxsplit=1)[1] for line in steps]
    assert names == ["phantom", "train", "load", "predict", "orientation", "your scan"]
    assert all(line.startswith("PASS") for line in steps)
    assert "All checks passed" in result.stdout


def test_check_refuses_a_missing_scan_in_one_line(tmp_path):
    result = run_autocontext("check", "--scan", str(tmp_path / "x"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"--scan: {tmp_path / 'x'}: no such file"
