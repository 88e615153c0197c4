"""Orbax checkpoints of the train state, and the run's resolved config beside them.

Both ways a checkpoint is read go through here: the whole train state to resume
(`restore_latest`), and a part of it to evaluate or predict (`restore_fields`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from autocontext_jax.data.atomic import write_text_atomically

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
# Used for runs saved before the surface metrics existed.
DEFAULT_NSD_TOLERANCE_MM = 2.0


class CheckpointError(ValueError):
    """A workdir has no usable checkpoint or config; the message names the path."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the message names it and why."""


# Orbax writes step N into N.orbax-checkpoint-tmp... and renames it when it commits.
_PARTIAL_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


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
    return ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR, options=options
    )


def save(
    manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite, force: bool = False
) -> None:
    """Start saving `step` in the background, after the previous save has committed.

    Raises SaveError, naming the checkpoint and the cause, if this or the previous save
    failed; the failed save's partial folder is removed.
    """
    finish_saves(manager, step)
    try:
        manager.save(step, args=args, force=force)
    except Exception as error:  # the blocking part of a save failed (e.g. no disk space)
        raise _save_failed(manager, step, error) from error


def check_saves(manager: ocp.CheckpointManager, step: int) -> None:
    """Raise SaveError if a background save has failed; cheap enough for every step.

    A save still in progress is not waited for: this only reads a flag of the manager.
    """
    if not manager.is_saving_in_progress():
        finish_saves(manager, step)


def finish_saves(manager: ocp.CheckpointManager, step: int) -> None:
    """Wait for the save in progress to commit; SaveError if it failed (noticed at `step`)."""
    try:
        manager.wait_until_finished()
    except Exception as error:  # whatever the handlers or the file system raised
        raise _save_failed(manager, step, error) from error


def _save_failed(manager: ocp.CheckpointManager, step: int, error: BaseException) -> SaveError:
    """The SaveError of a failed save, after removing its partial folder (process 0)."""
    directory = pathlib.Path(manager.directory)
    partial = [p for p in directory.glob("*") if _PARTIAL_STEP.match(p.name)]
    failed = sorted(int(_PARTIAL_STEP.match(p.name)[1]) for p in partial)
    if jax.process_index() == 0:
        # A full disk stays full while the partial folder is kept.
        for folder in partial:
            shutil.rmtree(folder, ignore_errors=True)
    what = (
        f"the checkpoint of step {failed[-1]} could not be written to {directory / str(failed[-1])}"
        if failed
        else f"a checkpoint could not be written to {directory}"
    )
    manager.reload()
    kept = manager.latest_step()
    last = f"the checkpoint of step {kept} is the last saved" if kept is not None else "none saved"
    return SaveError(
        f"{what} (noticed at step {step}): {_root_cause(error)}; its partial folder was "
        f"removed; {last}"
    )


def _root_cause(error: BaseException) -> str:
    """`Type: message` of the innermost exception of a chain, on one line."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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


def restore_fields(
    workdir: str | os.PathLike, target: dict[str, Any], step: int | None = None
) -> tuple[dict[str, Any], int]:
    """Some fields of the train state saved at `step` (default: the newest) of a run.

    `target` maps field names of the train state (e.g. "params", "batch_stats") to trees
    of shape structs with shardings; nothing else (optimiser moments) is read.
    """
    directory = pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoints folder; was the run trained?")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    try:
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(f"{directory}: no finished checkpoint")
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(
                f"{directory}: no checkpoint of step {step} (have {sorted(steps)})"
            )
        restore_args = jax.tree.map(
            lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding), target
        )
        # A checkpoint holds the train state beside the input pipeline's; only the named
        # fields of the state are read.
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                )
            ),
        ).state
    except CheckpointError:
        raise
    except Exception as error:  # orbax raises several types for missing or misshaped leaves
        raise CheckpointError(
            f"{directory / str(step)}: does not match the model of "
            f"{pathlib.Path(workdir) / CONFIG_FILE} ({type(error).__name__}: {error})"
        ) from error
    finally:
        manager.close()
    return dict(restored), step


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
    path = pathlib.Path(workdir) / CONFIG_FILE
    if path.exists() and (pathlib.Path(workdir) / CHECKPOINTS_DIR).exists():
        saved = json.loads(path.read_text())
        changed = [
            f"config.{section}.{name}: {saved[section][name]!r} -> {config[section][name]!r}"
            for section, name in SHAPE_FIELDS
            if section in saved and saved[section].get(name) != config[section][name]
        ]
        if changed:
            raise CheckpointError(
                f"{path}: the run in this workdir has other model shapes; start a new "
                f"workdir or keep these fields: " + "; ".join(changed)
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config that the run in `workdir` saved as config.json."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json; --workdir must be a training run's folder")
    try:
        config = ml_collections.ConfigDict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not a valid config ({error})") from error
    if "nsd_tolerance_mm" not in config.eval:
        config.eval.nsd_tolerance_mm = DEFAULT_NSD_TOLERANCE_MM
    return config
