"""Diagnostics of the context: whether the finest level uses it, and whether training differs.

On every held-out case the finest level runs on four contexts in turn:

- `real`: the coarser level's blended softmax, exactly as `inference.segment` computes it
  (its Dice is the evaluation's);
- `ground_truth`: the reference labels resampled as training targets are, class fractions
  per block of the coarser level's grid (`data.sampling.class_fractions`): what a perfect
  coarser level would give;
- `uniform`: 1/K everywhere: no information at all;
- `training_mode`: the coarser levels computed as the train step computes them, with each
  batch's own BatchNorm statistics (tiles of the training crop, batches of
  `train.batch_size`) and the last, not averaged, parameters.

Then the Dice of every level on training and on held-out cases (in-sample against
out-of-sample context). Each case is scored on the scan's own grid, as `evaluate` does.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.atomic import write_json_atomically, write_text_atomically
from autocontext_jax.data.preprocess import preprocess_scan
from autocontext_jax.data.resample import resample_labels
from autocontext_jax.data.sampling import class_fractions, downsample_factor
from autocontext_jax.evaluation.evaluate import dice_per_class, held_out_cases, load_case
from autocontext_jax.inference import Run, TilingOptions, default_options, upsample_to_native
from autocontext_jax.inference.pyramid import pad_to_multiple, pyramid_volumes
from autocontext_jax.inference.tiling import level_variables, predict_level
from autocontext_jax.models import context
from autocontext_jax.runtime import parallel
from autocontext_jax.runtime.progress import interactive
from autocontext_jax.training.state import restore_evaluation_variables

CONTEXTS = ("real", "ground_truth", "uniform", "training_mode")
MARKDOWN_FILE = "diagnose.md"
JSON_FILE = "diagnose.json"
# predict_level's signature: (model, variables, image, coarse_probs, pad_value, options,
# mesh, progress=None, batch_statistics=False) -> blended softmax of the level.
LevelFunction = Callable[..., np.ndarray]


class DiagnoseError(ValueError):
    """A run that cannot be diagnosed; the message names it and why."""


def ground_truth_context(
    labels: np.ndarray, num_levels: int, num_classes: int, padding_multiple: int
) -> np.ndarray:
    """One-hot of labels on the preprocessed grid, on the grid of the level below the finest.

    The labels are padded as the pyramid pads the image (background) and averaged per
    block into class fractions, as the sampler makes that level's training targets.
    """
    padded = pad_to_multiple(labels, padding_multiple, 0)
    return class_fractions(padded, downsample_factor(num_levels - 1, num_levels), num_classes)


def _training_mode_options(run: Run) -> TilingOptions:
    # Tiles of the training crop in batches of the training batch, on one device, so each
    # batch's statistics are those of a training batch of that many crops.
    return TilingOptions(
        tile_size=run.config.data.crop_size, tiles_per_batch=run.config.train.batch_size
    )


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What the diagnostics need besides the run: the last parameters and the tiling."""

    live_variables: dict[str, Any]
    options: TilingOptions
    level_function: LevelFunction = predict_level


def make_diagnosis(run: Run, level_function: LevelFunction = predict_level) -> Diagnosis:
    """Read the run's last (not averaged) parameters beside its evaluated ones."""
    sharding = parallel.replicated(parallel.make_mesh())
    # load_run read this checkpoint already and gave its notes.
    live, _ = restore_evaluation_variables(
        run.workdir,
        run.model,
        run.config.train,
        sharding,
        run.step,
        live=True,
        note_unchecked=False,
    )
    return Diagnosis(live, default_options(run.config), level_function)


