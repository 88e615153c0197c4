"""Whole-volume prediction of every pyramid level, per-organ metric tables, and the command.

python -m autocontext_jax.evaluate --workdir RUN [--data DIR]
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging

from autocontext_jax import metrics, visualize
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data import preprocess
from autocontext_jax.data.intensity import normalize_hu, normalized_pad_value
from autocontext_jax.data.labels import class_names
from autocontext_jax.data.sampling import box_downsample
from autocontext_jax.models.pyramid import downsample_factor

SUMMARY_ROWS = ("Avg", "Std", "Min", "Max")
# Used for runs saved before the surface metrics existed.
DEFAULT_NSD_TOLERANCE_MM = 2.0
METRIC_HEADINGS = {"dice": "Dice (%)", "hd95": "HD95 (mm)", "nsd": "NSD (%)"}


def pad_to_multiple(volume: np.ndarray, multiple: int, value: float) -> np.ndarray:
    """Pad a 3D volume at its far ends so that every size is a multiple of `multiple`."""
    pad = [(0, -n % multiple) for n in volume.shape]
    return np.pad(volume, pad, constant_values=value)


def pyramid_volumes(image: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """The padded normalised volume downsampled for each level, as (1, X, Y, Z, 1) arrays.

    `image` must already be padded to a multiple of 2^levels * 2^poolings, so level
    grids nest exactly and every level's grid is divisible by the U-Net's poolings.
    """
    return [
        box_downsample(image, downsample_factor(level, num_levels))[None, ..., None]
        for level in range(1, num_levels + 1)
    ]


def predict_levels(
    model: nn.Module,
    variables: Any,
    image_hu: np.ndarray,
    config: ml_collections.ConfigDict,
    plan: preprocess.Plan | None = None,
    options: Any = None,
    grid_shape: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Label maps of every pyramid level for a whole canonical volume, at its own grid.

    Without a `plan`, `image_hu` is a canonical HU volume normalised with the config's
    window; with one, it is already preprocessed by that plan. By default each level is
    one tile over its whole grid (one forward pass of the pyramid); `options`
    (inference.TilingOptions) slides smaller tiles instead. `grid_shape` puts the labels
    on another grid of the same extent (the scan's canonical grid) instead.
    """
    # Imported here: inference builds on this module's padding and pyramid volumes.
    from autocontext_jax import inference

    multiple = 2**config.pyramid.levels * 2**config.model.num_poolings
    if options is None:
        whole = max(n + (-n % multiple) for n in image_hu.shape) // 2
        options = inference.TilingOptions(tile_size=whole, weighting="constant")
    if plan is None:
        pad_value = normalized_pad_value(config.data)
        image = normalize_hu(image_hu, config.data)
    else:
        pad_value, image = plan.pad_value, image_hu
    probs = inference.predict_pyramid(model, variables, image, pad_value, options)
    return [
        inference.upsample_to_native(
            p, downsample_factor(s, len(probs)), image_hu.shape, grid_shape=grid_shape
        )
        for s, p in enumerate(probs, start=1)
    ]


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes 1..K-1; a class absent from both maps scores 1, from one map 0."""
    return np.asarray(
        [metrics.dice(prediction == k, reference == k) for k in range(1, num_classes)]
    )


def predict_case(
    model: nn.Module,
    variables: Any,
    case: dataset_lib.Case,
    config: ml_collections.ConfigDict,
    plan: preprocess.Plan,
) -> list[np.ndarray]:
    """Every level's labels of a case, preprocessed as in training, on its canonical grid."""
    image, geometry = preprocess.preprocess_canonical(case.image, case.geometry, plan)
    # Probabilities go straight to the canonical grid, resampled once.
    return predict_levels(
        model, variables, image, config, plan, grid_shape=geometry.canonical_shape
    )


