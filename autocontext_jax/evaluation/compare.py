"""Evaluated runs side by side, per organ and level, with paired Wilcoxon p-values.

    autocontext compare RUN_A RUN_B ... [--metric dice] [--all_levels]

Each RUN is a workdir holding eval_cases.json (written at the end of training or by
`autocontext evaluate`). The first column is the baseline: every other
column's p-value is the two-sided Wilcoxon signed-rank test of its per-case values against
the baseline's on the same cases (scipy.stats.wilcoxon, exact for small samples).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

from autocontext_jax.evaluation.reports import CASES_FILE, METRIC_HEADINGS


class ComparisonError(ValueError):
    """Runs that cannot be compared; the message names the run and the problem."""


@dataclasses.dataclass(frozen=True)
class Column:
    """One level of one run: per-case values, (cases, classes + average)."""

    name: str
    case_ids: tuple[str, ...]
    values: np.ndarray


def load_result(workdir: str | pathlib.Path) -> dict[str, Any]:
    """The per-case evaluation a run wrote into WORKDIR/eval_cases.json."""
    path = pathlib.Path(workdir) / CASES_FILE
    if not path.is_file():
        raise ComparisonError(
            f"{path}: missing; evaluate the run first (autocontext evaluate --workdir {workdir})"
        )
    return json.loads(path.read_text())


def paired_wilcoxon(baseline: Sequence[float], other: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples; 1 when they never differ."""
    differences = np.asarray(other, np.float64) - np.asarray(baseline, np.float64)
    # scipy drops zero differences and has no answer when none are left.
    if not np.any(differences != 0):
        return 1.0
    return float(scipy.stats.wilcoxon(baseline, other).pvalue)


def run_columns(
    name: str, result: Mapping[str, Any], metric: str, all_levels: bool
) -> list[Column]:
    """The run's finest level (or every level) as columns of per-case values plus average."""
    if metric not in result:
        raise ComparisonError(f"{name}: {CASES_FILE} has no {metric!r} scores")
    levels = sorted(result[metric], key=lambda level: int(level.rsplit("_", 1)[1]))
    columns = []
    for level in levels if all_levels else levels[-1:]:
        values = np.asarray(result[metric][level], np.float64)
        values = np.concatenate([values, values.mean(axis=1, keepdims=True)], axis=1)
        label = f"{name} {level.replace('_', ' ')}" if all_levels else name
        columns.append(Column(label, tuple(result["case_ids"]), values))
    return columns


def compare(
    results: Mapping[str, Mapping[str, Any]], metric: str = "dice", all_levels: bool = False
) -> dict[str, Any]:
    """Mean, std and p-value against the first column of every column, per class.

    Returns {"classes", "columns", "cases", "mean", "std", "p_value"}, the last three as
    (columns, classes + 1) lists; the baseline's p-values are None.
    """
    if not results:
        raise ComparisonError("no runs to compare")
    classes = None
    columns: list[Column] = []
    for name, result in results.items():
        if classes is not None and list(result["classes"]) != classes:
            raise ComparisonError(f"{name}: classes {result['classes']} differ from {classes}")
        classes = list(result["classes"])
        columns.extend(run_columns(name, result, metric, all_levels))
    baseline = columns[0]
    for column in columns[1:]:
        if set(column.case_ids) != set(baseline.case_ids):
            raise ComparisonError(
                f"{column.name}: evaluated on other cases than {baseline.name}; "
                "a paired test needs the same cases (evaluate both with --data DIR)"
            )
    order = {case_id: i for i, case_id in enumerate(baseline.case_ids)}

    def aligned(column: Column) -> np.ndarray:
        return column.values[np.argsort([order[c] for c in column.case_ids])]

    table = [aligned(column) for column in columns]
    p_values = [[None] * table[0].shape[1]] + [
        [paired_wilcoxon(table[0][:, k], values[:, k]) for k in range(values.shape[1])]
        for values in table[1:]
    ]
    return {
        "metric": metric,
        "classes": [*classes, "Avg."],
        "columns": [column.name for column in columns],
        "cases": len(baseline.case_ids),
        "mean": [values.mean(axis=0).tolist() for values in table],
        "std": [values.std(axis=0).tolist() for values in table],
        "p_value": p_values,
    }


def _cell(metric: str, mean: float, std: float, p_value: float | None) -> str:
    scale, digits = (1.0, 2) if metric == "hd95" else (100.0, 1)
    text = f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
    return text if p_value is None else f"{text} (p={p_value:.3g})"


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """One Markdown table: a row per class, a column per run (mean ± std, p vs the first)."""
    metric = comparison["metric"]
    heading = METRIC_HEADINGS[metric]
    header = [heading, *comparison["columns"]]
    lines = [
        f"{heading}, mean ± std over {comparison['cases']} cases; p: paired Wilcoxon "
        f"signed-rank test against {comparison['columns'][0]}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for k, name in enumerate(comparison["classes"]):
        cells = [
            _cell(metric, mean[k], std[k], p[k])
            for mean, std, p in zip(
                comparison["mean"], comparison["std"], comparison["p_value"], strict=True
            )
        ]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"


def run_names(workdirs: Sequence[str]) -> list[str]:
    """Short unique names of workdirs: their folder names, or their paths when those clash."""
    names = [pathlib.Path(w).name for w in workdirs]
    return names if len(set(names)) == len(names) else list(workdirs)
