"""Cross-validated evaluation: every case scored once by the fold run that held it out."""

import json
import shutil

import pytest
from conftest import assert_one_line_error, make_tiny_config, run_autocontext

from autocontext_jax.cli.train import train_and_evaluate
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.evaluation import crossval


@pytest.fixture(scope="module")
def fold_runs(tiny_phantom, tmp_path_factory):
    """The two fold runs of one tiny config on the 5-case phantom, trained and evaluated."""
    root = tmp_path_factory.mktemp("folds")
    workdirs = []
    for fold in (0, 1):
        config = make_tiny_config(tiny_phantom)
        config.data.cache_dir = str(root / "cache")
        config.data.num_folds, config.data.fold = 2, fold
        config.train.steps = 2
        workdir = root / "runs" / f"levels-2_seed-0_fold-{fold}"
        train_and_evaluate(config, str(workdir))
        workdirs.append(workdir)
    return workdirs


@pytest.mark.slow
def test_every_case_is_scored_once_by_the_fold_that_held_it_out(fold_runs, tiny_phantom):
    folds = json.loads((fold_runs[0].parent.parent / "cache" / "folds.json").read_text())
    for fold, workdir in enumerate(fold_runs):
        split = dataset_lib.read_split(workdir)
        assert split["fold"] == fold and split["num_folds"] == 2
        assert split["val"] == folds["folds"][fold]["val"]

    # The runs listed, in any order: the summary goes beside them, named after them.
    result = run_autocontext("evaluate", f"--cv={fold_runs[1]},{fold_runs[0]}")
    assert result.returncode == 0, result.stderr
    out = fold_runs[0].parent / "levels-2_seed-0_cv"
    joined = json.loads((out / "eval_cases.json").read_text())
    cases = sorted(f.case_id for f in dataset_lib.list_cases(tiny_phantom))
    assert sorted(joined["case_ids"]) == cases and len(joined["case_ids"]) == 5  # each once
    for fold, workdir in enumerate(fold_runs):
        own = json.loads((workdir / "eval_cases.json").read_text())
        rows = [i for i, f in enumerate(joined["fold"]) if f == fold]
        assert [joined["case_ids"][i] for i in rows] == own["case_ids"]
        for level, values in own["dice"].items():
            assert [joined["dice"][level][i] for i in rows] == values
    assert json.loads((out / crossval.CV_FILE).read_text())["cases"] == 5
    assert "Level 2 (5 held-out cases)" in result.stdout
    assert (out / "eval_summary.md").read_text() in result.stdout

    # One folder of fold runs: the summary goes into it; compare reads it as a run.
    only_runs = fold_runs[0].parent
    shutil.rmtree(out)
    result = run_autocontext("evaluate", f"--cv={only_runs}")
    assert result.returncode == 0, result.stderr
    assert (
        json.loads((only_runs / "eval_cases.json").read_text())["case_ids"] == (joined["case_ids"])
    )


@pytest.mark.slow
def test_runs_that_are_not_the_folds_of_one_config_are_refused(fold_runs, tiny_run, tmp_path):
    first, second = fold_runs
    other_config = tmp_path / "other_config"
    shutil.copytree(second, other_config)
    config = json.loads((other_config / "config.json").read_text())
    config["model"]["width"] = 4
    (other_config / "config.json").write_text(json.dumps(config))
    other_folds = tmp_path / "other_folds"
    shutil.copytree(second, other_folds)
    split = json.loads((other_folds / "split.json").read_text())
    split["folds_sha256"], split["folds_file"] = "0" * 64, "elsewhere/folds.json"
    (other_folds / "split.json").write_text(json.dumps(split))

    cases = {
        "another config": ([first, other_config], "config.model.width is 4, not 2"),
        "other folds": ([first, other_folds], "trained on other folds (elsewhere/folds.json)"),
        "a fold missing": ([first], "folds [1] of 2 have no run among 1 given"),
        "a fold twice": ([first, second, first], "fold 0 is also"),
        "not a fold run": ([tiny_run, first], "not a fold run"),
    }
    for runs, message in cases.values():
        result = run_autocontext("evaluate", "--cv=" + ",".join(str(r) for r in runs))
        assert_one_line_error(result, message)
    assert_one_line_error(
        run_autocontext("evaluate", f"--cv={tmp_path / 'nothing'}"), "no such folder of fold runs"
    )


def test_the_summary_goes_beside_the_runs_named_after_them(tmp_path):
    runs = [str(tmp_path / f"levels-2_mode-none_seed-0_fold-{fold}") for fold in range(5)]
    assert crossval.default_output(runs) == tmp_path / "levels-2_mode-none_seed-0_cv"
    assert crossval.default_output([str(tmp_path / "cv")]) == tmp_path / "cv"
    assert crossval.default_output([str(tmp_path / "a"), str(tmp_path / "b")]) == (
        tmp_path / "folds_cv"
    )
