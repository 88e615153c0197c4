"""Files in, files out: scans segmented with a run and written in their own geometry.

    for result in predict_paths(load_model(["runs/default"]), "imagesTs/", "segs/"):
        print(result.output, result.seconds)

A scan is read once into voxels and a `Geometry`; the same geometry writes its label
map (and the optional per-level maps and probabilities), so every output overlays its
input in any viewer. Folders go the nnU-Net way: `imagesTs/case_0000.nii.gz` is case
`case`, its output `case.nii.gz` and its reference `labelsTs/case.nii.gz`. Every path is
checked before any work starts, and no output may land on an input.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Iterator, Sequence

import tqdm

from autocontext_jax import __version__
from autocontext_jax.data.dicom_seg import write_dicom_seg
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.hounsfield import hounsfield_warning
from autocontext_jax.data.nifti import (
    NIFTI_SUFFIXES,
    case_name,
    is_nifti_name,
    write_label_map,
    write_probabilities,
)
from autocontext_jax.data.scans import is_dicom_folder, is_scan_name, read_any_scan, scan_case_id
from autocontext_jax.inference.model import Model, as_model
from autocontext_jax.inference.run import Run
from autocontext_jax.inference.segment import Segmentation, segment, tiles_of
from autocontext_jax.inference.statistics import structure_statistics
from autocontext_jax.inference.tiling import TilingOptions
from autocontext_jax.runtime.checkpointing import CHECKPOINTS_DIR, CONFIG_FILE, DAMAGED_DIR
from autocontext_jax.runtime.logs import TENSORBOARD_DIR
from autocontext_jax.runtime.progress import interactive

# A scan that does not look like CT is segmented all the same, with a warning on this logger.
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PredictedFile:
    """What predicting one scan did: where it went, how long it took, and the labels."""

    case: str
    input: pathlib.Path
    output: pathlib.Path
    segmentation: Segmentation
    seconds: float
    # Per structure: volume (ml), voxels, mean and std HU inside it; when asked for.
    statistics: dict[str, dict] | None = None


def side_output(output: pathlib.Path, tag: str, suffix: str = ".nii.gz") -> pathlib.Path:
    """OUTPUT_NAME_TAG.SUFFIX beside the main output."""
    return output.with_name(f"{case_name(output)}_{tag}{suffix}")


def dicom_seg_output(output: pathlib.Path) -> pathlib.Path:
    """OUTPUT_NAME.dcm beside the main output: its DICOM Segmentation."""
    return output.with_name(f"{case_name(output)}.dcm")


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
    run: Model | Run,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: TilingOptions,
    save_probabilities: bool = False,
    save_levels: bool = False,
    show_progress: bool = False,
    statistics: bool = False,
    dicom_seg: bool = False,
) -> PredictedFile:
    """Segment one scan and write OUTPUT (and the optional extras) in the scan's geometry.

    With `statistics`, the result also holds each structure's volume and HU inside it,
    measured on the scan's own grid. With `dicom_seg` (a DICOM series input), the labels
    also go to OUTPUT_NAME.dcm, a DICOM Segmentation referencing the series.
    """
    input_path, output_path = pathlib.Path(input_path), pathlib.Path(output_path)
    check_writable(output_path)
    start = time.perf_counter()
    scan = read_any_scan(input_path)
    warning = hounsfield_warning(scan.image)
    if warning:
        logger.warning("%s %s", input_path, warning)
    with tqdm.tqdm(
        total=tiles_of(run, scan, options),
        desc="tiles",
        unit="tile",
        leave=False,
        disable=not show_progress or not interactive(),
    ) as bar:
        result = segment(
            run,
            scan,
            options,
            all_levels=save_levels,
            probabilities=save_probabilities,
            progress=bar.update,
        )
    measured = None
    if statistics:
        measured = structure_statistics(result.finest, scan.image, scan.geometry, run.class_names)
    del scan
    write_label_map(result.finest, result.geometry, output_path)
    if dicom_seg:
        write_dicom_seg(
            result.finest,
            result.geometry,
            input_path,
            dicom_seg_output(output_path),
            run.class_names,
            __version__,
        )
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
        scan_case_id(input_path),
        input_path,
        output_path,
        result,
        time.perf_counter() - start,
        measured,
    )


@dataclasses.dataclass(frozen=True)
class PredictionJob:
    """One scan to segment: its case id, the file read and the label map written."""

    case: str
    input: pathlib.Path
    output: pathlib.Path


def list_inputs(input_path: pathlib.Path, output_path: pathlib.Path) -> list[PredictionJob]:
    """The job of a scan (a file or a DICOM series folder), or of every scan file of a folder.

    A folder's cases are written as OUTPUT/CASE.nii.gz; a folder holding no scan file is
    one DICOM series, its case the folder's name.
    """
    if input_path.is_dir() and not any(input_path.iterdir()):
        raise DatasetError(
            f"{input_path}: empty folder; expected scan files (CASE_0000.nii.gz) or a DICOM series"
        )
    if input_path.is_dir() and not is_dicom_folder(input_path):
        files = sorted(p for p in input_path.iterdir() if is_scan_name(p) and p.is_file())
        if output_path.exists() and not output_path.is_dir():
            raise DatasetError(f"{output_path}: must be a folder when --input is a folder")
        if output_path.resolve() == input_path.resolve():
            raise DatasetError(
                f"{output_path}: is the input folder; write the outputs to another folder"
            )
        jobs = [
            PredictionJob(scan_case_id(p), p, output_path / f"{scan_case_id(p)}.nii.gz")
            for p in files
        ]
        cases = [job.case for job in jobs]
        twice = sorted({case for case in cases if cases.count(case) > 1})
        if twice:
            raise DatasetError(f"{input_path}: cases {twice} have more than one scan file")
        return jobs
    if not input_path.exists():
        raise DatasetError(f"{input_path}: no such file or folder")
    if input_path.is_dir() and output_path.resolve() == input_path.resolve():
        raise DatasetError(f"{output_path}: is the input folder; write the output elsewhere")
    # A folder output (existing, or named without .nii.gz for a DICOM folder) gets CASE.nii.gz.
    if output_path.is_dir() or (input_path.is_dir() and not is_nifti_name(output_path)):
        output_path = output_path / f"{scan_case_id(input_path)}.nii.gz"
    return [PredictionJob(scan_case_id(input_path), input_path, output_path)]


def outputs_of(
    job: PredictionJob, num_levels: int, save_probabilities: bool, save_levels: bool
) -> list[pathlib.Path]:
    """Every file predicting `job` writes: the label map and the optional extras."""
    outputs = [job.output]
    if save_levels:
        outputs += [side_output(job.output, f"level{s}") for s in range(1, num_levels)]
    if save_probabilities:
        outputs.append(side_output(job.output, "probabilities", ".npz"))
    return outputs


# The folders of a training workdir that the run itself writes, prunes and replaces.
RUN_OWNED_FOLDERS = (CHECKPOINTS_DIR, DAMAGED_DIR, TENSORBOARD_DIR)


def run_owned_folder(path: pathlib.Path) -> pathlib.Path | None:
    """The run-owned folder (a workdir's checkpoints/, ...) that `path` lies in, if any."""
    for folder in pathlib.Path(os.path.abspath(path)).parents:
        workdir = folder.parent
        if folder.name in RUN_OWNED_FOLDERS and (workdir / CONFIG_FILE).is_file():
            return folder
    return None


def check_outputs(
    jobs: Sequence[PredictionJob],
    num_levels: int,
    save_probabilities: bool = False,
    save_levels: bool = False,
    protected: Sequence[pathlib.Path] = (),
) -> None:
    """Refuse, before any work, an output that cannot be written or would replace an input.

    An output replaces an input when both resolve to one file (the same path, or a link);
    `protected` are further files never to write over, such as the reference labels. No
    output may go inside a folder a training run owns: training prunes its checkpoints/.
    """
    inputs = {path.resolve(): path for path in [*(job.input for job in jobs), *protected]}
    for job in jobs:
        check_writable(job.output)
        for output in outputs_of(job, num_levels, save_probabilities, save_levels):
            owned = run_owned_folder(output.resolve())
            if owned is not None:
                raise DatasetError(
                    f"{output}: inside {owned}, which the training run in {owned.parent} "
                    "owns and prunes; choose another --output"
                )
            if output.resolve() in inputs:
                raise DatasetError(
                    f"{output}: would write over the input {inputs[output.resolve()]}; "
                    f"choose another --output"
                )


def reference_files(
    jobs: Sequence[PredictionJob], labels: pathlib.Path, required: bool = True
) -> dict[pathlib.Path, pathlib.Path]:
    """The reference label file of every job's input, checked to exist.

    In a folder, case `case` (from `case_0000.nii.gz`) has `case.nii.gz` (or `.nii`), or
    failing that a file of the input's own name. Unless `required`, a case without one
    is left out (the caller names it).
    """
    if not labels.exists():
        raise DatasetError(f"{labels}: no such label file or folder")
    if len(jobs) > 1 and not labels.is_dir():
        raise DatasetError(f"{labels}: must be a folder when --input is a folder")
    found = {}
    for job in jobs:
        if not labels.is_dir():
            found[job.input] = labels
            continue
        names = [f"{job.case}{suffix}" for suffix in NIFTI_SUFFIXES] + [job.input.name]
        candidates = [labels / name for name in names if (labels / name).is_file()]
        if not candidates and not required:
            continue
        if not candidates:
            raise DatasetError(f"{labels / names[0]}: no label file for case {job.case}")
        found[job.input] = candidates[0]
    return found


def predicted_after(job: PredictionJob, timestamp: float) -> bool:
    """Whether the job's output exists and was written after `timestamp` (seconds)."""
    return job.output.is_file() and job.output.stat().st_mtime > timestamp


def predict_jobs(
    run: Model | Run,
    jobs: Sequence[PredictionJob],
    options: TilingOptions,
    save_probabilities: bool = False,
    save_levels: bool = False,
    statistics: bool = False,
    dicom_seg: bool = False,
) -> Iterator[PredictedFile]:
    """Segment the jobs' scans one after another, yielding each as it finishes."""
    for job in tqdm.tqdm(jobs, desc="cases", disable=len(jobs) < 2 or not interactive()):
        yield predict_file(
            run,
            job.input,
            job.output,
            options,
            save_probabilities=save_probabilities,
            save_levels=save_levels,
            show_progress=True,
            statistics=statistics,
            dicom_seg=dicom_seg,
        )


def predict_paths(
    run: Model | Run,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: TilingOptions,
    save_probabilities: bool = False,
    save_levels: bool = False,
    skip_done: bool = False,
) -> Iterator[PredictedFile]:
    """Segment a scan or a folder of scans, one output per case, as each case finishes.

    Every output path is checked before the first scan is read. With `skip_done`, a case
    whose output is newer than the run's checkpoint is left as it is (and not yielded).
    """
    jobs = list_inputs(pathlib.Path(input_path), pathlib.Path(output_path))
    model = as_model(run)
    check_outputs(jobs, model.num_levels, save_probabilities, save_levels)
    if skip_done:
        jobs = [job for job in jobs if not predicted_after(job, model.checkpoint_time())]
    yield from predict_jobs(run, jobs, options, save_probabilities, save_levels)
