"""Data preparation: the phantom is generated only where it may be; the shared folds."""

import json
import pathlib

import pytest

from autocontext_jax import prepare
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.errors import DatasetError

TESTS = pathlib.Path(__file__).parent


def test_the_phantom_is_generated_only_into_the_default_folder_or_when_asked(tmp_path, monkeypatch):
    from conftest import load_config, make_tiny_config

    monkeypatch.chdir(tmp_path)
    config = make_tiny_config("data/phantm")  # a typo of the default folder
    config.data.phantom_cases = 1
    with pytest.raises(DatasetError, match=r"data/phantm: config\.data\.dir does not exist"):
        prepare.ensure_dataset(config.data)
    assert not (tmp_path / "data").exists()

    config.data.dir = load_config("default").data.dir
    prepare.ensure_dataset(config.data)
    assert len(list((tmp_path / "data" / "phantom" / "labelsTr").iterdir())) == 1

    config.data.dir = "elsewhere"
    config.data.generate_phantom = True
    prepare.ensure_dataset(config.data)
    assert len(list((tmp_path / "elsewhere" / "labelsTr").iterdir())) == 1


def test_two_configs_share_the_folds_file_and_a_disagreeing_run_is_refused(tiny_phantom, tmp_path):
    from conftest import assert_one_line_error, make_tiny_config, run_autocontext

    first = make_tiny_config(tiny_phantom)
    first.data.cache_dir = str(tmp_path / "cache")
    first.data.num_folds, first.data.fold = 5, 0
    second = make_tiny_config(tiny_phantom)  # another model, another fold, same dataset
    second.data.cache_dir = first.data.cache_dir
    second.data.num_folds, second.data.fold = 5, 3
    second.model.width = 4
    folds_file = prepare.folds_path(first.data)
    assert folds_file == tmp_path / "cache" / dataset_lib.FOLDS_FILE

    _, cached, train_0, val_0 = prepare.preprocess_dataset(first)
    text = folds_file.read_text()
    _, _, train_3, val_3 = prepare.preprocess_dataset(second)
    assert folds_file.read_text() == text
    saved = json.loads(text)["folds"]
    assert [f.case_id for f in val_0] == saved[0]["val"]
    assert [f.case_id for f in val_3] == saved[3]["val"]
    assert [f.case_id for f in train_3] == saved[3]["train"]
    assert len(cached) == 5  # every case of every fold, one cache
    record = prepare.fold_record(second.data)
    assert record == {
        "fold": 3,
        "num_folds": 5,
        "folds_file": str(folds_file.absolute()),
        "folds_sha256": prepare.fold_record(first.data)["folds_sha256"],
    }
    assert prepare.fold_record(make_tiny_config(tiny_phantom).data) == {"fold": -1}

    result = run_autocontext(
        "preprocess",
        "--config=configs/default.py",
        f"--config.data.dir={tiny_phantom}",
        f"--config.data.cache_dir={first.data.cache_dir}",
        "--config.data.phantom_cases=0",
        "--config.data.fold=1",
        "--config.data.num_folds=4",
    )
    assert_one_line_error(result, f"{folds_file}: its folds (num_folds=5, split_seed=0, 5 cases)")
    assert folds_file.read_text() == text
