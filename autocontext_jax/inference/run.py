"""A trained run, loaded once from its workdir: what every road from a scan to labels needs.

    run = load_run("runs/default")          # config, model, variables, plan, step
    labels = segment(run, read_scan("ct.nii.gz")).finest

`predict`, `evaluate`, `plot`, the end-of-run evaluation and notebooks all load a run
here, so they apply the same checkpoint, the same preprocessing plan (the run's own
WORKDIR/plan.json, never a shared cache's) and the same label map.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.labels import class_names
from autocontext_jax.data.plan import Plan, load_run_plan
from autocontext_jax.inference.tiling import TilingOptions
from autocontext_jax.models import AutoContextPyramid, build_pyramid
from autocontext_jax.runtime import autotune, parallel
from autocontext_jax.runtime.checkpointing import (
    CHECKPOINTS_DIR,
    CheckpointError,
    read_run_config,
)
from autocontext_jax.training.state import (
    TrainState,
    evaluation_variables,
    restore_evaluation_variables,
)

__all__ = [
    "CheckpointError",
    "Run",
    "checkpoint_time",
    "default_options",
    "load_run",
    "run_from_state",
    "with_host_lowering",
]


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained pyramid ready to segment: its config, module, variables, plan and step."""

    # The run's folder, or the model file it was read from.
    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    model: AutoContextPyramid
    # The parameters it evaluates (the average when train.ema_decay > 0) and BatchNorm
    # statistics, replicated over every device.
    variables: dict[str, Any]
    step: int
    # The preprocessing the run trained with (spacing, normalisation).
    plan: Plan

    @property
    def num_classes(self) -> int:
        """Number of model classes, background included."""
        return self.config.model.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """Display names of the model's classes."""
        return class_names(self.num_classes)

    @property
    def label_map(self) -> tuple[tuple[int, int], ...]:
        """(dataset id, model class) pairs the run read its labels through; () for none."""
        return tuple(tuple(pair) for pair in self.config.data.label_map)

    @property
    def unmapped_labels(self) -> str:
        """What the run did with dataset ids its label map leaves out."""
        return self.config.data.unmapped_labels

    @property
    def num_levels(self) -> int:
        """Levels of the run's pyramid."""
        return self.model.num_levels

    @property
    def num_poolings(self) -> int:
        """Poolings of the run's U-Nets (tiles must be a multiple of 2^num_poolings)."""
        return self.model.num_poolings


def _read_run(
    workdir: pathlib.Path, conv_impl: str | None
) -> tuple[ml_collections.ConfigDict, AutoContextPyramid, Plan]:
    """(config, model, plan) of the run in `workdir`, from its config.json and plan.json."""
    config = read_run_config(workdir)
    try:
        model = build_pyramid(config, conv_impl)
    except (AttributeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"{workdir / 'config.json'}: cannot build the model ({error})"
        ) from error
    try:
        plan = load_run_plan(workdir)
    except DatasetError as error:
        raise CheckpointError(str(error)) from error
    return config, model, plan


def load_run(
    workdir: str | os.PathLike, step: int | None = None, conv_impl: str | None = None
) -> Run:
    """Load the run in `workdir` at checkpoint `step` (default: the newest).

    Shapes come from the run's config.json; only the variables it evaluates are read.
    `conv_impl` is the lowering to build the model with, where `auto` was resolved for
    this host (`with_host_lowering`); None: the config's, `auto` untimed.
    """
    workdir = pathlib.Path(workdir).absolute()
    config, model, plan = _read_run(workdir, conv_impl)
    sharding = parallel.replicated(parallel.make_mesh())
    variables, step = restore_evaluation_variables(workdir, model, config.train, sharding, step)
    return Run(workdir, config, model, variables, step, plan)


def run_from_state(
    workdir: str | os.PathLike, state: TrainState, conv_impl: str | None = None
) -> Run:
    """The Run that `load_run` would give for a checkpoint of `state`, without saving one.

    Validation during training segments through this: the same config, plan and model
    from the workdir (built with the training's `conv_impl`), and the same variables
    (`evaluation_variables`, which `restore_evaluation_variables` reads back from a
    checkpoint).
    """
    workdir = pathlib.Path(workdir).absolute()
    config, model, plan = _read_run(workdir, conv_impl)
    variables = evaluation_variables(state, config.train)
    return Run(workdir, config, model, variables, int(state.step), plan)


def with_host_lowering(
    run: Run, cache_folder: str | os.PathLike, say: Callable[[str], None] | None = None
) -> Run:
    """`run` with its model built in the lowering its config resolves to on this host.

    `auto` is timed once per host and shapes, or read from `cache_folder`, as training
    does (`autotune.resolve_lowering`), so a run predicts on another host than it trained
    on in that host's own fastest lowering; every lowering computes the same function of
    the same parameters. `say` gets autotune's lines for the user.
    """
    lowering = autotune.resolve_lowering(run.config, cache_folder, say=say)
    return dataclasses.replace(run, model=run.model.clone(conv_impl=lowering.conv_impl))


def default_options(config: ml_collections.ConfigDict, **overrides: Any) -> TilingOptions:
    """Tiling options for a run: tiles twice the training crop ("network reshaping").

    Overrides that are None keep the default.
    """
    values: dict[str, Any] = {"tile_size": 2 * config.data.crop_size}
    values.update({key: value for key, value in overrides.items() if value is not None})
    return TilingOptions(**values)


def level_names(run: Run) -> Sequence[str]:
    """`level_1` (coarsest) ... `level_S` (finest): the names reports use for the levels."""
    return [f"level_{s}" for s in range(1, run.num_levels + 1)]


def checkpoint_time(run: Run) -> float:
    """When the run's checkpoint was written (seconds since the epoch); 0 when it has none.

    A run read from a model file (`autocontext export`) was written when that file was.
    """
    if run.workdir.is_file():
        return run.workdir.stat().st_mtime
    folder = run.workdir / CHECKPOINTS_DIR / str(run.step)
    return folder.stat().st_mtime if folder.is_dir() else 0.0
