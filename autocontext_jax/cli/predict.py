"""Segment CT scans with a trained run, a file or a folder at a time.

    autocontext predict --workdir runs/default --input ct.nii.gz --output seg.nii.gz
    autocontext predict --workdir runs/default --input imagesTs --output segs --labels labelsTs
    autocontext predict --workdir runs/default --input imagesTs --output segs --continue
    autocontext predict --workdir runs/totalseg --input ct.nii.gz --output seg.nii.gz \
        --labels labels_totalsegmentator.nii.gz --label_map=totalsegmentator

Writes uint8 label maps in each input's own geometry (affine, qform/sform codes, voxel
size), so they overlay the scan in any viewer. Folders go the nnU-Net way:
`imagesTs/case_0000.nii.gz` is written as `segs/case.nii.gz` and scored against
`labelsTs/case.nii.gz`. With --labels, each case's Dice is printed as it finishes and
Dice, HD95 and NSD per case and class, with their means, go to OUTPUT/summary.json
(NAME_summary.json beside a single output). No output may replace an input.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from autocontext_jax.cli.common import checked_flag, no_arguments, quiet_logging, run_command
from autocontext_jax.data.labels import LABEL_MAP_PRESETS, parse_label_map
from autocontext_jax.data.nifti import read_scan
from autocontext_jax.evaluation.folders import (
    SUMMARY_FILE,
    folder_result,
    score_label_file,
    score_labels,
    write_summary,
)
from autocontext_jax.evaluation.reports import summary_markdown
from autocontext_jax.inference import (
    WEIGHTINGS,
    PredictionJob,
    check_options,
    checkpoint_time,
    default_options,
    load_run,
    predict_jobs,
)
from autocontext_jax.inference.predict import (
    check_outputs,
    list_inputs,
    predicted_after,
    reference_files,
    side_output,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_string("workdir", None, "A training run's folder (config.json, checkpoints/).")
    flags.DEFINE_string(
        "input",
        None,
        "A scan (NIfTI; with SimpleITK also .nrrd, .mha, .mhd, or a DICOM series folder), or "
        "a folder of scan files (nnU-Net: CASE_0000.nii.gz).",
    )
    flags.DEFINE_string(
        "output", None, "Output .nii.gz file, or a folder (CASE.nii.gz per case) for a folder."
    )
    flags.DEFINE_integer("step", None, "Checkpoint step to use (default: the latest).")
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
    flags.DEFINE_bool(
        "continue",
        False,
        "Skip the cases whose output exists and is newer than the checkpoint.",
    )


def summary_path(input_path: pathlib.Path, jobs: Sequence[PredictionJob]) -> pathlib.Path:
    """OUTPUT/summary.json for a folder, NAME_summary.json beside a single output."""
    if input_path.is_dir():
        return jobs[0].output.parent / SUMMARY_FILE
    return side_output(jobs[0].output, "summary", ".json")


def main(argv: list[str]) -> None:
    """Restore the run, segment the inputs, print each case as it finishes (and its scores)."""
    no_arguments(argv)
    for name in ("workdir", "input", "output"):
        if FLAGS[name].value is None:
            raise app.UsageError(f"--{name} is required")
    quiet_logging()
    scores = {}
    trained = load_run(FLAGS.workdir, FLAGS.step)
    options = default_options(
        trained.config,
        tile_size=FLAGS.tile_size,
        overlap=FLAGS.overlap,
        weighting=FLAGS.weighting,
        mirror=FLAGS.mirror,
        tiles_per_batch=FLAGS.tiles_per_batch,
    )
    checked_flag(lambda: check_options(options, trained.model.num_poolings))
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
    if FLAGS.labels is not None:
        references = reference_files(jobs, pathlib.Path(FLAGS.labels))
    check_outputs(
        jobs,
        trained.model.num_levels,
        FLAGS.save_probabilities,
        FLAGS.save_levels,
        protected=list(references.values()),
    )
    done = []
    if FLAGS["continue"].value:
        written = checkpoint_time(trained)
        done = [job for job in jobs if predicted_after(job, written)]
    print(f"Step {trained.step} of {FLAGS.workdir}; tiles of {options.tile_size}^3", flush=True)
    if done:
        print(f"--continue: {len(done)} of {len(jobs)} cases predicted after step "
              f"{trained.step}'s checkpoint, kept as they are", flush=True)  # fmt: skip
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
    for finished in predict_jobs(
        trained,
        todo,
        options,
        save_probabilities=FLAGS.save_probabilities,
        save_levels=FLAGS.save_levels,
    ):
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
            line += f", mean Dice {100 * np.mean(scores[finished.case]['dice']):.1f} %"
        print(line, flush=True)
    if references:
        result = folder_result(
            [job.case for job in jobs],
            [scores[job.case] for job in jobs],
            trained.class_names[1:],
            tolerance,
        )
        path = summary_path(input_path, jobs)
        write_summary(path, result)
        print(summary_markdown(result))
        print(f"Wrote {path}")


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv, computes=True)


if __name__ == "__main__":
    run()
