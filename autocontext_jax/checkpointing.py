"""Orbax checkpoints of the train state, and the run's resolved config beside them."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

# Fields that fix the shapes of the saved parameters: a resumed run must not change them.
SHAPE_FIELDS = (
    ("model", "width"),
    ("model", "num_poolings"),
    ("model", "in_channels"),
    ("model", "num_classes"),
    ("pyramid", "levels"),
    ("pyramid", "mode"),
)


def make_manager(
    workdir: str | os.PathLike, config: ml_collections.ConfigDict
) -> ocp.CheckpointManager:
    """A manager saving every `train.checkpoint_every` steps, keeping `train.keep_checkpoints`."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.train.checkpoint_every,
        max_to_keep=config.train.keep_checkpoints,
        create=True,
        # A run killed while saving leaves a *.orbax-checkpoint-tmp folder: remove it.
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=options)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, int | None]:
    """Restore the newest checkpoint into the structure, shapes and shardings of `target`.

    Returns (state, step), or (target, None) when there is nothing to resume from.
    """
    step = manager.latest_step()
    if step is None:
        return target, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return restored, step


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Write the resolved config to WORKDIR/config.json, refusing shape-changing resumes."""
    path = pathlib.Path(workdir) / "config.json"
    if path.exists() and (pathlib.Path(workdir) / "checkpoints").exists():
        saved = json.loads(path.read_text())
        changed = [
            f"config.{section}.{name}: {saved[section][name]!r} -> {config[section][name]!r}"
            for section, name in SHAPE_FIELDS
            if section in saved and saved[section].get(name) != config[section][name]
        ]
        if changed:
            raise ValueError(
                f"{path}: the run in this workdir has other model shapes; start a new "
                f"workdir or keep these fields: " + "; ".join(changed)
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
