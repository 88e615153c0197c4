"""Segment CT scans with a trained run, a file or a folder at a time.

    autocontext predict --workdir runs/default --input ct.nii.gz --output seg.nii.gz
    autocontext predict --workdir runs/default --input imagesTs --output segs --labels labelsTs
    autocontext predict --workdir runs/default --input imagesTs --output segs --continue
    autocontext predict --workdir runs/totalseg --input ct.nii.gz --output seg.nii.gz \
        --labels labels_totalsegmentator.nii.gz --label_map=totalsegmentator
    autocontext predict --model model.zip --input imagesTs --output segs
    autocontext predict --workdir runs/fold0 --workdir runs/fold1 --input ct.nii.gz \
        --output seg.nii.gz

Writes uint8 label maps in each input's own geometry (affine, qform/sform codes, voxel
size), so they overlay the scan in any viewer. Folders go the nnU-Net way:
`imagesTs/case_0000.nii.gz` is written as `segs/case.nii.gz` and scored against
`labelsTs/case.nii.gz`. With --labels, each case's Dice is printed as it finishes and
Dice, HD95 and NSD per case and class, with their means, go to OUTPUT/summary.json
(NAME_summary.json beside a single output). No output may replace an input. With
--statistics, each structure's volume (ml) and the mean and std of the scan's HU inside
it go to NAME_statistics.json (OUTPUT/statistics.csv for a folder). Ctrl-C stops after
the case in progress is written (a second Ctrl-C drops it) and prints the --continue
command that finishes the rest.

Several runs (--workdir given more than once, or a model file of several members from
`autocontext export`) predict as an ensemble: each runs its own pyramid coarse to fine,
and their softmax is averaged before the argmax. They must share the preprocessing plan,
the classes and the label map.
"""

from __future__ import annotations

import pathlib
import shlex
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

import numpy as np
from absl import app, flags

from autocontext_jax.cli.common import (
    COMPILATION_CACHE,
    checked_flag,
    no_arguments,
    quiet_logging,
    run_command,
)
from autocontext_jax.data.atomic import write_json_atomically, write_text_atomically
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.labels import (
    LABEL_MAP_PRESETS,
    class_names,
    parse_label_map,
    read_labels,
)
from autocontext_jax.data.nifti import read_scan
from autocontext_jax.data.scans import is_dicom_folder, read_any_scan
from autocontext_jax.evaluation.folders import (
    IN_REFERENCE,
    SUMMARY_FILE,
    dataset_labelled_classes,
    folder_result,
    label_files,
    parse_classes,
    score_label_file,
    score_labels,
    unmatched_line,
    write_summary,
)
from autocontext_jax.evaluation.reports import summary_markdown
from autocontext_jax.inference import (
    WEIGHTINGS,
    PredictionJob,
    check_options,
    default_options,
    load_model,
    predict_jobs,
    with_host_lowerings,
)
from autocontext_jax.inference.predict import (
    check_outputs,
    list_inputs,
    predicted_after,
    reference_files,
    side_output,
)
from autocontext_jax.inference.statistics import statistics_csv, structure_statistics
from autocontext_jax.runtime.preemption import StopSignals
from autocontext_jax.runtime.progress import say