def evaluate_cases(
    model: nn.Module,
    variables: Any,
    files: Sequence[dataset_lib.CaseFiles],
    config: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """Per-case, per-level, per-class Dice, HD95 (mm) and NSD of the pyramid on `files`.

    The result maps each metric name to {"level_s": [[one value per class] per case]}.
    """
    num_classes = config.model.num_classes
    tolerance = config.eval.nsd_tolerance_mm
    levels = [f"level_{s}" for s in range(1, config.pyramid.levels + 1)]
    per_metric = {name: {level: [] for level in levels} for name in metrics.METRIC_NAMES}
    # The transform training used; metrics are taken on the scan's own (canonical) grid.
    plan = preprocess.load_plan(config.data)
    for case_files in tqdm.tqdm(files, desc="evaluate", leave=False):
        case = dataset_lib.load_case(
            case_files, num_classes, config.data.label_map, config.data.unmapped_labels
        )
        predictions = predict_case(model, variables, case, config, plan)
        for level, labels in zip(levels, predictions, strict=True):
            scores = metrics.case_metrics(
                labels, case.label, num_classes, case.geometry.spacing, tolerance
            )
            for name in metrics.METRIC_NAMES:
                per_metric[name][level].append(scores[name])
    return {
        "case_ids": [f.case_id for f in files],
        "classes": list(class_names(num_classes)[1:]),
        "nsd_tolerance_mm": tolerance,
        **per_metric,
    }


def mean_scores(result: dict[str, Any]) -> dict[str, float]:
    """Mean over cases of every metric, level and class, named `metric/level_s/class`."""
    scalars = {}
    for name in metrics.METRIC_NAMES:
        for level, scores in result.get(name, {}).items():
            means = np.mean(np.asarray(scores, np.float64), axis=0)
            for class_name, value in zip(result["classes"], means, strict=True):
                scalars[f"{name}/{level}/{class_name}"] = float(value)
            scalars[f"{name}/{level}/average"] = float(means.mean())
    return scalars


def prediction_panel(
    model: nn.Module,
    variables: Any,
    case_files: dataset_lib.CaseFiles,
    config: ml_collections.ConfigDict,
    plane: str,
) -> np.ndarray:
    """The middle `plane` slice of a case: CT, reference and each level, as one RGB row."""
    case = dataset_lib.load_case(
        case_files, config.model.num_classes, config.data.label_map, config.data.unmapped_labels
    )
    predictions = predict_case(model, variables, case, config, preprocess.load_plan(config.data))
    return visualize.panel(case.image, case.label, predictions, config.model.num_classes, plane)


def summarize(scores: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
    """Avg, Std, Min, Max over cases of each class and of the per-case class average."""
    table = np.asarray(scores, dtype=np.float64)
    table = np.concatenate([table, table.mean(axis=1, keepdims=True)], axis=1)
    return {
        "Avg": table.mean(axis=0),
        "Std": table.std(axis=0),
        "Min": table.min(axis=0),
        "Max": table.max(axis=0),
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """{metric: {level: {row: {class or "Avg.": value}}}} of every metric in `result`."""
    columns = [*result["classes"], "Avg."]
    return {
        name: {
            level: {
                row: dict(zip(columns, values.tolist(), strict=True))
                for row, values in summarize(scores).items()
            }
            for level, scores in result[name].items()
        }
        for name in metrics.METRIC_NAMES
        if name in result
    }


def _metric_heading(name: str, result: dict[str, Any]) -> str:
    if name == "nsd":
        return f"NSD@{result['nsd_tolerance_mm']:g}mm (%)"
    return METRIC_HEADINGS[name]


def _format(name: str, value: float) -> str:
    return f"{value:.2f}" if name == "hd95" else f"{100 * value:.1f}"


def metric_table(result: dict[str, Any], name: str = "dice") -> str:
    """Markdown tables of one metric per level (Dice and NSD in %), as in Table 1 of the paper."""
    header = [_metric_heading(name, result), *result["classes"], "Avg."]
    lines = []
    for level, scores in result[name].items():
        rows = summarize(scores)
        lines.append(f"\n{level.replace('_', ' ').capitalize()} ({len(scores)} held-out cases)\n")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in SUMMARY_ROWS:
            cells = [_format(name, v) for v in rows[row]]
            lines.append("| " + " | ".join([row, *cells]) + " |")
    return "\n".join(lines) + "\n"


def dice_table(result: dict[str, Any]) -> str:
    """Markdown tables of Dice (%) per level, as in Table 1 of the paper."""
    return metric_table(result, "dice")


def summary_markdown(result: dict[str, Any]) -> str:
    """Every metric's Table-1-style tables, one section per metric."""
    sections = [
        f"## {_metric_heading(name, result)}\n{metric_table(result, name)}"
        for name in metrics.METRIC_NAMES
        if name in result
    ]
    return "\n".join(sections)


def summary_csv(result: dict[str, Any]) -> str:
    """The summary as CSV rows: metric, level, statistic, one column per class, Avg."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["metric", "level", "statistic", *result["classes"], "Avg."])
    for name, levels in summary(result).items():
        for level, rows in levels.items():
            for row in SUMMARY_ROWS:
                writer.writerow([name, level, row, *(f"{v:.6g}" for v in rows[row].values())])
    return stream.getvalue()


def write_report(
    workdir: str | pathlib.Path, result: dict[str, Any], files: Sequence[dataset_lib.CaseFiles]
) -> None:
    """Write eval_cases.json (per case) and eval_summary.{md,csv,json} into `workdir`."""
    workdir = pathlib.Path(workdir)
    (workdir / "eval_cases.json").write_text(json.dumps(result, indent=2) + "\n")
    (workdir / "eval_summary.md").write_text(summary_markdown(result))
    (workdir / "eval_summary.csv").write_text(summary_csv(result))
    (workdir / "eval_summary.json").write_text(json.dumps(summary(result), indent=2) + "\n")


def load_run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The resolved config a run saved in WORKDIR/config.json."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is {workdir} a training workdir?")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    # Runs saved before the surface metrics existed lack the tolerance.
    if "nsd_tolerance_mm" not in config.eval:
        config.eval.nsd_tolerance_mm = DEFAULT_NSD_TOLERANCE_MM
    return config


def held_out_cases(
    workdir: str | pathlib.Path, config: ml_collections.ConfigDict, data_dir: str | None
) -> list[dataset_lib.CaseFiles]:
    """Every case of `data_dir` when given, else the run's held-out cases (split.json)."""
    if data_dir is not None:
        return dataset_lib.list_cases(data_dir)
    split_path = pathlib.Path(workdir) / "split.json"
    if not split_path.is_file():
        raise FileNotFoundError(f"{split_path}: no split.json; pass --data DIR to choose cases")
    held_out = json.loads(split_path.read_text())["val"]
    by_id = {f.case_id: f for f in dataset_lib.list_cases(config.data.dir)}
    missing = sorted(set(held_out) - set(by_id))
    if missing:
        raise dataset_lib.DatasetError(
            f"{split_path}: held-out cases {missing} are not in {config.data.dir}/dataset.json"
        )
    return [by_id[case_id] for case_id in held_out]


def restore_run(workdir: str | pathlib.Path) -> tuple[ml_collections.ConfigDict, Any, Any, int]:
    """(config, model, evaluation variables, step) of the latest checkpoint of a run."""
    # train imports this module for the end-of-run evaluation.
    from autocontext_jax import checkpointing, parallel, train
    from autocontext_jax.models import build_pyramid

    config = load_run_config(workdir)
    model = build_pyramid(config)
    optimizer = train.make_optimizer(config.train)
    mesh = parallel.make_mesh()
    target = train.abstract_train_state(model, optimizer, config.seed, parallel.replicated(mesh))
    manager = checkpointing.make_manager(workdir, config)
    state, step = checkpointing.restore_latest(manager, target)
    manager.close()
    if step is None:
        raise FileNotFoundError(f"{pathlib.Path(workdir) / 'checkpoints'}: no checkpoint")
    return config, model, train.evaluation_variables(state, config.train), step


def evaluate_workdir(
    workdir: str | pathlib.Path, data_dir: str | None = None, tolerance_mm: float | None = None
) -> dict[str, Any]:
    """Evaluate the latest checkpoint of a run and write its reports into the workdir."""
    config, model, variables, step = restore_run(workdir)
    if tolerance_mm is not None:
        config.eval.nsd_tolerance_mm = tolerance_mm
    files = held_out_cases(workdir, config, data_dir)
    result = evaluate_cases(model, variables, files, config)
    result["step"] = step
    if jax.process_index() == 0:
        write_report(workdir, result, files)
    return result


def main(argv: list[str]) -> None:
    """Evaluate a finished (or running) training workdir."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        result = evaluate_workdir(_WORKDIR.value, _DATA.value, _TOLERANCE.value)
    except (FileNotFoundError, dataset_lib.DatasetError) as error:
        sys.exit(f"Cannot evaluate: {error}")
    print(summary_markdown(result))
    print(f"Wrote eval_cases.json and eval_summary.{{md,csv,json}} into {_WORKDIR.value}")


if __name__ == "__main__":
    # Defined here, not at import: main.py (which imports this module) owns --workdir too.
    _WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
    _DATA = flags.DEFINE_string(
        "data", None, "Evaluate every case of this dataset instead of the run's held-out cases."
    )
    _TOLERANCE = flags.DEFINE_float(
        "nsd_tolerance_mm", None, "Surface Dice tolerance in mm (default: the run's config)."
    )
    app.run(main)
