"""The ablation report's statistics, against scipy, and the command end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from autocontext_jax.evaluation import ablation

CASES = ["a", "b", "c", "d", "e"]
CLASSES = ["liver", "spleen"]
ABLATION = [sys.executable, "-m", "autocontext_jax", "ablation", "--config=configs/default.py"]


def _result(dice_by_level):
    return {"case_ids": CASES, "classes": CLASSES, "dice": dice_by_level}


@pytest.fixture
def known_runs():
    """Levels 1 and 2, modes end_to_end and none, seeds 0 and 1: seeded random Dice."""
    rng = np.random.default_rng(0)
    runs, table = [], {}
    for seed in (0, 1):
        single = rng.uniform(0.5, 0.9, (5, 2))
        runs.append(ablation.AblationRun(1, "end_to_end", seed, _result({"level_1": single})))
        table[("single", 1, 1, seed)] = single
        for mode, shift in (("none", 0.0), ("end_to_end", 0.05)):
            coarse = rng.uniform(0.4, 0.8, (5, 2))
            fine = np.clip(rng.uniform(0.5, 0.9, (5, 2)) + shift, 0, 1)
            levels = {"level_1": coarse.tolist(), "level_2": fine.tolist()}
            runs.append(ablation.AblationRun(2, mode, seed, _result(levels)))
            table[(mode, 2, 1, seed)], table[(mode, 2, 2, seed)] = coarse, fine
    return runs, table


def test_holm_adjusts_step_down_and_stays_monotone():
    assert ablation.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert ablation.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert ablation.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def _case_means(table, mode, depth, organ):
    """Per case, the mean over seeds 0 and 1 of one organ (or the organs' average)."""
    values = [table[(mode, depth, depth, s)] for s in (0, 1)]
    if organ == "Avg.":
        values = [v.mean(axis=1) for v in values]
    else:
        values = [v[:, CLASSES.index(organ)] for v in values]
    return np.mean(values, axis=0), np.concatenate(values)


def test_the_report_matches_numpy_and_scipy_on_a_known_table(known_runs):
    runs, table = known_runs
    report = ablation.ablation_report(runs, baseline_mode="none", test="wilcoxon")
    rows = {(r["mode"], r["depth"], r["level"]): r for r in report["summaries"]}
    assert set(rows) == {("single", 1, 1), ("none", 2, 1), ("none", 2, 2)} | {
        ("end_to_end", 2, 1),
        ("end_to_end", 2, 2),
    }
    for (mode, depth, level), row in rows.items():
        per_seed = np.stack([table[(mode, depth, level, s)].mean(axis=0) for s in (0, 1)])
        average = np.stack([table[(mode, depth, level, s)].mean() for s in (0, 1)])
        np.testing.assert_allclose(row["mean"][:2], per_seed.mean(axis=0))
        np.testing.assert_allclose(row["std"][:2], per_seed.std(axis=0, ddof=1))
        assert row["mean"][2] == pytest.approx(average.mean())
        assert row["std"][2] == pytest.approx(average.std(ddof=1))

    by_name = {(c["mode"], c["baseline_mode"], c["organ"]): c for c in report["comparisons"]}
    # end_to_end vs none at level 2, and both pyramids vs one U-Net: 3 x (2 organs + Avg.).
    assert len(by_name) == 9
    for (mode, base, organ), c in by_name.items():
        base_depth = 1 if base == "single" else 2
        other, other_pairs = _case_means(table, mode, 2, organ)
        baseline, baseline_pairs = _case_means(table, base, base_depth, organ)
        # The case is the unit: 5 cases, each the mean of its 2 seeds.
        assert c["cases"] == 5 and c["seeds"] == [0, 1]
        assert c["difference"] == pytest.approx(np.mean(other - baseline))
        assert c["p_value"] == pytest.approx(scipy.stats.wilcoxon(other, baseline).pvalue)
        assert (c["ci_low"], c["ci_high"]) == ablation.bootstrap_interval(other - baseline)
        assert c["ci_low"] <= c["difference"] <= c["ci_high"]
        seed_differences = (other_pairs - baseline_pairs).reshape(2, 5).mean(axis=1)
        assert c["seed_std"] == pytest.approx(seed_differences.std(ddof=1))
        # Today's pseudo-replicated test, kept for comparison: 10 case x seed pairs.
        assert c["pseudo_pairs"] == 10
        assert c["pseudo_p_value"] == pytest.approx(
            scipy.stats.wilcoxon(other_pairs, baseline_pairs).pvalue
        )
    p_values = [c["p_value"] for c in report["comparisons"]]
    assert [c["p_holm"] for c in report["comparisons"]] == pytest.approx(ablation.holm(p_values))
    assert all(c["significant"] == (c["p_holm"] < 0.05) for c in report["comparisons"])
    pseudo = [c["pseudo_p_value"] for c in report["comparisons"]]
    assert [c["pseudo_p_holm"] for c in report["comparisons"]] == pytest.approx(
        ablation.holm(pseudo)
    )

    t_report = ablation.ablation_report(runs, baseline_mode="none", test="ttest")
    c = next(
        c
        for c in t_report["comparisons"]
        if c["organ"] == "liver" and c["mode"] == "end_to_end" and c["baseline_mode"] == "none"
    )
    other, _ = _case_means(table, "end_to_end", 2, "liver")
    baseline, _ = _case_means(table, "none", 2, "liver")
    assert c["p_value"] == pytest.approx(scipy.stats.ttest_rel(other, baseline).pvalue)
    assert c["smallest_p"] == 0.0 and c["can_reach_significance"]


def _two_mode_runs(none, end_to_end, cases, classes=("liver",)):
    """Level-2 runs of modes none and end_to_end, one per seed: Dice (seeds, cases, classes)."""
    runs = []
    for mode, values in (("none", none), ("end_to_end", end_to_end)):
        for seed, dice in enumerate(values):
            result = {"case_ids": cases, "classes": list(classes), "dice": {"level_2": dice}}
            runs.append(ablation.AblationRun(2, mode, seed, result))
    return runs


def test_seeds_counted_as_pairs_would_flip_the_verdict():
    # 6 cases x 5 seeds: end_to_end is better on every case, and the seeds barely differ.
    rng = np.random.default_rng(1)
    cases = [f"case_{i}" for i in range(6)]
    base = rng.uniform(0.5, 0.8, 6)
    gain = rng.uniform(0.01, 0.05, 6)
    none = [(base + rng.normal(0, 1e-3, 6))[:, None] for _ in range(5)]
    end_to_end = [(base + gain + rng.normal(0, 1e-3, 6))[:, None] for _ in range(5)]
    report = ablation.ablation_report(_two_mode_runs(none, end_to_end, cases))
    average = next(c for c in report["comparisons"] if c["organ"] == "Avg.")

    # The case as the unit: 6 positive differences, p = 2/2^6 = 0.031, Holm over 2 tests 0.062.
    case_other = np.mean(end_to_end, axis=0)[:, 0]
    case_base = np.mean(none, axis=0)[:, 0]
    expected = scipy.stats.wilcoxon(case_other, case_base).pvalue
    assert average["p_value"] == pytest.approx(expected) == pytest.approx(2 / 2**6)
    assert average["p_holm"] == pytest.approx(2 * expected)
    assert not average["significant"]
    # Counting the 30 case x seed pairs as independent calls the same data significant.
    pairs = scipy.stats.wilcoxon(np.ravel(end_to_end), np.ravel(none)).pvalue
    assert average["pseudo_pairs"] == 30
    assert average["pseudo_p_value"] == pytest.approx(pairs) and pairs < 1e-6
    assert average["pseudo_significant"]

    # And no test at 6 cases could ever be significant after Holm over the report's 2 tests.
    assert average["smallest_p_holm"] == pytest.approx(2 * 2 / 2**6)
    assert not average["can_reach_significance"]
    assert "cannot reach significance at n = 6 after Holm" in ablation.verdict(average)
    statement = ablation.reach_statement(report)
    assert statement.startswith("No test of this report can reach significance")
    assert "2/2^6 = 0.031" in statement and "at least 7 for 2 tests" in statement
    text = ablation.ablation_markdown(report)
    assert statement in text
    assert "## For comparison only: pseudo-replicated p-values (case x seed pairs)" in text


def test_enough_cases_can_reach_significance_and_say_nothing():
    rng = np.random.default_rng(2)
    cases = [f"case_{i:02d}" for i in range(12)]  # 2 x 2/2^12 = 0.001 < 0.05
    base = rng.uniform(0.5, 0.8, 12)
    none = [(base + rng.normal(0, 1e-3, 12))[:, None] for _ in range(2)]
    end_to_end = [(base + 0.03 + rng.normal(0, 1e-3, 12))[:, None] for _ in range(2)]
    report = ablation.ablation_report(_two_mode_runs(none, end_to_end, cases))
    assert all(c["can_reach_significance"] and c["significant"] for c in report["comparisons"])
    assert ablation.reach_statement(report) is None
    assert ablation.cases_needed(2, 0.05) == 7 and ablation.cases_needed(40, 0.05) == 11
    # The example: 8 held-out cases, 40 tests: the floor 2/2^8 x 40 = 0.31.
    assert ablation.smallest_p_value(8) == 2 / 2**8 == 0.0078125
    assert ablation.smallest_p_value(8, "ttest") == 0.0
    assert ablation.cases_needed(40, 0.05) > 8


def test_the_bootstrap_interval_is_seeded_and_resamples_cases():
    differences = np.random.default_rng(3).normal(0.02, 0.03, 20)
    interval = ablation.bootstrap_interval(differences)
    assert interval == ablation.bootstrap_interval(differences)  # reproducible
    picks = np.random.default_rng(0).integers(0, 20, size=(10_000, 20))
    by_hand = np.percentile(differences[picks].mean(axis=1), [2.5, 97.5])
    assert interval == pytest.approx(tuple(by_hand))
    assert interval[0] < differences.mean() < interval[1]
    assert ablation.bootstrap_interval(differences, seed=1) != interval
    constant = ablation.bootstrap_interval(np.full(8, 0.015))
    assert constant == pytest.approx((0.015, 0.015))


def test_a_collapsed_structure_is_named_per_run_above_the_verdicts():
    cases = ["a", "b", "c"]
    classes = ["liver", "gallbladder"]
    healthy = [[0.9, 0.7], [0.8, 0.6], [0.85, 0.0]]  # one case at 0 is no collapse
    collapsed = [[0.9, 0.0], [0.8, 0.0], [0.85, 0.0]]
    runs = _two_mode_runs([healthy, collapsed], [healthy, healthy], cases, classes=classes)
    assert ablation.collapses(runs) == [
        {"run": "levels=2 mode=none seed=1", "level": 2, "structure": "gallbladder", "cases": 3}
    ]
    report = ablation.ablation_report(runs)
    text = ablation.ablation_markdown(report)
    line = "- levels=2 mode=none seed=1, level 2: gallbladder Dice 0 on all 3 held-out cases"
    assert line in text
    assert text.index(line) < text.index("## Verdicts")
    fine = ablation.ablation_markdown(ablation.ablation_report(runs[:1] + runs[2:]))
    assert "Dice 0 on all" not in fine


def test_each_comparison_gets_a_plain_verdict(known_runs):
    report = ablation.ablation_report(known_runs[0])
    c = next(
        c for c in report["comparisons"] if c["baseline_mode"] == "none" and c["organ"] == "Avg."
    )
    outcome = "significant" if c["significant"] else "not significant"
    if not c["can_reach_significance"]:
        outcome += " (cannot reach significance at n = 5 after Holm)"
    assert ablation.verdict(c) == (
        f"end_to_end vs none at level 2 (Avg.): {100 * c['difference']:+.1f} Dice "
        f"[95 % CI {100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}], "
        f"p = {c['p_value']:.3g} (Holm {c['p_holm']:.3g}), n = 5 cases, {outcome}; "
        f"seed-to-seed std {100 * c['seed_std']:.1f} over 2 seeds"
    )
    text = ablation.ablation_markdown(report)
    assert ablation.verdict(c) in text and "one U-Net (levels=1)" in text


def test_the_folds_of_a_run_join_into_every_case_once(known_runs):
    runs, _ = known_runs
    by_fold = []
    for run in runs:  # each run's 5 cases cut into two folds: cases a-b and c-e
        for fold, part in enumerate((slice(0, 2), slice(2, 5))):
            result = {
                "case_ids": run.result["case_ids"][part],
                "classes": CLASSES,
                "dice": {k: np.asarray(v)[part].tolist() for k, v in run.result["dice"].items()},
            }
            by_fold.append(ablation.AblationRun(run.levels, run.mode, run.seed, result, fold))
    joined = ablation.ablation_report(by_fold)
    whole = ablation.ablation_report(runs)
    assert joined["cases"] == CASES and joined["folds"] == [0, 1]
    for a, b in zip(joined["comparisons"], whole["comparisons"], strict=True):
        assert a["p_value"] == b["p_value"] and a["cases"] == 5
    with pytest.raises(ablation.AblationError, match="levels=2 mode=none seed=0: evaluated on"):
        ablation.ablation_report(
            [r for r in by_fold if r.name != "levels=2 mode=none seed=0 fold=1"]
        )
    with pytest.raises(ablation.AblationError, match="case a is scored twice"):
        ablation.ablation_report([*by_fold, by_fold[0]])


def test_runs_on_other_cases_are_refused(known_runs):
    runs = list(known_runs[0])
    other = dict(runs[1].result, case_ids=["a", "b", "c", "d", "z"])
    runs[1] = ablation.AblationRun(2, "none", 0, other)
    with pytest.raises(
        ablation.AblationError, match="levels=2 mode=none seed=0: evaluated on other"
    ):
        ablation.ablation_report(runs)


@pytest.mark.slow
def test_the_command_trains_a_cross_validated_grid_and_writes_the_report(tiny_phantom, tmp_path):
    # One grid for the whole command (each run is a process start): one U-Net and two
    # modes over two folds, so every case is scored once, by the fold that held it out.
    from conftest import REPO, run_autocontext

    tiny = {
        "data.dir": tiny_phantom,
        "data.cache_dir": tmp_path / "cache",
        "data.phantom_cases": 0,
        "data.crop_size": 8,
        "model.width": 2,
        "model.num_poolings": 1,
        "train.steps": 2,
        "train.warmup_steps": 1,
        "train.checkpoint_every": 2,
        "train.log_every": 2,
    }
    runs_dir = tmp_path / "runs"
    result = run_autocontext(
        "ablation",
        f"--config={REPO / 'configs' / 'default.py'}",
        "--levels=1,2",
        "--modes=end_to_end,separate",
        "--baseline=separate",
        "--seeds=0",
        "--folds=2",
        f"--runs_dir={runs_dir}",
        *(f"--override={key}={value}" for key, value in tiny.items()),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and "_fold-" in p.name)
    # A one-level pyramid has no context: one run per fold whatever the modes.
    assert runs == [
        "levels-1_seed-0_fold-0",
        "levels-1_seed-0_fold-1",
        "levels-2_mode-end_to_end_seed-0_fold-0",
        "levels-2_mode-end_to_end_seed-0_fold-1",
        "levels-2_mode-separate_seed-0_fold-0",
        "levels-2_mode-separate_seed-0_fold-1",
    ]
    # A separate run gives each of its two levels the joint runs' 2 steps.
    separate = json.loads(
        (runs_dir / "levels-2_mode-separate_seed-0_fold-0" / "config.json").read_text()
    )
    assert separate["train"]["steps"] == 4
    assert all((runs_dir / run / "environment.jsonl").is_file() for run in runs)
    for fold in (0, 1):
        split = json.loads(
            (runs_dir / f"levels-2_mode-separate_seed-0_fold-{fold}" / "split.json").read_text()
        )
        assert split["fold"] == fold and split["num_folds"] == 2

    report = json.loads((runs_dir / "ablation.json").read_text())
    assert report["not_finished"] == [] and report["stacks_note"] is None  # one stack here
    assert report["folds"] == [0, 1] and len(report["cases"]) == 5  # every case, once
    average = next(
        c
        for c in report["comparisons"]
        if (c["mode"], c["baseline_mode"], c["organ"]) == ("end_to_end", "separate", "Avg.")
    )
    assert average["cases"] == 5 and average["pseudo_pairs"] == 5  # one seed: the same n
    assert "end_to_end vs separate at level 2 (Avg.): " in result.stdout
    assert ", n = 5 cases, not significant (cannot reach significance at n = 5" in result.stdout
    assert "No test of this report can reach significance" in result.stdout
    assert "cross-validated over 2 folds" in result.stdout
    assert (runs_dir / "ablation.md").read_text() in result.stdout
    assert (runs_dir / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    # Each configuration's cross-validated summary scores every case once.
    cv = json.loads((runs_dir / "levels-2_mode-separate_seed-0_cv" / "eval_cases.json").read_text())
    assert sorted(cv["case_ids"]) == report["cases"]
    assert (runs_dir / "levels-1_seed-0_cv" / "eval_cases.json").is_file()


def test_the_full_grid_goes_to_a_cluster_unchanged(tmp_path):
    # The paper-size grid as SLURM jobs: printed, nothing written, separate runs doubled.
    command = [
        *ABLATION,
        "--levels=1,2,3",
        "--modes=end_to_end,stagewise,separate,none",
        f"--runs_dir={tmp_path / 'runs'}",
        "--backend=slurm",
        "--slurm_gpus_per_node=8",
        "--dry_run",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [line for line in result.stdout.splitlines() if line.startswith("== ")]
    assert len(jobs) == 3 + 2 * 4 * 3  # one U-Net per seed; depths 2, 3 x 4 modes x 3 seeds
    assert any("levels-3_mode-separate_seed-2: sbatch" in job for job in jobs)
    assert "--config.train.steps=4500" in result.stdout  # 3 levels x the 1,500 steps
    assert "#SBATCH --gpus-per-node=8" in result.stdout
    assert not (tmp_path / "runs").exists()

    other = subprocess.run(
        [*command, "--report_metric=hd95"], capture_output=True, text=True, timeout=300
    )
    assert other.returncode != 0 and "--report_metric" in other.stderr

    # Cross-validated: every run of the grid once per fold, each told its fold (in-process).
    from conftest import REPO, assert_one_line_error, run_autocontext

    in_process = [
        "ablation",
        f"--config={REPO / 'configs' / 'default.py'}",
        *command[len(ABLATION) :],
        "--folds=5",
    ]
    folds = run_autocontext(*in_process)
    assert folds.returncode == 0, folds.stderr[-3000:]
    jobs = [line for line in folds.stdout.splitlines() if line.startswith("== ")]
    assert len(jobs) == 5 * (3 + 2 * 4 * 3)
    workdir = tmp_path / "runs" / "levels-3_mode-separate_seed-2_fold-4"
    assert f"== {workdir.name}: sbatch {workdir / 'job.sbatch'}" in jobs
    script = folds.stdout.split(f"# {workdir / 'job.sbatch'}\n")[1].split("\n== ")[0]
    assert "--config.data.num_folds=5 --config.data.fold=4" in script
    assert "--config.train.steps=4500" in script
    assert not (tmp_path / "runs").exists()
    for bad, message in (
        ("--folds=1", "--folds=1: cross-validation needs at least 2"),
        ("--override=data.fold=2", "--override data.fold: --folds sets it"),
    ):
        assert_one_line_error(run_autocontext(*in_process, bad), message)