STATISTICS_CSV = "statistics.csv"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_multi_string(
        "workdir",
        [],
        "A training run's folder (config.json, checkpoints/); repeat it, or give a folder of "
        "runs (fold runs), for an ensemble.",
    )
    flags.DEFINE_multi_string(
        "model",
        [],
        "A model file of `autocontext export` (one run, or the members of an ensemble).",
    )
    flags.DEFINE_string(
        "input",
        None,
        "A scan (NIfTI; with SimpleITK also .nrrd, .mha, .mhd, or a DICOM series folder), or "
        "a folder of scan files (nnU-Net: CASE_0000.nii.gz).",
    )
    flags.DEFINE_string(
        "output", None, "Output .nii.gz file, or a folder (CASE.nii.gz per case) for a folder."
    )
    flags.DEFINE_integer(
        "step", None, "Checkpoint step of the --workdir runs (default: each one's latest)."
    )
    flags.DEFINE_integer("tile_size", None, "Tile edge in voxels (default: 2 x crop size).")
    flags.DEFINE_float("overlap", 0.5, "Fraction of a tile shared with its neighbour.")
    flags.DEFINE_enum("weighting", "gaussian", list(WEIGHTINGS), "Tile blending.")
    flags.DEFINE_bool("mirror", False, "Average over the 8 flips of the axes (8x slower).")
    flags.DEFINE_integer("tiles_per_batch", 1, "Tiles per device and batch.")
    flags.DEFINE_bool(
        "save_probabilities", False, "Also write NAME_probabilities.npz (float16, scan grid)."
    )
    flags.DEFINE_bool("save_levels", False, "Also write NAME_levelS.nii.gz per coarser level.")
    flags.DEFINE_string(
        "labels",
        None,
        "Reference labels, a file or a folder of CASE.nii.gz: print each case's Dice and write "
        "summary.json (Dice, HD95, NSD) beside the outputs.",
    )
    flags.DEFINE_string(
        "label_map",
        None,
        "Ids of the --labels files as model classes: ID:CLASS,ID:CLASS,... or "
        f"{' or '.join(LABEL_MAP_PRESETS)} (default: the run's data.label_map).",
    )
    flags.DEFINE_string(
        "classes",
        None,
        "With --labels: the structures the references label, e.g. liver,spleen (default: "
        "those any reference holds, and the dataset.json beside the labels lists)",
    )
    flags.DEFINE_bool(
        "strict",
        False,
        "With --labels: a case without a reference, or a reference without a case, is an error.",
    )
    flags.DEFINE_enum(
        "output_type",
        "nifti",
        ["nifti", "dicom_seg"],
        "dicom_seg (a DICOM series input): also write NAME.dcm, a DICOM Segmentation of the "
        "series with SNOMED CT codes (pip install -e '.[dicom]').",
    )
    flags.DEFINE_bool(
        "statistics",
        False,
        "Also write per structure the volume (ml) and mean and std HU inside it, on the scan's "
        f"grid: NAME_statistics.json beside a single output, {STATISTICS_CSV} for a folder.",
    )
    flags.DEFINE_bool(
        "continue",
        False,
        "Skip the cases whose output exists and is newer than the checkpoint.",
    )


def is_case_folder(input_path: pathlib.Path) -> bool:
    """Whether the input is a folder of cases (not one scan, nor one DICOM series folder)."""
    return input_path.is_dir() and not is_dicom_folder(input_path)


def summary_path(input_path: pathlib.Path, jobs: Sequence[PredictionJob]) -> pathlib.Path:
    """OUTPUT/summary.json for a folder of cases, NAME_summary.json beside a single output.

    A DICOM series folder is one case: its summary is named after its output, so a second
    series predicted into the same folder does not replace the first one's.
    """
    if is_case_folder(input_path):
        return jobs[0].output.parent / SUMMARY_FILE
    return side_output(jobs[0].output, "summary", ".json")


