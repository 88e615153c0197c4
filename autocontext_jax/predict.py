"""Segment CT scans with a trained run: `python -m autocontext_jax.predict --workdir RUN ...`.

    python -m autocontext_jax.predict --workdir runs/default --input ct.nii.gz --output seg.nii.gz
    python -m autocontext_jax.predict --workdir runs/default --input scans/ --output segs/

Writes uint8 label maps in each input's own geometry (affine, qform/sform codes, voxel
size), so they overlay the scan in any viewer. `predict_case` and `predict_paths` are the
same routine for notebooks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import ml_collections
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from absl import app, flags, logging

from autocontext_jax import evaluate, inference, parallel, train
from autocontext_jax.data import preprocess, scans
from autocontext_jax.data.dataset import DatasetError, read_nifti, remap_labels
from autocontext_jax.data.labels import class_names
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.pyramid import AutoContextPyramid, downsample_factor

FLAGS = flags.FLAGS


class CheckpointError(ValueError):
    """A workdir has no usable checkpoint or config; the message names the path."""


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A trained pyramid ready to predict: its run's config, module and variables."""

    config: ml_collections.ConfigDict
    model: AutoContextPyramid
    variables: dict[str, Any]
    step: int
    # The preprocessing the run trained with (spacing, normalisation), applied to every scan.
    plan: preprocess.Plan


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config that the run in `workdir` saved as config.json."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; --workdir must be a training run's folder")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not a valid config ({error})") from error


def load_predictor(workdir: str | os.PathLike, step: int | None = None) -> Predictor:
    """Restore the parameters and BatchNorm statistics of `step` (default latest) of a run.

    Optimiser state is not read. Shapes come from the run's config.json; when the run
    averaged its parameters (train.ema_decay > 0) the average is what it evaluated, and
    what is restored.
    """
    workdir = pathlib.Path(workdir).absolute()
    config = read_run_config(workdir)
    try:
        model = build_pyramid(config)
        abstract = jax.eval_shape(lambda: train.init_variables(model, 0))
        use_ema = config.train.ema_decay > 0
    except (AttributeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"{workdir / 'config.json'}: cannot build the model ({error})"
        ) from error
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoints folder; was the run trained?")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"{directory}: no finished checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"{directory}: no checkpoint of step {step} (have {sorted(steps)})")
    params_key = "ema_params" if use_ema else "params"
    target = {params_key: abstract["params"], "batch_stats": abstract["batch_stats"]}
    sharding = parallel.replicated(parallel.make_mesh())
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
    try:
        # A checkpoint holds the train state beside the input pipeline's (checkpointing.py);
        # only the state's parameters and statistics are read.
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                )
            ),
        ).state
    except Exception as error:  # orbax raises several types for missing or misshaped leaves
        raise CheckpointError(
            f"{directory / str(step)}: does not match the model of {workdir / 'config.json'} "
            f"({type(error).__name__}: {error})"
        ) from error
    finally:
        manager.close()
    state = train.TrainState(
        step=step,
        params=restored.get("params"),
        batch_stats=restored["batch_stats"],
        opt_state=None,
        ema_params=restored.get("ema_params"),
    )
    try:
        plan = preprocess.load_run_plan(workdir, config.data)
    except DatasetError as error:
        raise CheckpointError(f"{workdir}: no preprocessing plan of the run ({error})") from error
    variables = train.evaluation_variables(state, config.train)
    return Predictor(config, model, variables, step, plan)


def default_options(config: ml_collections.ConfigDict, **overrides: Any) -> inference.TilingOptions:
    """Tiling options for a run: tiles twice the training crop ("network reshaping")."""
    values = {"tile_size": 2 * config.data.crop_size}
    values.update({key: value for key, value in overrides.items() if value is not None})
    return inference.TilingOptions(**values)


def side_output(output: pathlib.Path, tag: str, suffix: str = ".nii.gz") -> pathlib.Path:
    """OUTPUT_NAME_TAG.SUFFIX beside the main output."""
    return output.with_name(f"{scans.case_name(output)}_{tag}{suffix}")


def check_writable(path: pathlib.Path) -> None:
    """Fail before the work when `path` cannot be written (not NIfTI, folder not writable)."""
    if not scans.is_nifti_name(path):
        raise DatasetError(f"{path}: the output name must end in .nii or .nii.gz")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise DatasetError(f"{path}: cannot write there ({folder} is not a writable folder)")


