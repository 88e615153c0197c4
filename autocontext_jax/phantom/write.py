"""Writing a phantom dataset: NIfTI cases in the MSD / nnU-Net layout and its dataset.json."""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib

import nibabel as nib
import numpy as np

from autocontext_jax.data.atomic import write_atomically, write_text_atomically
from autocontext_jax.data.labels import PAPER_CLASS_NAMES
from autocontext_jax.phantom.generate import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    _case_affine,
    generate_case,
)


def _nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI-1 image with scanner qform/sform and mm units."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _case_name(index: int) -> str:
    """Case identifier, e.g. phantom_007."""
    return f"phantom_{index:03d}"


def _write_case(
    args: tuple[str, int, int, tuple[int, int, int], tuple[float, float, float]],
) -> None:
    """Generate and write case `index` (top level so a spawn pool can pickle it)."""
    out_dir, seed, index, shape, spacing = args
    rng = np.random.default_rng([seed, index])
    image, label = generate_case(rng, shape, spacing)
    affine = _case_affine(rng, shape, spacing)
    out = pathlib.Path(out_dir)
    name = _case_name(index)
    for array, path in (
        (image, out / "imagesTr" / f"{name}_0000.nii.gz"),
        (label, out / "labelsTr" / f"{name}.nii.gz"),
    ):
        img = _nifti(array, affine)
        write_atomically(path, lambda tmp, img=img: nib.save(img, tmp))


def _dataset_json(num_cases: int) -> dict[str, object]:
    """dataset.json content with both MSD and nnU-Net v2 keys."""
    names = [_case_name(i) for i in range(num_cases)]
    return {
        "name": "AbdomenPhantom",
        "description": "Synthetic abdominal CT phantom (autocontext_jax.phantom)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "channel_names": {"0": "CT"},
        "labels": {name: i for i, name in enumerate(PAPER_CLASS_NAMES)},
        "numTraining": num_cases,
        "numTest": 0,
        "file_ending": ".nii.gz",
        "training": [
            {"image": f"./imagesTr/{n}_0000.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
            for n in names
        ],
        "test": [],
    }


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    num_cases: int,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    workers: int = 1,
) -> pathlib.Path:
    """Write `num_cases` phantom cases (MSD/nnU-Net layout) under out_dir; return dataset.json."""
    out = pathlib.Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    jobs = [(str(out), int(seed), i, shape, spacing) for i in range(num_cases)]
    if workers > 1 and num_cases > 1:
        # Spawn, not fork: the caller may already run JAX threads, which fork would corrupt.
        with multiprocessing.get_context("spawn").Pool(min(workers, num_cases)) as pool:
            pool.map(_write_case, jobs, chunksize=1)
    else:
        for job in jobs:
            _write_case(job)
    path = out / "dataset.json"
    write_text_atomically(path, json.dumps(_dataset_json(num_cases), indent=2) + "\n")
    return path
