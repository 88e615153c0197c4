"""Data preparation before training: the phantom generated where configured, every case
preprocessed into the cache. Training and `autocontext preprocess` both start here."""

from __future__ import annotations

import pathlib

import ml_collections

from autocontext_jax import phantom
from autocontext_jax.config import schema
from autocontext_jax.data import cache as cache_lib
from autocontext_jax.data import dataset as dataset_lib
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.plan import Plan
from autocontext_jax.runtime.progress import say

# The folder configs/default.py trains on: the phantom is generated there unasked.
DEFAULT_PHANTOM_DIR = schema.default("data.dir")


def ensure_dataset(data_config: ml_collections.ConfigDict) -> pathlib.Path:
    """The dataset folder; generates the phantom there when it is missing or empty and may.

    The phantom goes only into DEFAULT_PHANTOM_DIR or where `data.generate_phantom` asks
    for it; any other missing folder is a DatasetError naming it.
    """
    data_dir = pathlib.Path(data_config.dir)
    empty = not data_dir.exists() or (data_dir.is_dir() and not any(data_dir.iterdir()))
    wanted = data_config.generate_phantom or (
        data_dir.absolute() == pathlib.Path(DEFAULT_PHANTOM_DIR).absolute()
    )
    if empty and wanted and data_config.phantom_cases > 0:
        say(f"Generating {data_config.phantom_cases} phantom cases in {data_dir}")
        phantom.write_phantom_dataset(data_dir, data_config.phantom_cases, seed=0, workers=2)
    elif not data_dir.exists():
        raise DatasetError(
            f"{data_dir}: config.data.dir does not exist (the phantom is generated only into "
            f"{DEFAULT_PHANTOM_DIR} or with config.data.generate_phantom=True)"
        )
    return data_dir


def preprocess_dataset(
    config: ml_collections.ConfigDict,
) -> tuple[Plan, dict[str, cache_lib.CachedCase], list, list]:
    """(plan, cached cases, train files, held-out files) of the run's dataset and split.

    The phantom is generated first when so configured; the cache is brought up to date,
    its plan made from the run's own training cases (`data.split_seed`). Both training
    and the preprocess command come here.
    """
    ensure_dataset(config.data)
    files = dataset_lib.list_dataset(config.data)
    if config.data.fold >= 0:
        train_files, val_files = dataset_lib.fold_split(files, config.data, folds_path(config.data))
        # One plan from every case for every fold, as nnU-Net plans on all its training
        # cases: per-fold plans would rebuild the shared cache at each fold (and race on it
        # when the folds train at once on a cluster). The median spacing (and, with
        # foreground_zscore, the foreground's intensities) then include held-out cases.
        plan_files = files
    else:
        train_files, val_files = dataset_lib.split_dataset(files, config.data)
        plan_files = train_files
    plan, cached = cache_lib.ensure_preprocessed(config, files, plan_files)
    return plan, cached, train_files, val_files


def folds_path(data_config: ml_collections.ConfigDict) -> pathlib.Path:
    """The dataset's folds file: folds.json in its cache folder, shared by every run on it."""
    return cache_lib.cache_dir(data_config) / dataset_lib.FOLDS_FILE


def fold_record(data_config: ml_collections.ConfigDict) -> dict:
    """The fold record a run keeps in split.json (`dataset.fold_record` of its folds file)."""
    return dataset_lib.fold_record(data_config, folds_path(data_config))