def coarser_outputs(
    run: Run,
    diagnosis: Diagnosis,
    variables: dict[str, Any],
    volumes: list[np.ndarray],
    options: TilingOptions,
    mesh: jax.sharding.Mesh,
    batch_statistics: bool = False,
) -> list[np.ndarray]:
    """The blended softmax of levels 1 .. S-1, coarse to fine, as predict_pyramid chains them."""

    def run_level(level: int, coarser: np.ndarray | None) -> np.ndarray:
        return diagnosis.level_function(
            run.model,
            level_variables(variables, level),
            volumes[level - 1][0],
            coarser,
            run.plan.pad_value,
            options,
            mesh,
            batch_statistics=batch_statistics,
        )

    return context.coarse_to_fine(run.model.num_levels - 1, run.model.mode, run_level)


def diagnose_case(
    run: Run, diagnosis: Diagnosis, case: dataset_lib.Case, contexts: bool = True
) -> dict[str, Any]:
    """Per-class Dice of every level (real context), and with `contexts` of the finest on each.

    Returns {"levels": {"level_s": [Dice per class]}, "contexts": {name: [...]}}.
    """
    model, num_levels = run.model, run.model.num_levels
    volume, geometry = preprocess_scan(case.scan, run.plan)
    padded = pad_to_multiple(volume, model.padding_multiple, run.plan.pad_value)
    volumes = pyramid_volumes(padded, num_levels)
    mesh = parallel.make_local_mesh()
    variables = jax.tree.map(parallel.local_copy, run.variables)

    def finest(context: np.ndarray | None) -> np.ndarray:
        return diagnosis.level_function(
            model,
            level_variables(variables, num_levels),
            volumes[-1][0],
            context,
            run.plan.pad_value,
            diagnosis.options,
            mesh,
        )

    def dice(probs: np.ndarray, level: int) -> list[float]:
        labels = upsample_to_native(
            probs,
            downsample_factor(level, num_levels),
            volume.shape,
            True,
            grid_shape=geometry.canonical_shape,
        )
        return dice_per_class(labels, case.label, run.num_classes).tolist()

    coarse = coarser_outputs(run, diagnosis, variables, volumes, diagnosis.options, mesh)
    real = coarse[-1] if model.takes_context(num_levels) else None
    probs = [*coarse, finest(real)]
    result: dict[str, Any] = {
        "levels": {f"level_{s}": dice(p, s) for s, p in enumerate(probs, start=1)}
    }
    if not contexts or real is None:
        return result
    labels = resample_labels(case.label, geometry.preprocessed_shape, run.plan.label_interpolation)
    live = jax.tree.map(parallel.local_copy, diagnosis.live_variables)
    one_device = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), (parallel.DATA_AXIS,))
    training_mode = coarser_outputs(
        run, diagnosis, live, volumes, _training_mode_options(run), one_device, True
    )[-1]
    candidates = {
        "real": real,
        "ground_truth": ground_truth_context(
            labels, num_levels, run.num_classes, model.padding_multiple
        ),
        "uniform": np.full(real.shape, 1.0 / run.num_classes, np.float32),
        "training_mode": training_mode,
    }
    result["contexts"] = {
        name: result["levels"][f"level_{num_levels}"]
        if name == "real"
        else dice(finest(c), num_levels)
        for name, c in candidates.items()
    }
    return result


def diagnose_run(
    run: Run,
    held_out: Sequence[dataset_lib.CaseFiles],
    train: Sequence[dataset_lib.CaseFiles],
    level_function: LevelFunction = predict_level,
) -> dict[str, Any]:
    """The finest level's Dice by context on `held_out`, and every level's on both sets.

    Dice lists are [per case][per class]; "contexts" is absent for a run without context.
    """
    diagnosis = make_diagnosis(run, level_function)
    levels = [f"level_{s}" for s in range(1, run.model.num_levels + 1)]
    result: dict[str, Any] = {
        "workdir": str(run.workdir),
        "step": run.step,
        "classes": list(run.class_names[1:]),
        "held_out_cases": [f.case_id for f in held_out],
        "train_cases": [f.case_id for f in train],
        "levels": {"train": {n: [] for n in levels}, "held_out": {n: [] for n in levels}},
    }
    has_context = run.model.takes_context(run.model.num_levels)
    if has_context:
        result["contexts"] = {name: [] for name in CONTEXTS}
    for split, files in (("held_out", held_out), ("train", train)):
        for case_files in tqdm.tqdm(
            files, desc=f"diagnose {split}", leave=False, disable=not interactive()
        ):
            case = load_case(run, case_files)
            scores = diagnose_case(run, diagnosis, case, contexts=split == "held_out")
            for level, values in scores["levels"].items():
                result["levels"][split][level].append(values)
            for name, values in scores.get("contexts", {}).items():
                result["contexts"][name].append(values)
    return result


