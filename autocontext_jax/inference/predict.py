"""Files in, files out: scans segmented with a run and written in their own geometry.

    for result in predict_paths(load_run("runs/default"), "scans/", "segs/"):
        print(result.output, result.seconds)

A scan is read once into voxels and a `Geometry`; the same geometry writes its label
map (and the optional per-level maps and probabilities), so every output overlays its
input in any viewer. Every path is checked before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Iterator

import tqdm

from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.nifti import (
    case_name,
    is_nifti_name,
    read_scan,
    write_label_map,
    write_probabilities,
)
from autocontext_jax.inference.run import Run
from autocontext_jax.inference.segment import Segmentation, segment, tiles_of
from autocontext_jax.inference.tiling import TilingOptions


@dataclasses.dataclass(frozen=True)
class PredictedFile:
    """What predicting one scan did: where it went, how long it took, and the labels."""

    case: str
    input: pathlib.Path
    output: pathlib.Path
    segmentation: Segmentation
    seconds: float


def side_output(output: pathlib.Path, tag: str, suffix: str = ".nii.gz") -> pathlib.Path:
    """OUTPUT_NAME_TAG.SUFFIX beside the main output."""
    return output.with_name(f"{case_name(output)}_{tag}{suffix}")


def check_writable(path: pathlib.Path) -> None:
    """Fail before the work when `path` cannot be written (not NIfTI, folder not writable)."""
    if not is_nifti_name(path):
        raise DatasetError(f"{path}: the output name must end in .nii or .nii.gz")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise DatasetError(f"{path}: cannot write there ({folder} is not a writable folder)")


def predict_file(
    run: Run,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: TilingOptions,
    save_probabilities: bool = False,
    save_levels: bool = False,
    show_progress: bool = False,
) -> PredictedFile:
    """Segment one scan and write OUTPUT (and the optional extras) in the scan's geometry."""
    input_path, output_path = pathlib.Path(input_path), pathlib.Path(output_path)
    check_writable(output_path)
    start = time.perf_counter()
    scan = read_scan(input_path)
    with tqdm.tqdm(
        total=tiles_of(run, scan, options),
        desc="tiles",
        unit="tile",
        leave=False,
        disable=not show_progress,
    ) as bar:
        result = segment(
            run,
            scan,
            options,
            all_levels=save_levels,
            probabilities=save_probabilities,
            progress=bar.update,
        )
    del scan
    write_label_map(result.finest, result.geometry, output_path)
    if save_levels:
        for level, labels in enumerate(result.levels[:-1], start=1):
            write_label_map(labels, result.geometry, side_output(output_path, f"level{level}"))
    if save_probabilities:
        write_probabilities(
            result.probabilities,
            result.geometry,
            side_output(output_path, "probabilities", ".npz"),
            run.class_names,
        )
    return PredictedFile(
        case_name(input_path), input_path, output_path, result, time.perf_counter() - start
    )


def list_inputs(
    input_path: pathlib.Path, output_path: pathlib.Path
) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(scan, output) for a file, or for every NIfTI file of a folder."""
    if input_path.is_dir():
        files = sorted(p for p in input_path.iterdir() if is_nifti_name(p) and p.is_file())
        if not files:
            raise DatasetError(f"{input_path}: no .nii or .nii.gz file in this folder")
        if output_path.exists() and not output_path.is_dir():
            raise DatasetError(f"{output_path}: must be a folder when --input is a folder")
        return [(p, output_path / p.name) for p in files]
    if not input_path.exists():
        raise DatasetError(f"{input_path}: no such file or folder")
    if output_path.is_dir():
        output_path = output_path / input_path.name
    return [(input_path, output_path)]


def predict_paths(
    run: Run,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: TilingOptions,
    save_probabilities: bool = False,
    save_levels: bool = False,
) -> Iterator[PredictedFile]:
    """Segment a scan or a folder of scans, one output per case, as each case finishes.

    Every output path is checked before the first scan is read.
    """
    jobs = list_inputs(pathlib.Path(input_path), pathlib.Path(output_path))
    for _, output in jobs:
        check_writable(output)
    for scan, output in tqdm.tqdm(jobs, desc="cases", disable=len(jobs) < 2):
        yield predict_file(
            run,
            scan,
            output,
            options,
            save_probabilities=save_probabilities,
            save_levels=save_levels,
            show_progress=True,
        )
