"""Runs side by side with paired Wilcoxon p-values."""

import json

import numpy as np
import pytest
import scipy.stats
from conftest import run_autocontext

from autocontext_jax.evaluation import compare
from autocontext_jax.runtime import environment


def _result(case_ids, level_values, metric="dice"):
    """An eval_cases.json with two classes and the given per-level (cases, 2) values."""
    return {
        "case_ids": list(case_ids),
        "classes": ["liver", "spleen"],
        metric: {f"level_{s + 1}": np.asarray(v).tolist() for s, v in enumerate(level_values)},
    }


def test_an_exact_p_value_of_six_cases():
    # All six differences positive and of distinct sizes: 2 of the 2^6 sign patterns are
    # as extreme, so the exact two-sided p is 2/64.
    assert compare.paired_wilcoxon([0.1] * 6, [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]) == 2 / 64


def test_identical_runs_have_p_one():
    assert compare.paired_wilcoxon([0.5, 0.7, 0.9], [0.5, 0.7, 0.9]) == 1.0


def test_the_table_pairs_cases_by_id_and_matches_scipy():
    rng = np.random.default_rng(0)
    cases = [f"case_{i}" for i in range(9)]
    base = rng.uniform(0.5, 0.9, size=(9, 2))
    better = base + rng.uniform(-0.02, 0.1, size=(9, 2))
    shuffled = rng.permutation(9)
    results = {
        "none": _result(cases, [base, base]),
        # Same cases in another order: pairing must follow the ids, not the positions.
        "end_to_end": _result([cases[i] for i in shuffled], [base, better[shuffled]]),
    }
    table = compare.compare(results, "dice")
    assert table["columns"] == ["none", "end_to_end"] and table["cases"] == 9
    assert table["classes"] == ["liver", "spleen", "Avg."]
    assert table["p_value"][0] == [None, None, None]
    for k in range(2):
        assert table["p_value"][1][k] == pytest.approx(
            scipy.stats.wilcoxon(base[:, k], better[:, k]).pvalue
        )
    assert table["p_value"][1][2] == pytest.approx(
        scipy.stats.wilcoxon(base.mean(axis=1), better.mean(axis=1)).pvalue
    )
    assert table["mean"][1][0] == pytest.approx(better[:, 0].mean())
    assert table["std"][1][1] == pytest.approx(better[:, 1].std())


def test_all_levels_gives_a_column_per_level():
    values = np.full((3, 2), 0.5)
    results = {"a": _result("xyz", [values]), "b": _result("xyz", [values, values + 0.1])}
    table = compare.compare(results, "dice", all_levels=True)
    assert table["columns"] == ["a level 1", "b level 1", "b level 2"]
    markdown = compare.comparison_markdown(table)
    assert "| Dice (%) | a level 1 | b level 1 | b level 2 |" in markdown
    assert "| liver | 50.0 ± 0.0 | 50.0 ± 0.0 (p=1) | 60.0 ± 0.0 (p=0.25) |" in markdown


def test_runs_on_other_cases_are_refused():
    values = np.full((2, 2), 0.5)
    results = {"a": _result(["p", "q"], [values]), "b": _result(["p", "r"], [values])}
    with pytest.raises(compare.ComparisonError, match="b: evaluated on other cases than a"):
        compare.compare(results)


def test_the_command_prints_the_table(tmp_path):
    rng = np.random.default_rng(1)
    for name, shift in (("base", 0.0), ("better", 0.05)):
        (tmp_path / name).mkdir()
        hd = rng.uniform(1, 5, size=(7, 2)) - 10 * shift
        result = _result(range(7), [hd], metric="hd95")
        result["case_ids"] = [str(c) for c in result["case_ids"]]
        (tmp_path / name / "eval_cases.json").write_text(json.dumps(result))
    command = ["compare", "--metric=hd95"]
    out = run_autocontext(*command, str(tmp_path / "base"), str(tmp_path / "better"))
    assert out.returncode == 0, out.stderr
    assert "| HD95 (mm) | base | better |" in out.stdout
    assert "stack" not in out.stdout  # neither run has a record: nothing to say
    # Trained on two CPUs: the note comes above the table.
    record = environment.environment_record(0)
    for name, cpu in (("base", "CPU A"), ("better", "CPU B")):
        line = json.dumps({**record, "cpu": cpu}) + "\n"
        (tmp_path / name / environment.ENVIRONMENT_FILE).write_text(line)
    out = run_autocontext(*command, str(tmp_path / "base"), str(tmp_path / "better"))
    assert out.returncode == 0, out.stderr
    note, table = out.stdout.split("\n\n", 1)
    assert note == "**Runs trained on 2 different software/hardware stacks " + (
        f"(CPU, devices or package versions, in {environment.ENVIRONMENT_FILE}): base | better; "
        "a difference between them mixes that change with the one compared.**"
    )
    assert "| HD95 (mm) | base | better |" in table
    missing = run_autocontext(*command, str(tmp_path / "base"), str(tmp_path))
    assert missing.returncode != 0
    assert f"{tmp_path / 'eval_cases.json'}: missing" in missing.stderr
