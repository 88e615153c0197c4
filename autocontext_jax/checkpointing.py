"""Orbax checkpoints of the train state, and the run's resolved config beside them."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import grain
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


def save_args(state: Any, pipeline_state: dict) -> ocp.args.Composite:
    """What a checkpoint holds: the train state and, per process, the input pipeline's state."""
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        pipeline=grain.checkpoint.CheckpointSave(_PipelineState(pipeline_state)),
    )


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, int | None]:
    """Restore the newest checkpoint into the structure, shapes and shardings of `target`.

    Returns (state, step), or (target, None) when there is nothing to resume from.
    """
    step = manager.latest_step()
    if step is None:
        return target, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
    return restored.state, step


def restore_pipeline_state(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The input pipeline state of this process saved at `step`, or None without one."""
    if not (pathlib.Path(manager.directory) / str(step) / "pipeline").is_dir():
        return None
    holder = _PipelineState({})
    manager.restore(
        step, args=ocp.args.Composite(pipeline=grain.checkpoint.CheckpointRestore(holder))
    )
    return holder.state


class _PipelineState:
    """The saved pipeline state in the shape Grain's checkpoint handler reads and writes.

    The handler stores get_state()'s bytes in one JSON file per process and hands them
    back to set_state(); the state itself comes from data.pipeline.ResumableBatches.
    """

    def __init__(self, state: dict) -> None:
        self.state = state

    def get_state(self) -> bytes:
        """The state as JSON bytes."""
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        """Take the state from JSON bytes."""
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """Nothing to prefetch: the handler calls this after a restore."""


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
