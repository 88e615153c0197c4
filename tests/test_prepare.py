"""Data preparation: the phantom is generated only where it may be."""

import pathlib

import pytest

from autocontext_jax import prepare
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
