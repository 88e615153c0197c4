"""The ablation report: pyramid depth x context mode x seed on one split, with its statistics.

Every run's per-case, per-class Dice (its eval_cases.json) is grouped by (mode, depth,
level). Per organ and level the report gives the mean over cases of each seed, then the
mean ± sample std of those over seeds. Each comparison pairs the finest level of two
groups case by case and seed by seed (seed s of one against seed s of the other, on the
same held-out case) and tests the differences with a two-sided Wilcoxon signed-rank test
(`scipy.stats.wilcoxon`) or a paired t-test (`scipy.stats.ttest_rel`) over those
case x seed pairs. The pairs of one case under several seeds are not independent, so the
p-values lean optimistic; the seed std beside them shows how much a verdict rests on one
seed. Holm's step-down correction then controls the family-wise error over every
comparison and organ of the report at `alpha`.

Comparisons: every mode against the baseline mode at each depth, and the finest level of
every deeper pyramid against a one-level pyramid (one U-Net at the same resolution).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

TESTS = ("wilcoxon", "ttest")
SINGLE = "single"  # the mode name of a one-level pyramid, which has no context
AVERAGE = "Avg."


class AblationError(ValueError):
    """Runs that cannot make a report; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class AblationRun:
    """One trained and evaluated run of the grid."""

    levels: int
    mode: str
    seed: int
    result: Mapping[str, Any]  # eval_cases.json


Key = tuple[str, int, int]  # (mode, pyramid depth, level)


def group_dice(
    runs: Sequence[AblationRun],
) -> tuple[dict[Key, dict[int, np.ndarray]], list[str], list[str]]:
    """{(mode, depth, level): {seed: (cases, classes) Dice}}, the case ids and the classes.

    Every run must have been evaluated on the same cases with the same classes.
    """
    if not runs:
        raise AblationError("no evaluated run to report on")
    cases, classes = list(runs[0].result["case_ids"]), list(runs[0].result["classes"])
    groups: dict[Key, dict[int, np.ndarray]] = {}
    for run in runs:
        name = f"levels={run.levels} mode={run.mode} seed={run.seed}"
        if list(run.result["classes"]) != classes:
            raise AblationError(f"{name}: classes {run.result['classes']} differ from {classes}")
        if sorted(run.result["case_ids"]) != sorted(cases):
            raise AblationError(f"{name}: evaluated on other cases than the first run")
        order = [list(run.result["case_ids"]).index(case) for case in cases]
        mode = SINGLE if run.levels == 1 else run.mode
        for level, values in run.result["dice"].items():
            key = (mode, run.levels, int(level.rsplit("_", 1)[1]))
            groups.setdefault(key, {})[run.seed] = np.asarray(values, np.float64)[order]
    return groups, cases, classes


def _with_average(values: np.ndarray) -> np.ndarray:
    return np.concatenate([values, values.mean(axis=-1, keepdims=True)], axis=-1)


def seed_summary(per_seed: Mapping[int, np.ndarray]) -> dict[str, list[float]]:
    """Mean and sample std (ddof 1; 0 for one seed) over seeds of each seed's case mean."""
    means = np.stack([_with_average(v).mean(axis=0) for v in per_seed.values()])
    std = means.std(axis=0, ddof=1) if len(means) > 1 else np.zeros(means.shape[1])
    return {"mean": means.mean(axis=0).tolist(), "std": std.tolist()}


def paired_p_value(baseline: np.ndarray, other: np.ndarray, test: str = "wilcoxon") -> float:
    """Two-sided p-value of paired samples; 1 when they never differ."""
    baseline, other = np.ravel(baseline), np.ravel(other)
    differences = other - baseline
    if not np.any(differences != 0):
        return 1.0
    if test == "wilcoxon":
        return float(scipy.stats.wilcoxon(other, baseline).pvalue)
    if test == "ttest":
        if np.all(differences == differences[0]):
            return 0.0  # a constant non-zero difference: no variance to test against
        return float(scipy.stats.ttest_rel(other, baseline).pvalue)
    raise AblationError(f"unknown test {test!r}; one of {TESTS}")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: the i-th smallest times (m - i), kept monotone."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(np.argsort(p_values, kind="stable")):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def _pairs(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray]) -> tuple[np.ndarray, ...]:
    seeds = sorted(set(a) & set(b))
    return np.stack([_with_average(a[s]) for s in seeds]), np.stack(
        [_with_average(b[s]) for s in seeds]
    )


