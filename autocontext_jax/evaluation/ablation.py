"""The ablation report: pyramid depth x context mode x seed (x fold), with the case as the unit.

Every run's per-case, per-class Dice (its eval_cases.json) is grouped by (mode, depth,
level) and seed; the folds of a cross-validated grid join into one table in which every
case of the dataset is scored once, by the fold model that held it out. Per organ and level
the report gives each seed's mean over cases, then the mean ± sample std of those over
seeds (the seed-to-seed spread).

Each comparison pairs the finest level of two groups case by case: per case and structure
the Dice is first averaged over seeds, so a case counts once however many seeds were run
(the pairs of one case under several seeds are not independent). The differences over the
n cases get a two-sided Wilcoxon signed-rank test (`scipy.stats.wilcoxon`) or a paired
t-test (`scipy.stats.ttest_rel`), a seeded 95 % bootstrap interval of their mean, and
Holm's step-down correction over every comparison and organ of the report at `alpha`. The
smallest two-sided Wilcoxon p of n cases is 2/2^n: when Holm over m tests cannot bring it
below `alpha`, the report says so, since only more cases (not more seeds) can help.

A run that scored Dice 0 on every held-out case of a structure (a collapse) is named above
the verdicts. Today's pseudo-replicated tests (case x seed pairs) are kept in a section of
their own, for comparison only.

Comparisons: every mode against the baseline mode at each depth, and the finest level of
every deeper pyramid against a one-level pyramid (one U-Net at the same resolution).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

TESTS = ("wilcoxon", "ttest")
SINGLE = "single"  # the mode name of a one-level pyramid, which has no context
AVERAGE = "Avg."
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


class AblationError(ValueError):
    """Runs that cannot make a report; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class AblationRun:
    """One trained and evaluated run of the grid (`fold` -1: the one held-out split)."""

    levels: int
    mode: str
    seed: int
    result: Mapping[str, Any]  # eval_cases.json
    fold: int = -1

    @property
    def name(self) -> str:
        """`levels=2 mode=none seed=0` (`levels=1 seed=0`), ` fold=3` added for a fold run."""
        fold = f" fold={self.fold}" if self.fold >= 0 else ""
        mode = "" if self.levels == 1 else f" mode={self.mode}"  # one U-Net has no context
        return f"levels={self.levels}{mode} seed={self.seed}{fold}"


Key = tuple[str, int, int]  # (mode, pyramid depth, level)


def _group_mode(run: AblationRun) -> str:
    return SINGLE if run.levels == 1 else run.mode


def group_dice(
    runs: Sequence[AblationRun],
) -> tuple[dict[Key, dict[int, np.ndarray]], list[str], list[str]]:
    """{(mode, depth, level): {seed: (cases, classes) Dice}}, the case ids and the classes.

    The folds of one (depth, mode, seed) join into one table; every group and seed must
    cover the same cases, each once, with the same classes. Cases are in sorted order.
    """
    if not runs:
        raise AblationError("no evaluated run to report on")
    classes = list(runs[0].result["classes"])
    rows: dict[tuple[Key, int], dict[str, np.ndarray]] = {}
    names: dict[tuple[Key, int], str] = {}
    for run in runs:
        if list(run.result["classes"]) != classes:
            raise AblationError(
                f"{run.name}: classes {run.result['classes']} differ from {classes}"
            )
        for level, values in run.result["dice"].items():
            key = (_group_mode(run), run.levels, int(level.rsplit("_", 1)[1]))
            table = rows.setdefault((key, run.seed), {})
            names[(key, run.seed)] = run.name.split(" fold=")[0]
            for case, row in zip(run.result["case_ids"], values, strict=True):
                if case in table:
                    raise AblationError(
                        f"{run.name}: case {case} is scored twice in "
                        f"{names[(key, run.seed)]} (two runs held it out)"
                    )
                table[case] = np.asarray(row, np.float64)
    first = next(iter(rows))
    cases = sorted(rows[first])
    groups: dict[Key, dict[int, np.ndarray]] = {}
    for (key, seed), table in rows.items():
        if sorted(table) != cases:
            raise AblationError(
                f"{names[(key, seed)]}: evaluated on other cases than {names[first]} "
                f"({len(table)} against {len(cases)} cases; a fold missing?)"
            )
        groups.setdefault(key, {})[seed] = np.stack([table[case] for case in cases])
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


