"""Orbax checkpoints of the train state, and the run's resolved config beside them.

Both ways a checkpoint is read go through here: the whole train state to resume
(`restore_latest`), and a part of it to evaluate or predict (`restore_fields`). Both use
the newest intact checkpoint: one whose files fail their manifest (training.checksums) or
whose values are not all finite is named on standard error and skipped.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from autocontext_jax.config import schema
from autocontext_jax.data.atomic import write_text_atomically
from autocontext_jax.runtime import checksums

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = checksums.MANIFEST_FILE
# Where training moves the damaged checkpoints it skipped (beside CHECKPOINTS_DIR).
DAMAGED_DIR = "damaged_checkpoints"


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
    directory = pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.train.checkpoint_every,
        max_to_keep=config.train.keep_checkpoints,
        create=True,
        # A run killed while saving leaves a *.orbax-checkpoint-tmp folder: remove it.
        cleanup_tmp_directories=True,
        # Process 0 runs this when every process has written its files, just before the
        # folder is renamed into place: the manifest commits with the checkpoint.
        async_options=ocp.AsyncOptions(
            post_finalization_callback=lambda: _write_manifest_of_partial(directory)
        ),
    )
    return ocp.CheckpointManager(directory, options=options)


def _write_manifest_of_partial(directory: pathlib.Path) -> None:
    # One save is in flight at a time, and folders of killed saves are removed when the
    # manager starts, so the partial folder is the one about to commit.
    for folder in directory.glob("*"):
        if _PARTIAL_STEP.match(folder.name) and folder.is_dir():
            checksums.write_manifest(folder)


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


def check_saves(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether a background save is still in progress; SaveError if it has failed.

    A save in progress is not waited for: this reads a flag of the manager (about 60 us,
    Orbax's logging included), so a loop calls it after each step while a save is running.
    """
    if manager.is_saving_in_progress():
        return True
    finish_saves(manager, step)
    return False


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


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, int | None, Any]:
    """Restore the newest intact checkpoint into the structure, shapes and shardings of `target`.

    Returns (state, step, pipeline state of this process or None), or (target, None, None)
    when there is nothing to resume from; CheckpointError when no checkpoint is intact.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)

    def restore(step: int) -> tuple[Any, Any]:
        state = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        ).state
        return state, restore_pipeline_state(manager, step)

    steps = manager.all_steps()
    if not steps:
        return target, None, None
    directory = pathlib.Path(manager.directory)
    (state, pipeline), step, skipped = _newest_intact(
        directory, steps, restore, lambda restored: restored[0]
    )
    if skipped:
        # The run saves these steps again; the damaged folders are kept aside, not deleted.
        aside = directory.parent / DAMAGED_DIR
        for bad_step, damage in skipped:
            _warn(
                f"Skipping the checkpoint of step {bad_step} ({directory / str(bad_step)}): "
                f"{damage}; moved to {aside / str(bad_step)}"
            )
            if jax.process_index() == 0:
                aside.mkdir(exist_ok=True)
                target_folder = aside / str(bad_step)
                if target_folder.exists():
                    shutil.rmtree(target_folder)
                os.replace(directory / str(bad_step), target_folder)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("autocontext_jax:damaged_checkpoints_moved")
        manager.reload()
    return state, step, pipeline


def restore_fields(
    workdir: str | os.PathLike,
    target: dict[str, Any],
    step: int | None = None,
    note_unchecked: bool = True,
) -> tuple[dict[str, Any], int]:
    """Some fields of the train state saved at `step` (default: the newest intact one) of a run.

    `target` maps field names of the train state (e.g. "params", "batch_stats") to trees
    of shape structs with shardings; nothing else (optimiser moments) is read. A second
    read of a checkpoint already read passes `note_unchecked=False`: its note was given.
    """
    directory = pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoints folder; was the run trained?")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    restore_args = jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding), target)

    def restore(step: int) -> dict[str, Any]:
        # A checkpoint holds the train state beside the input pipeline's; only the named
        # fields of the state are read.
        return manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                )
            ),
        ).state

    try:
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(f"{directory}: no finished checkpoint")
        if step is not None and step not in steps:
            raise CheckpointError(
                f"{directory}: no checkpoint of step {step} (have {sorted(steps)})"
            )
        restored, step, skipped = _newest_intact(
            directory,
            steps if step is None else [step],
            restore,
            lambda restored: restored,
            model_source=pathlib.Path(workdir) / CONFIG_FILE,
            note_unchecked=note_unchecked,
        )
        for bad_step, damage in skipped:
            folder = directory / str(bad_step)
            _warn(f"Skipping the checkpoint of step {bad_step} ({folder}): {damage}")
    finally:
        manager.close()
    return dict(restored), step


def _newest_intact(
    directory: pathlib.Path,
    steps: Sequence[int],
    restore: Callable[[int], Any],
    arrays: Callable[[Any], Any],
    model_source: pathlib.Path | None = None,
    note_unchecked: bool = True,
) -> tuple[Any, int, list[tuple[int, str]]]:
    """(restore(step), step, [(newer step, damage)]) of the newest intact step.

    Intact: its files pass their manifest and its values are finite. CheckpointError if no
    step is. A checkpoint that passes its manifest yet does not restore does not match the
    model, which no older checkpoint of the run would either: that is an error at once.
    """
    problems = []
    for step in sorted(steps, reverse=True):
        folder = directory / str(step)
        damage = checksums.find_damage(folder)
        if damage is None:
            if note_unchecked and not checksums.has_manifest(folder):
                _warn(
                    f"Note: the checkpoint of step {step} has no {MANIFEST_FILE} (saved before "
                    "checkpoints had one): its files cannot be checked, only its values"
                )
            try:
                restored = restore(step)
            except Exception as error:  # orbax raises several types for missing or misshaped leaves
                source = model_source or directory.parent / CONFIG_FILE
                raise CheckpointError(
                    f"{folder}: does not match the model of {source} ({_root_cause(error)})"
                ) from error
            damage = _non_finite(arrays(restored))
            if damage is None:
                return restored, step, problems
        if len(steps) == 1:
            raise CheckpointError(f"{folder}: {damage}")
        problems.append((step, damage))
    found = "; ".join(f"step {step}: {damage}" for step, damage in problems)
    raise CheckpointError(
        f"{directory}: no intact checkpoint ({found}); move the folder away to train afresh"
    )


def _non_finite(tree: Any) -> str | None:
    """'non-finite values in NAME' for the first floating leaf that holds any, else None."""
    leaves = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    # One transfer for all the leaves, once per restore.
    finite = jax.device_get([jnp.isfinite(leaf).all() for _, leaf in leaves])
    for (path, _), ok in zip(leaves, finite, strict=True):
        if not ok:
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            return f"non-finite values in {name}"
    return None


def _warn(message: str) -> None:
    """One line for the user on standard error (process 0 only)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


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


def write_config(
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    refuse: Callable[[ml_collections.ConfigDict, ml_collections.ConfigDict], str | None]
    | None = None,
) -> None:
    """Write the resolved config to WORKDIR/config.json, refusing shape-changing resumes.

    `refuse(saved config, config)` may name another change a resume must not make.
    """
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
        problem = refuse(_migrated(path, saved), config) if refuse else None
        if problem:
            raise CheckpointError(f"{path}: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _migrated(path: pathlib.Path, saved: dict) -> ml_collections.ConfigDict:
    """The run config `saved` (read from `path`) with the fields it predates filled in."""
    try:
        config, _ = schema.migrate(ml_collections.ConfigDict(saved))
    except schema.ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from error
    return config


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config that the run in `workdir` saved, migrated to today's schema."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json; --workdir must be a training run's folder")
    try:
        config = ml_collections.ConfigDict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not a valid config ({error})") from error
    return _migrated(path, config)