def read_reference_labels(
    path: pathlib.Path, scan: nib.Nifti1Image, config: ml_collections.ConfigDict
) -> np.ndarray:
    """A label map in model classes on the scan's own grid, checked against the scan.

    The run's `data.label_map` turns the dataset's ids into model classes, as in training.
    """
    reference = read_nifti(path)
    if reference.shape != scan.shape:
        raise DatasetError(
            f"{path}: label shape {reference.shape} differs from the scan's {scan.shape}"
        )
    if not np.allclose(reference.affine, scan.affine, atol=1e-3):
        raise DatasetError(f"{path}: label affine differs from the scan's")
    return remap_labels(
        np.asarray(reference.dataobj),
        config.model.num_classes,
        config.data.get("label_map", ()),
        path,
        config.data.get("unmapped_labels", "background"),
    )


def predict_case(
    predictor: Predictor,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: inference.TilingOptions,
    save_probabilities: bool = False,
    save_levels: bool = False,
    label_path: str | os.PathLike | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Segment one scan and write OUTPUT (and the optional extras); return what was done."""
    input_path, output_path = pathlib.Path(input_path), pathlib.Path(output_path)
    model = predictor.model
    check_writable(output_path)
    start = time.perf_counter()
    scan = read_nifti(input_path)
    reference = None
    if label_path is not None:
        reference = read_reference_labels(pathlib.Path(label_path), scan, predictor.config)
    volume, geometry = preprocess.preprocess_image(scan, predictor.plan, input_path)
    native_shape = volume.shape
    tiles = inference.count_tiles(native_shape, model.num_levels, model.num_poolings, options)
    with tqdm.tqdm(
        total=tiles, desc="tiles", unit="tile", leave=False, disable=not show_progress
    ) as bar:
        probs = inference.predict_pyramid(
            model,
            predictor.variables,
            volume,
            predictor.plan.pad_value,
            options,
            progress=bar.update,
        )
    del volume
    finest = model.num_levels

    def on_scan_grid(level: int, labels_only: bool = True) -> np.ndarray:
        # The level's probabilities interpolated once, straight onto the scan's canonical
        # grid (labels: argmax there, no label map on the preprocessed grid), then the
        # reorientation undone.
        canonical = inference.upsample_to_native(
            probs[level - 1],
            downsample_factor(level, finest),
            native_shape,
            labels_only,
            grid_shape=geometry.canonical_shape,
        )
        return preprocess.canonical_to_original(canonical, geometry)

    labels = on_scan_grid(finest)
    scans.write_label_map(labels, scan, output_path)
    result: dict[str, Any] = {"case": scans.case_name(input_path), "output": str(output_path)}
    if save_levels:
        for level in range(1, finest):
            scans.write_label_map(
                on_scan_grid(level), scan, side_output(output_path, f"level{level}")
            )
    if save_probabilities:
        write_probabilities(
            on_scan_grid(finest, labels_only=False),
            scan,
            side_output(output_path, "probabilities", ".npz"),
            model.num_classes,
        )
    if reference is not None:
        result["dice"] = evaluate.dice_per_class(labels, reference, model.num_classes).tolist()
    result["seconds"] = time.perf_counter() - start
    result["tiles"] = tiles
    return result


def write_probabilities(
    probabilities: np.ndarray, scan: nib.Nifti1Image, path: pathlib.Path, num_classes: int
) -> None:
    """Write float16 (X, Y, Z, K) probabilities on the scan's grid, with its affine, as .npz.

    NIfTI has no float16 type; the arrays are in the voxel order of the scan's file.
    """
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(
            temporary,
            probabilities=probabilities.astype(np.float16),
            affine=np.asarray(scan.affine),
            classes=np.asarray(class_names(num_classes)),
        )
        os.replace(temporary, path)
    except OSError as error:
        raise DatasetError(f"{path}: cannot write there ({error})") from error
    finally:
        temporary.unlink(missing_ok=True)


def list_inputs(
    input_path: pathlib.Path, output_path: pathlib.Path, label_path: pathlib.Path | None
) -> list[tuple[pathlib.Path, pathlib.Path, pathlib.Path | None]]:
    """(scan, output, labels) for a file, or for every NIfTI file of a folder."""
    if input_path.is_dir():
        files = sorted(p for p in input_path.iterdir() if scans.is_nifti_name(p) and p.is_file())
        if not files:
            raise DatasetError(f"{input_path}: no .nii or .nii.gz file in this folder")
        if output_path.exists() and not output_path.is_dir():
            raise DatasetError(f"{output_path}: must be a folder when --input is a folder")
        if label_path is not None and not label_path.is_dir():
            raise DatasetError(f"{label_path}: must be a folder when --input is a folder")
        return [
            (p, output_path / p.name, None if label_path is None else label_path / p.name)
            for p in files
        ]
    if not input_path.exists():
        raise DatasetError(f"{input_path}: no such file or folder")
    if output_path.is_dir():
        output_path = output_path / input_path.name
    return [(input_path, output_path, label_path)]


def predict_paths(
    predictor: Predictor,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: inference.TilingOptions,
    label_path: str | os.PathLike | None = None,
    **case_options: Any,
) -> list[dict[str, Any]]:
    """Segment a scan or a folder of scans (one output per case, a progress bar across cases)."""
    jobs = list_inputs(
        pathlib.Path(input_path),
        pathlib.Path(output_path),
        None if label_path is None else pathlib.Path(label_path),
    )
    for _, output, labels in jobs:
        check_writable(output)
        if labels is not None and not labels.is_file():
            raise DatasetError(f"{labels}: no label file for this case")
    results = []
    for scan, output, labels in tqdm.tqdm(jobs, desc="cases", disable=len(jobs) < 2):
        results.append(
            predict_case(
                predictor,
                scan,
                output,
                options,
                label_path=labels,
                show_progress=True,
                **case_options,
            )
        )
    return results


def dice_report(results: list[dict[str, Any]], num_classes: int) -> str:
    """Per-case Dice lines and the Avg/Std/Min/Max table of evaluate.dice_table."""
    names = class_names(num_classes)[1:]
    lines = [
        f"{r['case']}: "
        + ", ".join(f"{n} {100 * d:.1f}" for n, d in zip(names, r["dice"], strict=True))
        for r in results
    ]
    table = evaluate.dice_table(
        {
            "case_ids": [r["case"] for r in results],
            "classes": list(names),
            "dice": {"final_level": [r["dice"] for r in results]},
        }
    )
    return "\n".join(lines) + "\n" + table


def define_flags() -> None:
    """Define the command line's flags.

    Only when run as a command, so that this module can be imported beside main.py,
    which defines --workdir too.
    """
    flags.DEFINE_string("workdir", None, "A training run's folder (config.json, checkpoints/).")
    flags.DEFINE_string("input", None, "A NIfTI scan, or a folder of them.")
    flags.DEFINE_string("output", None, "Output .nii.gz file, or folder for a folder input.")
    flags.DEFINE_integer("step", None, "Checkpoint step to use (default: the latest).")
    flags.DEFINE_integer("tile_size", None, "Tile edge in voxels (default: 2 x crop size).")
    flags.DEFINE_float("overlap", 0.5, "Fraction of a tile shared with its neighbour.")
    flags.DEFINE_enum("weighting", "gaussian", list(inference.WEIGHTINGS), "Tile blending.")
    flags.DEFINE_bool("mirror", False, "Average over the 8 flips of the axes (8x slower).")
    flags.DEFINE_integer("tiles_per_batch", 1, "Tiles per device and batch.")
    flags.DEFINE_bool(
        "save_probabilities", False, "Also write NAME_probabilities.npz (float16, scan grid)."
    )
    flags.DEFINE_bool("save_levels", False, "Also write NAME_levelS.nii.gz per coarser level.")
    flags.DEFINE_string("labels", None, "Reference labels (file or folder): print Dice.")


def main(argv: list[str]) -> None:
    """Restore the run, segment the inputs, print where the outputs went (and Dice)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name in ("workdir", "input", "output"):
        if FLAGS[name].value is None:
            raise app.UsageError(f"--{name} is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        predictor = load_predictor(FLAGS.workdir, FLAGS.step)
        options = default_options(
            predictor.config,
            tile_size=FLAGS.tile_size,
            overlap=FLAGS.overlap,
            weighting=FLAGS.weighting,
            mirror=FLAGS.mirror,
            tiles_per_batch=FLAGS.tiles_per_batch,
        )
        inference.check_options(options, predictor.model.num_poolings)
        print(
            f"Step {predictor.step} of {FLAGS.workdir}; tiles of {options.tile_size}^3", flush=True
        )
        results = predict_paths(
            predictor,
            FLAGS.input,
            FLAGS.output,
            options,
            label_path=FLAGS.labels,
            save_probabilities=FLAGS.save_probabilities,
            save_levels=FLAGS.save_levels,
        )
    except (CheckpointError, DatasetError, ValueError) as error:
        sys.exit(f"Error: {error}")
    for result in results:
        print(f"{result['output']}: {result['tiles']} tiles in {result['seconds']:.1f} s")
    if FLAGS.labels is not None:
        print(dice_report(results, predictor.model.num_classes))


if __name__ == "__main__":
    define_flags()
    app.run(main)
