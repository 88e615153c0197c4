"""Segment CT scans with a trained run, a file or a folder at a time.

    autocontext predict --workdir runs/default --input ct.nii.gz --output seg.nii.gz
    autocontext predict --workdir runs/default --input scans/ --output segs/

Writes uint8 label maps in each input's own geometry (affine, qform/sform codes, voxel
size), so they overlay the scan in any viewer. With --labels, prints the Dice of every
case against its reference (read through the run's label map, as in training).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from autocontext_jax.cli.common import fail, no_arguments, quiet_logging, run_command
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.labels import read_labels
from autocontext_jax.evaluation.evaluate import dice_per_class
from autocontext_jax.evaluation.reports import dice_table
from autocontext_jax.inference import (
    WEIGHTINGS,
    CheckpointError,
    Run,
    check_options,
    default_options,
    load_run,
    predict_paths,
)
from autocontext_jax.inference.predict import list_inputs

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_string("workdir", None, "A training run's folder (config.json, checkpoints/).")
    flags.DEFINE_string("input", None, "A NIfTI scan, or a folder of them.")
    flags.DEFINE_string("output", None, "Output .nii.gz file, or folder for a folder input.")
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
    flags.DEFINE_string("labels", None, "Reference labels (file or folder): print Dice.")


def label_files(
    input_path: pathlib.Path, output_path: pathlib.Path, labels: pathlib.Path
) -> dict[pathlib.Path, pathlib.Path]:
    """The reference label file of every input (same name in a folder), checked to exist."""
    jobs = list_inputs(input_path, output_path)
    if input_path.is_dir() and not labels.is_dir():
        raise DatasetError(f"{labels}: must be a folder when --input is a folder")
    found = {scan: labels / scan.name if labels.is_dir() else labels for scan, _ in jobs}
    for path in found.values():
        if not path.is_file():
            raise DatasetError(f"{path}: no label file for this case")
    return found


def dice_report(results: list[dict[str, Any]], run: Run) -> str:
    """Per-case Dice lines and the Avg/Std/Min/Max table of the reports."""
    names = run.class_names[1:]
    lines = [
        f"{r['case']}: "
        + ", ".join(f"{n} {100 * d:.1f}" for n, d in zip(names, r["dice"], strict=True))
        for r in results
    ]
    table = dice_table(
        {
            "case_ids": [r["case"] for r in results],
            "classes": list(names),
            "dice": {"final_level": [r["dice"] for r in results]},
        }
    )
    return "\n".join(lines) + "\n" + table


def main(argv: list[str]) -> None:
    """Restore the run, segment the inputs, print where the outputs went (and Dice)."""
    no_arguments(argv)
    for name in ("workdir", "input", "output"):
        if FLAGS[name].value is None:
            raise app.UsageError(f"--{name} is required")
    quiet_logging()
    results = []
    try:
        trained = load_run(FLAGS.workdir, FLAGS.step)
        options = default_options(
            trained.config,
            tile_size=FLAGS.tile_size,
            overlap=FLAGS.overlap,
            weighting=FLAGS.weighting,
            mirror=FLAGS.mirror,
            tiles_per_batch=FLAGS.tiles_per_batch,
        )
        check_options(options, trained.model.num_poolings)
        input_path, output_path = pathlib.Path(FLAGS.input), pathlib.Path(FLAGS.output)
        references = {}
        if FLAGS.labels is not None:
            references = label_files(input_path, output_path, pathlib.Path(FLAGS.labels))
        print(f"Step {trained.step} of {FLAGS.workdir}; tiles of {options.tile_size}^3", flush=True)
        for done in predict_paths(
            trained,
            input_path,
            output_path,
            options,
            save_probabilities=FLAGS.save_probabilities,
            save_levels=FLAGS.save_levels,
        ):
            result = {"case": done.case, "output": str(done.output)}
            if done.input in references:
                reference = read_labels(
                    references[done.input],
                    done.segmentation.geometry,
                    trained.num_classes,
                    trained.label_map,
                    trained.unmapped_labels,
                    done.input,
                )
                result["dice"] = dice_per_class(
                    done.segmentation.finest, reference, trained.num_classes
                ).tolist()
            print(
                f"{done.output}: {done.segmentation.tiles} tiles in {done.seconds:.1f} s",
                flush=True,
            )
            results.append(result)
    except (CheckpointError, DatasetError, ValueError) as error:
        fail("Error", error)
    if references:
        print(dice_report(results, trained))


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv)


if __name__ == "__main__":
    run()
