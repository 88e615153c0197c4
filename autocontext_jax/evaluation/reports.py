"""Per-organ metric tables of an evaluation, as in Table 1 of the paper: Markdown, CSV, JSON."""

from __future__ import annotations

import csv
import io
import math
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from autocontext_jax.data.atomic import write_json_atomically, write_text_atomically
from autocontext_jax.evaluation.metrics import METRIC_NAMES

SUMMARY_ROWS = ("Avg", "Std", "Min", "Max")
METRIC_HEADINGS = {"dice": "Dice (%)", "hd95": "HD95 (mm)", "nsd": "NSD (%)"}
# The per-case evaluation a run keeps in its workdir (compare and sweeps read it).
CASES_FILE = "eval_cases.json"


def mean_scores(result: dict[str, Any]) -> dict[str, float]:
    """Mean over cases of every metric, level and class, named `metric/level_s/class`."""
    scalars = {}
    for name in METRIC_NAMES:
        for level, scores in result.get(name, {}).items():
            means = np.mean(np.asarray(scores, np.float64), axis=0)
            for class_name, value in zip(result["classes"], means, strict=True):
                scalars[f"{name}/{level}/{class_name}"] = float(value)
            scalars[f"{name}/{level}/average"] = float(means.mean())
    return scalars


def summarize(scores: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
    """Avg, Std, Min, Max over cases of each class and of the per-case class average.

    A class the references do not label is NaN in every case (folders.folder_result): its
    rows stay NaN (a dash, null in JSON) and the per-case average leaves it out.
    """
    table = np.asarray(scores, dtype=np.float64)
    if not np.isnan(table).any():
        table = np.concatenate([table, table.mean(axis=1, keepdims=True)], axis=1)
        return {
            "Avg": table.mean(axis=0),
            "Std": table.std(axis=0),
            "Min": table.min(axis=0),
            "Max": table.max(axis=0),
        }
    with warnings.catch_warnings():
        # All-NaN columns (not labelled) are meant to stay NaN, without numpy's warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        table = np.concatenate([table, np.nanmean(table, axis=1, keepdims=True)], axis=1)
        return {
            "Avg": np.nanmean(table, axis=0),
            "Std": np.nanstd(table, axis=0),
            "Min": np.nanmin(table, axis=0),
            "Max": np.nanmax(table, axis=0),
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
        for name in METRIC_NAMES
        if name in result
    }


def _metric_heading(name: str, result: dict[str, Any]) -> str:
    if name == "nsd":
        return f"NSD@{result['nsd_tolerance_mm']:g}mm (%)"
    return METRIC_HEADINGS[name]


def _format(name: str, value: float) -> str:
    if math.isnan(value):
        return "-"  # not labelled in the references
    return f"{value:.2f}" if name == "hd95" else f"{100 * value:.1f}"


def not_labelled_line(result: dict[str, Any]) -> str:
    """The sentence naming the structures the references do not label; "" when none."""
    missing = result.get("not_labelled") or []
    if not missing:
        return ""
    return (
        f"Not labelled in the references (shown as -, left out of every average): "
        f"{', '.join(missing)}"
    )


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
    if not_labelled_line(result):
        lines.append(f"\n{not_labelled_line(result)}")
    return "\n".join(lines) + "\n"


def dice_table(result: dict[str, Any]) -> str:
    """Markdown tables of Dice (%) per level, as in Table 1 of the paper."""
    return metric_table(result, "dice")


def summary_markdown(result: dict[str, Any]) -> str:
    """Every metric's Table-1-style tables, one section per metric."""
    sections = [
        f"## {_metric_heading(name, result)}\n{metric_table(result, name)}"
        for name in METRIC_NAMES
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
                values = ("" if math.isnan(v) else f"{v:.6g}" for v in rows[row].values())
                writer.writerow([name, level, row, *values])
    return stream.getvalue()


def write_report(workdir: str | pathlib.Path, result: dict[str, Any]) -> None:
    """Write eval_cases.json (per case) and eval_summary.{md,csv,json} into `workdir`."""
    workdir = pathlib.Path(workdir)
    write_json_atomically(workdir / CASES_FILE, result)
    write_text_atomically(workdir / "eval_summary.md", summary_markdown(result))
    write_text_atomically(workdir / "eval_summary.csv", summary_csv(result))
    write_json_atomically(workdir / "eval_summary.json", summary(result))
