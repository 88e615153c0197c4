"""Pictures of a run: slices with the reference and every level overlaid, training curves.

Writes WORKDIR/plots/CASE_axial.png, CASE_coronal.png and training_curves.png (the losses
with smoothing and the validation Dice of metrics.jsonl). The
predictions drawn are `inference.segment`'s, the labels `predict` writes. Needs
matplotlib (`pip install -e ".[plot]"`); training does not.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.labels import class_names
from autocontext_jax.data.sampling import downsample_factor
from autocontext_jax.evaluation import visualize
from autocontext_jax.evaluation.evaluate import held_out_cases, load_case
from autocontext_jax.evaluation.validation import CASES_KEY, DICE_PREFIX
from autocontext_jax.inference import Run, load_run, segment, with_host_lowering
from autocontext_jax.runtime.logs import METRICS_FILE
from autocontext_jax.runtime.progress import say

PLOTS_DIR = "plots"


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            'the plot command needs matplotlib: pip install -e ".[plot]" (or matplotlib)'
        ) from error
    return Figure


def slices_figure(
    case: dataset_lib.Case, predictions: Sequence[np.ndarray], num_classes: int, plane: str
):
    """A matplotlib Figure: CT, reference and each level's prediction on the middle slice."""
    figure_class = _figure_class()
    from matplotlib.patches import Patch

    levels = len(predictions)
    x, y, z = case.geometry.spacing
    # Displayed rows run along Y (axial) or Z (coronal), columns along X.
    aspect = (y if plane == "axial" else z) / x
    titles = ["CT", "reference"] + [
        f"level {s} (x{downsample_factor(s, levels)} down)" for s in range(1, levels + 1)
    ]
    labels = [None, case.label, *predictions]
    figure = figure_class(figsize=(3.2 * len(titles), 3.8), layout="constrained")
    axes = figure.subplots(1, len(titles))
    image = visualize.display_slice(case.image, plane)
    for ax, title, label in zip(axes, titles, labels, strict=True):
        if label is None:
            rgb = visualize.ct_to_grey(image)
        else:
            rgb = visualize.overlay(image, visualize.display_slice(label, plane), num_classes)
        ax.imshow(rgb, aspect=aspect, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    colours = visualize.class_colours(num_classes) / 255.0
    handles = [
        Patch(color=colours[k], label=name)
        for k, name in enumerate(class_names(num_classes))
        if k > 0
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 7))
    figure.suptitle(f"{case.case_id}, {plane} (middle slice; patient right on the left)")
    return figure


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, float]]:
    """The lines of WORKDIR/metrics.jsonl, in order."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: no training metrics")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: Sequence[float], weight: float = 0.8) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average with this weight."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count))
    return np.asarray(smoothed)


def curves_figure(records: Sequence[dict[str, float]], smoothing: float = 0.8):
    """A matplotlib Figure: losses, validation Dice, learning rate and steps/s against step.

    The losses are drawn raw (faint) and smoothed (`smooth`); the validation panel has
    the Dice (%) of every class and, bold, their average, at the steps validated.
    """
    figure_class = _figure_class()
    training = [r for r in records if "loss" in r]
    validation = [r for r in records if f"{DICE_PREFIX}/average" in r]
    steps = [r["step"] for r in training]
    figure = figure_class(figsize=(17, 4.2), layout="constrained")
    loss_ax, dice_ax, lr_ax, speed_ax = figure.subplots(1, 4)
    loss_names = ["loss"] + sorted(name for name in training[0] if name.startswith("loss_level_"))
    for name in loss_names:
        label = "total" if name == "loss" else f"level {name.rsplit('_', 1)[1]}"
        values = [r[name] for r in training]
        (line,) = loss_ax.plot(steps, smooth(values, smoothing), label=label)
        loss_ax.plot(steps, values, color=line.get_color(), alpha=0.25, linewidth=0.8)
    loss_ax.set(
        title=f"training loss (smoothed {smoothing:g}, raw faint)", xlabel="step", ylabel="loss"
    )
    loss_ax.legend()
    if validation:
        val_steps = [r["step"] for r in validation]
        names = [
            name.split("/", 1)[1]
            for name in validation[0]
            if name.startswith(f"{DICE_PREFIX}/") and not name.endswith("/average")
        ]
        for name in names:
            values = [100 * r[f"{DICE_PREFIX}/{name}"] for r in validation]
            dice_ax.plot(val_steps, values, marker=".", linewidth=1, label=name)
        values = [100 * r[f"{DICE_PREFIX}/average"] for r in validation]
        dice_ax.plot(val_steps, values, "k-o", linewidth=2.5, label="average")
        cases = int(validation[-1].get(CASES_KEY, 0))
        plural = "s" if cases != 1 else ""
        dice_ax.set_title(f"validation Dice, finest level ({cases} held-out case{plural})")
        dice_ax.legend(fontsize=7, ncols=2)
    else:
        dice_ax.set_title("validation Dice (none: eval.every = 0)")
    dice_ax.set(xlabel="step", ylabel="Dice (%)", ylim=(0, 100))
    lr_ax.plot(steps, [r["learning_rate"] for r in training])
    lr_ax.set(title="learning rate", xlabel="step", ylabel="learning rate")
    speed_ax.plot(steps, [r["steps_per_second"] for r in training])
    speed_ax.set(title="training speed", xlabel="step", ylabel="steps per second")
    return figure


def plot_case(
    run: Run, case_id: str | None = None, data_dir: str | os.PathLike | None = None
) -> tuple[dataset_lib.Case, list[np.ndarray]]:
    """(case, each level's labels) of a held-out case (default the first), as predict makes them."""
    files = held_out_cases(run, data_dir)
    if case_id is not None:
        files = [f for f in files if f.case_id == case_id]
        if not files:
            raise DatasetError(f"case {case_id!r} is not among the cases to plot")
    case = load_case(run, files[0])
    return case, segment(run, case.scan).levels


def plot_run(
    workdir: str | pathlib.Path,
    case_id: str | None = None,
    data_dir: str | os.PathLike | None = None,
    lowering_cache: str | os.PathLike = "",
) -> list[pathlib.Path]:
    """Write the slice and curve PNGs of a run into WORKDIR/plots; return their paths.

    `lowering_cache` holds this host's choice of convolution lowering
    (`inference.with_host_lowering`; '': the config's, untimed).
    """
    run = with_host_lowering(load_run(workdir), lowering_cache, say)
    case, predictions = plot_case(run, case_id, data_dir)
    out = run.workdir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    written = []
    for plane in ("axial", "coronal"):
        path = out / f"{case.case_id}_{plane}.png"
        slices_figure(case, predictions, run.num_classes, plane).savefig(path, dpi=120)
        written.append(path)
    path = out / "training_curves.png"
    curves_figure(read_metrics(run.workdir)).savefig(path, dpi=120)
    written.append(path)
    return written


def ablation_figure(report: dict, columns: int = 4):
    """Dice of the finest level against pyramid depth, one panel per organ, a line per mode.

    Error bars are the std over seeds; a one-level pyramid (no context) is every mode's
    point at depth 1.
    """
    organs = report["classes"]
    rows = -(-len(organs) // columns)
    figure = _figure_class()(figsize=(3.2 * columns, 2.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    finest = [row for row in report["summaries"] if row["level"] == row["depth"]]
    single = [row for row in finest if row["mode"] == "single"]
    modes = sorted({row["mode"] for row in finest} - {"single"})
    for k, (axis, organ) in enumerate(zip(axes, organs, strict=False)):
        for mode in modes:
            points = sorted(
                single + [row for row in finest if row["mode"] == mode],
                key=lambda row: row["depth"],
            )
            axis.errorbar(
                [row["depth"] for row in points],
                [100 * row["mean"][k] for row in points],
                yerr=[100 * row["std"][k] for row in points],
                marker="o",
                capsize=3,
                label=mode,
            )
        axis.set_title(organ)
        axis.set_xlabel("pyramid depth (levels)")
        axis.set_ylabel("Dice (%)")
        axis.set_xticks(sorted({row["depth"] for row in finest}))
    for axis in axes[len(organs) :]:
        axis.set_visible(False)
    axes[0].legend(fontsize="small")
    return figure