def main(argv: list[str]) -> None:
    """Restore the run, segment the inputs, print each case as it finishes (and its scores).

    Ctrl-C while the cases are segmented stops after the case in progress (`stopped`);
    before that (loading the run, checking the paths) it stops at once, one line, 130.
    """
    try:
        predict_command(argv)
    except KeyboardInterrupt:
        print("Stopped on SIGINT before any case was predicted; nothing written.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def predict_command(argv: list[str]) -> None:
    """The command's work: load, check every path, segment the cases, score, summarise."""
    no_arguments(argv)
    if not FLAGS.workdir and not FLAGS.model:
        raise app.UsageError("--workdir (or --model) is required")
    for name in ("input", "output"):
        if FLAGS[name].value is None:
            raise app.UsageError(f"--{name} is required")
    quiet_logging()
    scores = {}
    trained = load_model(FLAGS.workdir, FLAGS.model, FLAGS.step)
    options = default_options(
        trained.config,
        tile_size=FLAGS.tile_size,
        overlap=FLAGS.overlap,
        weighting=FLAGS.weighting,
        mirror=FLAGS.mirror,
        tiles_per_batch=FLAGS.tiles_per_batch,
    )
    checked_flag(lambda: check_options(options, trained.num_poolings))
    label_map, unmapped = trained.label_map, trained.unmapped_labels
    if FLAGS.label_map is not None:
        label_map = checked_flag(
            lambda: parse_label_map(FLAGS.label_map, trained.num_classes), "label_map"
        )
        unmapped = "background"
    tolerance = trained.config.eval.nsd_tolerance_mm
    input_path = pathlib.Path(FLAGS.input)
    jobs = list_inputs(input_path, pathlib.Path(FLAGS.output))
    references = {}
    labelled = None
    if FLAGS.labels is not None:
        labels_path = pathlib.Path(FLAGS.labels)
        references = reference_files(jobs, labels_path, required=False)
        labelled = dataset_labelled_classes(labels_path, trained.num_classes, label_map)
        if FLAGS.classes is not None:
            labelled = checked_flag(
                lambda: parse_classes(FLAGS.classes, trained.num_classes), "classes"
            )
        unmatched = unmatched_references(jobs, references, labels_path)
        if unmatched and FLAGS.strict:
            raise DatasetError(f"{labels_path}: {unmatched_line(unmatched)} (--strict)")
        if unmatched:
            print(f"Warning: {unmatched_line(unmatched)}", file=sys.stderr, flush=True)
    elif FLAGS.classes is not None or FLAGS.strict:
        raise app.UsageError("--classes and --strict go with --labels")
    if FLAGS.output_type == "dicom_seg":
        not_dicom = [str(job.input) for job in jobs if not is_dicom_folder(job.input)]
        if not_dicom:
            raise app.UsageError(
                f"--output_type dicom_seg needs a DICOM series folder as --input; "
                f"{not_dicom[0]} is not one"
            )
    check_outputs(
        jobs,
        trained.num_levels,
        FLAGS.save_probabilities,
        FLAGS.save_levels,
        protected=list(references.values()),
    )
    done = []
    if FLAGS["continue"].value:
        written = trained.checkpoint_time()
        done = [job for job in jobs if predicted_after(job, written)]
    described = trained.description()
    print(f"{described[0].upper()}{described[1:]}; tiles of {options.tile_size}^3", flush=True)
    if done:
        checkpoint = (
            f"step {trained.first.step}'s checkpoint"
            if len(trained.members) == 1
            else "the newest member's checkpoint"
        )
        print(f"--continue: {len(done)} of {len(jobs)} cases predicted after {checkpoint}, "
              "kept as they are", flush=True)  # fmt: skip
    for job in done:
        if job.input in references:
            # The kept output is scored again, so summary.json covers every case.
            scores[job.case] = score_label_file(
                job.output,
                references[job.input],
                read_scan(job.input).geometry,
                trained.num_classes,
                label_map,
                unmapped,
                tolerance,
            )
    todo = [job for job in jobs if job not in done]
    measured = {}
    if FLAGS.statistics:
        for job in done:
            measured[job.case] = statistics_of_file(job, trained.class_names, trained.num_classes)
    finished_cases = [job.case for job in done]
    if todo:
        # Once every path and flag is checked: the convolution in this host's lowering
        # (`auto` timed once per host and shapes, as training times it, then read back).
        trained = with_host_lowerings(trained, COMPILATION_CACHE, say)
    # Ctrl-C (or SIGTERM) stops after the case in progress is written; a second one drops
    # it. Every file is written atomically, so no output is ever left half written.
    with StopSignals() as signals:
        try:
            for finished in predict_jobs(
                trained,
                todo,
                options,
                save_probabilities=FLAGS.save_probabilities,
                save_levels=FLAGS.save_levels,
                statistics=FLAGS.statistics,
                dicom_seg=FLAGS.output_type == "dicom_seg",
            ):
                finished_cases.append(finished.case)
                line = (
                    f"{finished.case}: {finished.output}, {finished.segmentation.tiles} tiles in "
                    f"{finished.seconds:.1f} s"
                )
                if finished.input in references:
                    scores[finished.case] = score_labels(
                        finished.segmentation.finest,
                        references[finished.input],
                        finished.segmentation.geometry,
                        trained.num_classes,
                        label_map,
                        unmapped,
                        tolerance,
                    )
                    line += f", mean Dice {100 * mean_dice(scores[finished.case], labelled):.1f} %"
                print(line, flush=True)
                if finished.statistics is not None:
                    measured[finished.case] = finished.statistics
                    write_statistics(input_path, jobs, measured)
                if signals.received is not None and len(finished_cases) < len(jobs):
                    stopped(jobs, finished_cases, signals.received, dropped=False)
        except KeyboardInterrupt:
            stopped(jobs, finished_cases, signals.received or signal.SIGINT, dropped=True)
    if measured:
        print(f"Wrote {write_statistics(input_path, jobs, measured)}")
    if references:
        scored = [job for job in jobs if job.case in scores]
        result = folder_result(
            [job.case for job in scored],
            [scores[job.case] for job in scored],
            trained.class_names[1:],
            tolerance,
            labelled=labelled,
        )
        path = summary_path(input_path, jobs)
        write_summary(path, result)
        print(summary_markdown(result))
        print(f"Wrote {path}")


def unmatched_references(
    jobs: Sequence[PredictionJob],
    references: dict[pathlib.Path, pathlib.Path],
    labels: pathlib.Path,
) -> dict[str, list[str]]:
    """The cases without a reference, and the reference files of a folder without a case."""
    unmatched = {
        "predictions_without_reference": [j.case for j in jobs if j.input not in references],
    }
    if labels.is_dir() and len(jobs) > 1:
        cases = {job.case for job in jobs}
        unmatched["references_without_prediction"] = sorted(set(label_files(labels)) - cases)
    return {key: cases for key, cases in unmatched.items() if cases}


def mean_dice(scores: dict[str, list], labelled: Sequence[str] | None) -> float:
    """A case's mean Dice over the structures its reference holds (and `labelled` names)."""
    names = class_names(len(scores["dice"]) + 1)[1:]
    values = [
        value
        for value, name, present in zip(scores["dice"], names, scores[IN_REFERENCE], strict=True)
        if present and (labelled is None or name in labelled)
    ]
    return float(np.mean(values)) if values else float("nan")


def statistics_of_file(
    job: PredictionJob, class_names: Sequence[str], num_classes: int
) -> dict[str, dict]:
    """The statistics of a case whose output exists (kept by --continue), from its files."""
    scan = read_any_scan(job.input)
    labels = read_labels(job.output, scan.geometry, num_classes, (), "error")
    return structure_statistics(labels, scan.image, scan.geometry, class_names)


def write_statistics(
    input_path: pathlib.Path, jobs: Sequence[PredictionJob], measured: dict[str, dict]
) -> pathlib.Path:
    """NAME_statistics.json beside a single output, OUTPUT/statistics.csv for a folder."""
    if is_case_folder(input_path):
        path = jobs[0].output.parent / STATISTICS_CSV
        write_text_atomically(path, statistics_csv(measured))
    else:
        [(case, structures)] = measured.items()
        path = side_output(jobs[0].output, "statistics", ".json")
        write_json_atomically(path, {"case": case, "input": str(jobs[0].input), **structures})
    return path


def stopped(
    jobs: Sequence[PredictionJob], finished: Sequence[str], signal_number: int, dropped: bool
) -> NoReturn:
    """Say which cases finished and how to continue, then exit with 128 + the signal's number."""
    left = [job.case for job in jobs if job.case not in finished]
    what = "the case in progress dropped" if dropped else "after the case in progress"
    command = list(sys.orig_argv)
    if "--continue" not in command:
        command.append("--continue")
    print(
        f"Stopped on {signal.Signals(signal_number).name}, {what}: {len(finished)} of "
        f"{len(jobs)} cases finished ({', '.join(finished) or 'none'}); {len(left)} left. "
        f"Continue with: {shlex.join(command)}",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(128 + signal_number)


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv, computes=True)


if __name__ == "__main__":
    run()