def smallest_p_value(cases: int, test: str = "wilcoxon") -> float:
    """The smallest two-sided p a test can give n paired cases, whatever their values.

    Wilcoxon: 2/2^n, all n differences non-zero and of one sign (exact distribution;
    scipy's normal approximation, used with ties or zeros, gives more). A paired t-test
    has no floor: 0.
    """
    if test != "wilcoxon":
        return 0.0
    return min(1.0, 2.0 / 2.0**cases)


def bootstrap_interval(
    differences: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `differences`, cases resampled (seeded)."""
    differences = np.ravel(np.asarray(differences, np.float64))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[picks].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: the i-th smallest times (m - i), kept monotone."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(np.argsort(p_values, kind="stable")):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


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


def collapses(runs: Sequence[AblationRun]) -> list[dict[str, Any]]:
    """Every run and level in which a structure scored Dice 0 on every held-out case."""
    found = []
    for run in runs:
        for level, values in sorted(run.result["dice"].items()):
            table = np.asarray(values, np.float64)
            for k, structure in enumerate(run.result["classes"]):
                if table.size and np.all(table[:, k] == 0):
                    found.append(
                        {
                            "run": run.name,
                            "level": int(level.rsplit("_", 1)[1]),
                            "structure": structure,
                            "cases": int(table.shape[0]),
                        }
                    )
    return found


def _by_seed(
    other: Mapping[int, np.ndarray], base: Mapping[int, np.ndarray], k: int
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The seeds both groups ran, and each group's organ column `k` as (seeds, cases)."""
    seeds = sorted(set(other) & set(base))
    o = np.stack([_with_average(other[s])[:, k] for s in seeds])
    b = np.stack([_with_average(base[s])[:, k] for s in seeds])
    return seeds, o, b


def _case_level_test(seeds: list[int], o: np.ndarray, b: np.ndarray, test: str) -> dict[str, Any]:
    """One case-level comparison of two (seeds, cases) tables of one organ column."""
    differences = o.mean(axis=0) - b.mean(axis=0)  # per case, each side's mean over seeds
    per_seed = (o - b).mean(axis=1)
    low, high = bootstrap_interval(differences)
    return {
        "seeds": seeds,
        "cases": int(differences.size),
        "difference": float(differences.mean()),
        "ci_low": low,
        "ci_high": high,
        "p_value": paired_p_value(b.mean(axis=0), o.mean(axis=0), test),
        "smallest_p": smallest_p_value(int(differences.size), test),
        "seed_std": float(per_seed.std(ddof=1)) if len(seeds) > 1 else 0.0,
    }


def ablation_report(
    runs: Sequence[AblationRun],
    baseline_mode: str = "none",
    test: str = "wilcoxon",
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The grouped summaries, the collapses and every comparison, case by case and Holm-adjusted.

    Each comparison also carries the pseudo-replicated p-value of case x seed pairs
    (`pseudo_p_value`, Holm over those: `pseudo_p_holm`) for comparison only.
    """
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
        for k, organ in enumerate(organs):
            seeds, o, b = _by_seed(groups[other], groups[base], k)
            comparisons.append(
                {
                    "mode": other[0],
                    "depth": other[1],
                    "baseline_mode": base[0],
                    "baseline_depth": base[1],
                    "organ": organ,
                    **_case_level_test(seeds, o, b, test),
                    # As reports did before, case x seed pairs: for contrast only.
                    "pseudo_pairs": int(o.size),
                    "pseudo_p_value": paired_p_value(b, o, test),
                }
            )
    m = len(comparisons)
    floor = min((c["smallest_p"] for c in comparisons), default=1.0)
    for c, adjusted, pseudo in zip(
        comparisons,
        holm([c["p_value"] for c in comparisons]),
        holm([c["pseudo_p_value"] for c in comparisons]),
        strict=True,
    ):
        c["p_holm"] = adjusted
        c["significant"] = adjusted < alpha
        # Holm multiplies the smallest p by m and never lowers a later one below it.
        c["smallest_p_holm"] = min(1.0, max(c["smallest_p"], m * floor))
        c["can_reach_significance"] = c["smallest_p_holm"] < alpha
        c["pseudo_p_holm"] = pseudo
        c["pseudo_significant"] = pseudo < alpha
    return {
        "classes": organs,
        "cases": cases,
        "test": test,
        "alpha": alpha,
        "baseline_mode": baseline_mode,
        "folds": sorted({run.fold for run in runs if run.fold >= 0}),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED},
        "collapses": collapses(runs),
        "summaries": summaries,
        "comparisons": comparisons,
    }


def cases_needed(tests: int, alpha: float) -> int:
    """The fewest cases whose smallest Wilcoxon p (2/2^n), times Holm's m, is below alpha."""
    return max(1, math.floor(math.log2(2 * tests / alpha)) + 1)


def _name(mode: str, depth: int) -> str:
    return "one U-Net (levels=1)" if mode == SINGLE else f"{mode} at level {depth}"


def comparison_name(comparison: Mapping[str, Any]) -> str:
    """`end_to_end vs none at level 2`, or `separate at level 2 vs one U-Net (levels=1)`."""
    if comparison["baseline_mode"] == SINGLE:
        return f"{_name(comparison['mode'], comparison['depth'])} vs {_name(SINGLE, 1)}"
    return f"{comparison['mode']} vs {comparison['baseline_mode']} at level {comparison['depth']}"


def _dice(value: float) -> str:
    return f"{100 * value:+.1f}"


def verdict(comparison: Mapping[str, Any]) -> str:
    """One sentence: `end_to_end vs none at level 2 (Avg.): +1.5 Dice [95 % CI +0.4, +2.6],
    p = ..., n = 20 cases`, the outcome and the seed-to-seed std of the difference."""
    c = comparison
    outcome = "significant" if c["significant"] else "not significant"
    if not c["can_reach_significance"]:
        outcome += f" (cannot reach significance at n = {c['cases']} after Holm)"
    spread = (
        f"; seed-to-seed std {100 * c['seed_std']:.1f} over {len(c['seeds'])} seeds"
        if len(c["seeds"]) > 1
        else "; one seed"
    )
    return (
        f"{comparison_name(c)} ({c['organ']}): {_dice(c['difference'])} Dice "
        f"[95 % CI {_dice(c['ci_low'])}, {_dice(c['ci_high'])}], p = {c['p_value']:.3g} "
        f"(Holm {c['p_holm']:.3g}), n = {c['cases']} cases, {outcome}{spread}"
    )


def reach_statement(report: Mapping[str, Any]) -> str | None:
    """A plain sentence when some test cannot reach significance at its n after Holm."""
    stuck = [c for c in report["comparisons"] if not c["can_reach_significance"]]
    if not stuck or report["test"] != "wilcoxon":
        return None
    m, alpha = len(report["comparisons"]), report["alpha"]
    n = min(c["cases"] for c in stuck)
    which = (
        "No test of this report"
        if len(stuck) == len(report["comparisons"])
        else f"{len(stuck)} of the {m} tests"
    )
    return (
        f"{which} can reach significance, whatever the data: with n = {n} cases the "
        f"smallest two-sided Wilcoxon p is 2/2^{n} = {2 / 2**n:.2g}, which Holm over the "
        f"report's {m} tests raises to at least {min(1.0, m * 2 / 2**n):.2g} (alpha = "
        f"{alpha:g}). Add cases (at least {cases_needed(m, alpha)} for {m} tests); more "
        "seeds do not add cases."
    )


def ablation_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: collapses, verdicts, Dice per group, every test, pseudo p-values."""
    test = {"wilcoxon": "Wilcoxon signed-rank", "ttest": "paired t"}[report["test"]]
    organs = report["classes"]
    n = len(report["cases"])
    m = len(report["comparisons"])
    averages = [c for c in report["comparisons"] if c["organ"] == AVERAGE]
    folds = report.get("folds") or []
    scored = (
        f"{n} cases, cross-validated over {len(folds)} folds: every case scored once, by the "
        "fold model that held it out"
        if folds
        else f"{n} held-out cases"
    )
    boot = report["bootstrap"]
    lines = [
        "# Ablation",
        "",
        f"{scored}. Dice (%): per seed the mean over cases, then mean ± std (ddof 1) over "
        f"seeds. The unit of every test is the case (n = {n}): per case and structure the "
        "Dice is averaged over seeds first, so seeds never count as extra pairs. Tests: "
        f"two-sided {test} over cases of the finest levels, 95 % bootstrap interval of the "
        f"mean difference ({boot['resamples']:,} resamples of the cases, seed "
        f"{boot['seed']}), Holm-corrected over all {m} tests below at alpha = "
        f"{report['alpha']:g}.",
        "",
    ]
    statement = reach_statement(report)
    if statement:
        lines += [f"**{statement}**", ""]
    lines += ["## Collapsed structures (Dice 0 on every held-out case of a run)", ""]
    if report["collapses"]:
        by_run: dict[tuple[str, int, int], list[str]] = {}
        for c in report["collapses"]:
            by_run.setdefault((c["run"], c["level"], c["cases"]), []).append(c["structure"])
        lines += [
            f"- {run}, level {level}: {', '.join(structures)} Dice 0 on all {cases} held-out cases"
            for (run, level, cases), structures in by_run.items()
        ]
    else:
        lines.append("None.")
    lines += [
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
            f"{100 * m_:.1f} ± {100 * s:.1f}" for m_, s in zip(row["mean"], row["std"], strict=True)
        ]
        seeds = ",".join(str(s) for s in row["seeds"])
        lines.append(
            f"| {row['mode']} | {row['depth']} | {row['level']} | {seeds} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "## Every test (the case as the unit)",
        "",
        "| comparison | organ | cases | difference | 95 % CI | p | p (Holm) | smallest p (Holm) "
        "| seed std | significant |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["comparisons"]:
        lines.append(
            f"| {comparison_name(c)} | {c['organ']} | {c['cases']} | {_dice(c['difference'])} "
            f"| [{_dice(c['ci_low'])}, {_dice(c['ci_high'])}] | {c['p_value']:.3g} | "
            f"{c['p_holm']:.3g} | {c['smallest_p_holm']:.2g} | {100 * c['seed_std']:.1f} | "
            f"{'yes' if c['significant'] else 'no'} |"
        )
    lines += [
        "",
        "## For comparison only: pseudo-replicated p-values (case x seed pairs)",
        "",
        "How reports computed them before: every case paired once per seed and the pairs "
        "tested as if independent. A case under several seeds is one case, so these "
        "p-values are too small; they are shown so the difference is visible, not to be "
        "reported. Holm over the same tests.",
        "",
        "| comparison | organ | case x seed pairs | p (pairs) | Holm (pairs) | significant "
        "(pairs) | cases | p (cases) | Holm (cases) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["comparisons"]:
        lines.append(
            f"| {comparison_name(c)} | {c['organ']} | {c['pseudo_pairs']} | "
            f"{c['pseudo_p_value']:.3g} | {c['pseudo_p_holm']:.3g} | "
            f"{'yes' if c['pseudo_significant'] else 'no'} | {c['cases']} | "
            f"{c['p_value']:.3g} | {c['p_holm']:.3g} |"
        )
    return "\n".join(lines) + "\n"