def comparison_pairs(groups: Mapping[Key, Any], baseline_mode: str) -> list[tuple[Key, Key]]:
    """(other, baseline) pairs of finest levels: modes vs `baseline_mode`, pyramids vs one U-Net."""
    finest = sorted(key for key in groups if key[1] == key[2])
    pairs = []
    for key in finest:
        mode, depth, _ = key
        base = (baseline_mode, depth, depth)
        if depth > 1 and mode != baseline_mode and base in groups:
            pairs.append((key, base))
    single = (SINGLE, 1, 1)
    if single in groups:
        pairs += [(key, single) for key in finest if key[1] > 1]
    return pairs


def ablation_report(
    runs: Sequence[AblationRun],
    baseline_mode: str = "none",
    test: str = "wilcoxon",
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The grouped summaries and every comparison, with raw and Holm-adjusted p-values."""
    if test not in TESTS:
        raise AblationError(f"unknown test {test!r}; one of {TESTS}")
    groups, cases, classes = group_dice(runs)
    organs = [*classes, AVERAGE]
    summaries = [
        {"mode": k[0], "depth": k[1], "level": k[2], "seeds": sorted(v), **seed_summary(v)}
        for k, v in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0], item[0][2]))
    ]
    comparisons = []
    for other, base in comparison_pairs(groups, baseline_mode):
        o, b = _pairs(groups[other], groups[base])
        for k, organ in enumerate(organs):
            comparisons.append(
                {
                    "mode": other[0],
                    "depth": other[1],
                    "baseline_mode": base[0],
                    "baseline_depth": base[1],
                    "organ": organ,
                    "pairs": int(o[..., k].size),
                    "difference": float((o[..., k] - b[..., k]).mean()),
                    "p_value": paired_p_value(b[..., k], o[..., k], test),
                }
            )
    for comparison, adjusted in zip(
        comparisons, holm([c["p_value"] for c in comparisons]), strict=True
    ):
        comparison["p_holm"] = adjusted
        comparison["significant"] = adjusted < alpha
    return {
        "classes": organs,
        "cases": cases,
        "test": test,
        "alpha": alpha,
        "baseline_mode": baseline_mode,
        "summaries": summaries,
        "comparisons": comparisons,
    }


def _name(mode: str, depth: int) -> str:
    return "one U-Net (levels=1)" if mode == SINGLE else f"{mode} at level {depth}"


def comparison_name(comparison: Mapping[str, Any]) -> str:
    """`end_to_end vs none at level 2`, or `separate at level 2 vs one U-Net (levels=1)`."""
    if comparison["baseline_mode"] == SINGLE:
        return f"{_name(comparison['mode'], comparison['depth'])} vs {_name(SINGLE, 1)}"
    return f"{comparison['mode']} vs {comparison['baseline_mode']} at level {comparison['depth']}"


def verdict(comparison: Mapping[str, Any]) -> str:
    """One sentence: "end_to_end vs none at level 2 (Avg.): +1.5 Dice, p = ..., significant"."""
    outcome = "significant" if comparison["significant"] else "not significant"
    return (
        f"{comparison_name(comparison)} ({comparison['organ']}): "
        f"{100 * comparison['difference']:+.1f} Dice, p = {comparison['p_value']:.3g} "
        f"(Holm {comparison['p_holm']:.3g}), {outcome}"
    )


def ablation_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the verdicts, then Dice per group and organ, then every test."""
    test = {"wilcoxon": "Wilcoxon signed-rank", "ttest": "paired t"}[report["test"]]
    organs = report["classes"]
    averages = [c for c in report["comparisons"] if c["organ"] == AVERAGE]
    lines = [
        "# Ablation",
        "",
        f"{len(report['cases'])} held-out cases. Dice (%): per seed the mean over cases, then "
        "mean ± std (ddof 1) over seeds. Tests: two-sided "
        f"{test} over case x seed pairs of the finest levels, Holm-corrected over all "
        f"{len(report['comparisons'])} tests below at alpha = {report['alpha']:g}.",
        "",
        "## Verdicts (average over organs)",
        "",
        *(f"- {verdict(c)}" for c in averages),
        "",
        "## Dice (%) per organ",
        "",
        "| mode | depth | level | seeds | " + " | ".join(organs) + " |",
        "|" + "---|" * (4 + len(organs)),
    ]
    for row in report["summaries"]:
        cells = [
            f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(row["mean"], row["std"], strict=True)
        ]
        seeds = ",".join(str(s) for s in row["seeds"])
        lines.append(
            f"| {row['mode']} | {row['depth']} | {row['level']} | {seeds} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "## Every test",
        "",
        "| comparison | organ | pairs | difference | p | p (Holm) | significant |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["comparisons"]:
        lines.append(
            f"| {comparison_name(c)} | {c['organ']} | {c['pairs']} | "
            f"{100 * c['difference']:+.1f} | {c['p_value']:.3g} | {c['p_holm']:.3g} | "
            f"{'yes' if c['significant'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"
