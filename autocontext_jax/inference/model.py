"""What predict segments with: one trained run, or several (an ensemble), from workdirs or a file.

    model = load_model(["runs/fold0", "runs/fold1"])      # two workdirs
    model = load_model(model_files=["model.zip"])         # `autocontext export`'s file
    labels = segment(model, read_scan("ct.nii.gz")).finest

Each member is a `Run` that runs its own pyramid coarse to fine; `segment` averages the
members' softmax before the argmax. A model of one member is that run, and segments
exactly as the run does. The members must read a scan alike (plan), name the same classes
and read references through the same label map, so they are checked here, in one place.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence

import ml_collections

from autocontext_jax.data.plan import Plan
from autocontext_jax.inference.export import is_model_file, read_model_file
from autocontext_jax.inference.run import (
    CheckpointError,
    Run,
    checkpoint_time,
    load_run,
    with_host_lowering,
)
from autocontext_jax.runtime.checkpointing import CONFIG_FILE

__all__ = [
    "MemberMismatchError",
    "Model",
    "as_model",
    "check_members",
    "load_model",
    "with_host_lowerings",
]


class MemberMismatchError(CheckpointError):
    """The members of an ensemble disagree on what they compute; the message names them."""


@dataclasses.dataclass(frozen=True)
class Model:
    """One or more trained runs of one plan, classes and label map, segmenting together."""

    members: tuple[Run, ...]

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a model needs at least one member")
        check_members(self.members)

    @property
    def first(self) -> Run:
        """The first member: its config, plan and classes are every member's."""
        return self.members[0]

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The first member's config (the members share its plan, classes and label map)."""
        return self.first.config

    @property
    def plan(self) -> Plan:
        """The preprocessing every member trained with."""
        return self.first.plan

    @property
    def num_classes(self) -> int:
        """Number of model classes, background included."""
        return self.first.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """Display names of the model's classes."""
        return self.first.class_names

    @property
    def label_map(self) -> tuple[tuple[int, int], ...]:
        """(dataset id, model class) pairs the members read their labels through."""
        return self.first.label_map

    @property
    def unmapped_labels(self) -> str:
        """What the members did with dataset ids their label map leaves out."""
        return self.first.unmapped_labels

    @property
    def num_levels(self) -> int:
        """Levels of every member's pyramid."""
        return self.first.num_levels

    @property
    def num_poolings(self) -> int:
        """The most poolings of any member: tiles must suit every member's U-Net."""
        return max(member.num_poolings for member in self.members)

    def checkpoint_time(self) -> float:
        """When the newest member's checkpoint (or model file) was written."""
        return max(checkpoint_time(member) for member in self.members)

    def description(self) -> str:
        """`step 400 of runs/default`, or one such phrase per member of an ensemble."""
        phrases = [f"step {member.step} of {member.workdir}" for member in self.members]
        if len(phrases) == 1:
            return phrases[0]
        return f"an ensemble of {len(phrases)}: " + "; ".join(phrases)


def _member_name(run: Run) -> str:
    return str(run.workdir)


def check_members(members: Sequence[Run]) -> None:
    """Raise MemberMismatchError, one line, when members differ in plan, classes or label map.

    Their pyramids must have as many levels, so each level's softmax can be averaged;
    widths, poolings, modes and seeds may differ.
    """
    first = members[0]
    checks = (
        ("preprocessing plan", lambda run: run.plan),
        ("classes", lambda run: run.class_names),
        ("label map", lambda run: (run.label_map, run.unmapped_labels)),
        ("pyramid levels", lambda run: run.num_levels),
    )
    for other in members[1:]:
        for what, value in checks:
            if value(other) != value(first):
                raise MemberMismatchError(
                    f"{_member_name(other)}: its {what} differs from that of "
                    f"{_member_name(first)} ({value(other)} vs {value(first)}); "
                    "an ensemble's members must agree"
                )


def as_model(model: Model | Run) -> Model:
    """`model` itself, or a one-member model of a run."""
    return model if isinstance(model, Model) else Model((model,))


def run_folders(path: pathlib.Path) -> list[pathlib.Path]:
    """The runs `path` names: itself when it is a run, else the runs inside it (fold runs)."""
    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return [path]
    found = sorted(child for child in path.iterdir() if (child / CONFIG_FILE).is_file())
    return found or [path]


def with_host_lowerings(
    model: Model, cache_folder: str | os.PathLike, say: Callable[[str], None] | None = None
) -> Model:
    """`model` with every member in the lowering its config resolves to on this host.

    Members of other shapes may get other lowerings: each is the same function of its
    parameters (`run.with_host_lowering`).
    """
    return Model(tuple(with_host_lowering(run, cache_folder, say) for run in model.members))


def load_model(
    workdirs: Sequence[str | os.PathLike] = (),
    model_files: Sequence[str | os.PathLike] = (),
    step: int | None = None,
) -> Model:
    """Every run of `workdirs` (at checkpoint `step`) and every member of `model_files`.

    A path in `workdirs` that is a model file is read as one, so `--workdir model.zip`
    works too; a folder that is not a run but holds runs (RUNS/fold0, RUNS/fold1, ...)
    gives each of them. `step` applies to workdirs only: a model file holds one step per
    member.
    """
    members: list[Run] = []
    for path in [*workdirs, *model_files]:
        path = pathlib.Path(path)
        if is_model_file(path):
            members.extend(read_model_file(path))
        elif path in map(pathlib.Path, model_files):
            raise CheckpointError(f"{path}: no such model file (autocontext export writes one)")
        else:
            members.extend(load_run(folder, step) for folder in run_folders(path))
    if not members:
        raise CheckpointError("no run given: --workdir RUN (repeatable) or --model FILE")
    return Model(tuple(members))
