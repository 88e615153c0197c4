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

        def pairs(m, d, organ=organ):
            values = [table[(m, d, d, s)] for s in (0, 1)]
            if organ == "Avg.":
                return np.concatenate([v.mean(axis=1) for v in values])
            return np.concatenate([v[:, CLASSES.index(organ)] for v in values])

        other, baseline = pairs(mode, 2), pairs(base, base_depth)
        assert c["pairs"] == 10
        assert c["difference"] == pytest.approx(np.mean(other - baseline))
        assert c["p_value"] == pytest.approx(scipy.stats.wilcoxon(other, baseline).pvalue)
    p_values = [c["p_value"] for c in report["comparisons"]]
    assert [c["p_holm"] for c in report["comparisons"]] == pytest.approx(ablation.holm(p_values))
    assert all(c["significant"] == (c["p_holm"] < 0.05) for c in report["comparisons"])

    t_report = ablation.ablation_report(runs, baseline_mode="none", test="ttest")
    c = next(
        c
        for c in t_report["comparisons"]
        if c["organ"] == "liver" and c["mode"] == "end_to_end" and c["baseline_mode"] == "none"
    )
    other = np.concatenate([table[("end_to_end", 2, 2, s)][:, 0] for s in (0, 1)])
    baseline = np.concatenate([table[("none", 2, 2, s)][:, 0] for s in (0, 1)])
    assert c["p_value"] == pytest.approx(scipy.stats.ttest_rel(other, baseline).pvalue)


def test_each_comparison_gets_a_plain_verdict(known_runs):
    report = ablation.ablation_report(known_runs[0])
    c = next(
        c for c in report["comparisons"] if c["baseline_mode"] == "none" and c["organ"] == "Avg."
    )
    outcome = "significant" if c["significant"] else "not significant"
    assert ablation.verdict(c) == (
        f"end_to_end vs none at level 2 (Avg.): {100 * c['difference']:+.1f} Dice, "
        f"p = {c['p_value']:.3g} (Holm {c['p_holm']:.3g}), {outcome}"
    )
    text = ablation.ablation_markdown(report)
    assert ablation.verdict(c) in text and "one U-Net (levels=1)" in text


def test_runs_on_other_cases_are_refused(known_runs):
    runs = list(known_runs[0])
    other = dict(runs[1].result, case_ids=["a", "b", "c", "d", "z"])
    runs[1] = ablation.AblationRun(2, "none", 0, other)
    with pytest.raises(
        ablation.AblationError, match="levels=2 mode=none seed=0: evaluated on other"
    ):
        ablation.ablation_report(runs)


@pytest.mark.slow
def test_the_command_trains_the_grid_and_writes_the_report(tiny_phantom, tmp_path):
    tiny = {
        "data.dir": tiny_phantom,
        "data.phantom_cases": 0,
        "data.num_val_cases": 2,
        "data.crop_size": 8,
        "model.width": 2,
        "model.num_poolings": 1,
        "train.steps": 2,
        "train.warmup_steps": 1,
        "train.checkpoint_every": 2,
        "train.log_every": 2,
    }
    command = [
        *ABLATION,
        "--levels=1,2",
        "--modes=end_to_end,separate",
        "--baseline=separate",
        "--seeds=0,1",
        f"--runs_dir={tmp_path}",
        *(f"--override={key}={value}" for key, value in tiny.items()),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == [
        "levels-1_seed-0",
        "levels-1_seed-1",
        "levels-2_mode-end_to_end_seed-0",
        "levels-2_mode-end_to_end_seed-1",
        "levels-2_mode-separate_seed-0",
        "levels-2_mode-separate_seed-1",
    ]
    # A separate run gives each of its two levels the joint runs' 2 steps.
    separate = json.loads((tmp_path / "levels-2_mode-separate_seed-0" / "config.json").read_text())
    assert separate["train"]["steps"] == 4
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert report["not_finished"] == [] and len(report["cases"]) == 2
    assert report["stacks_note"] is None  # every run trained here, on one stack
    assert all((tmp_path / run / "environment.jsonl").is_file() for run in runs)
    assert "end_to_end vs separate at level 2 (Avg.): " in result.stdout
    assert (tmp_path / "ablation.md").read_text() in result.stdout
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


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