def _means(per_case: Sequence[Sequence[float]]) -> list[float]:
    table = np.asarray(per_case, np.float64)
    return [*table.mean(axis=0).tolist(), float(table.mean())]


def _row(name: str, values: Sequence[float]) -> str:
    return "| " + " | ".join([name, *(f"{100 * v:.1f}" for v in values)]) + " |"


def diagnosis_markdown(result: dict[str, Any]) -> str:
    """The two tables of a diagnosis, and what the differences of their rows measure."""
    header = ["", *result["classes"], "Avg."]
    rule = "|" + "---|" * len(header)
    finest = f"level_{len(result['levels']['held_out'])}"
    lines = [f"# Context diagnostics of {result['workdir']} (step {result['step']})", ""]
    if "contexts" in result:
        means = {name: _means(v) for name, v in result["contexts"].items()}
        lines += [
            f"Dice (%) of the finest level ({finest.replace('_', ' ')}) on "
            f"{len(result['held_out_cases'])} held-out cases, by the context it is given",
            "",
            "| " + " | ".join(["context", *header[1:]]) + " |",
            rule,
            *(_row(name, means[name]) for name in CONTEXTS),
            "",
        ]
        real = means["real"][-1]
        lines += [
            f"- real − uniform: {100 * (real - means['uniform'][-1]):+.1f} Dice points: how "
            "much the finest level uses its context",
            f"- ground_truth − real: {100 * (means['ground_truth'][-1] - real):+.1f}: what a "
            "perfect coarser level would add",
            f"- training_mode − real: {100 * (means['training_mode'][-1] - real):+.1f}: the "
            "context of training (batch statistics, last parameters) against evaluation's",
            "",
        ]
    else:
        lines += ["The finest level takes no context (pyramid.levels = 1 or mode none).", ""]
    lines += [
        f"Dice (%) of every level on {len(result['train_cases'])} training and "
        f"{len(result['held_out_cases'])} held-out cases (real context)",
        "",
        "| " + " | ".join(["level", *header[1:]]) + " |",
        rule,
    ]
    for level in result["levels"]["held_out"]:
        for split, label in (("train", "training"), ("held_out", "held-out")):
            if result["levels"][split][level]:
                name = f"{level.replace('_', ' ')}, {label}"
                lines.append(_row(name, _means(result["levels"][split][level])))
    return "\n".join(lines) + "\n"


def diagnose_workdir(run: Run, train_cases: int = 6) -> tuple[dict[str, Any], str]:
    """Diagnose a run on its held-out cases and first `train_cases` training cases.

    Writes WORKDIR/diagnose.json and diagnose.md (process 0); returns both contents.
    """
    held_out = held_out_cases(run)
    if not held_out:
        raise DiagnoseError(f"{run.workdir}: the run has no held-out case to diagnose")
    train_ids = dataset_lib.read_split(run.workdir)["train"][: max(train_cases, 0)]
    by_id = {f.case_id: f for f in dataset_lib.list_dataset(run.config.data)}
    train = [by_id[case_id] for case_id in train_ids if case_id in by_id]
    result = diagnose_run(run, held_out, train)
    text = diagnosis_markdown(result)
    if jax.process_index() == 0:
        workdir = pathlib.Path(run.workdir)
        write_json_atomically(workdir / JSON_FILE, result)
        write_text_atomically(workdir / MARKDOWN_FILE, text)
    return result, text
