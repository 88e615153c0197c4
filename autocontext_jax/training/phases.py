"""The separately trained pyramid (pyramid.mode = "separate"): which level trains at which step.

Level 1 trains alone for its phase of steps; then it is frozen (parameters, BatchNorm
statistics, parameter average and optimiser moments) while level 2 trains on its
inference-mode predictions, and so on: the paper's "separately trained" row and nnU-Net's
cascade. Each phase has its own Adam moments and its own warm-up and cosine schedule over
the phase's length, as if each level were a run of its own. The phase of a step follows
from the step alone, so a checkpoint carries it implicitly and a resumed run crosses a
phase boundary exactly as an uninterrupted one.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from autocontext_jax.training.state import make_optimizer, make_schedule

SEPARATE = "separate"


def is_separate(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains its levels one after another (a pyramid of 2 levels or more)."""
    return config.pyramid.mode == SEPARATE and config.pyramid.levels > 1


def phase_starts(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The first step of each level's phase, level 1 (coarsest) first.

    `pyramid.level_steps` gives the steps of levels 1 .. S-1 (the finest trains the rest
    of `train.steps`); () splits `train.steps` equally.
    """
    levels, total = config.pyramid.levels, config.train.steps
    lengths = tuple(config.pyramid.level_steps)
    if not lengths:
        lengths = tuple((s + 1) * total // levels - s * total // levels for s in range(levels - 1))
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + int(length))
    return tuple(starts)


def phase_bounds(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """(first step, end step) of each level's phase, level 1 first."""
    starts = phase_starts(config)
    return list(zip(starts, [*starts[1:], config.train.steps], strict=True))


def moved_phases(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> str | None:
    """Why a separately trained run saved with `saved` must not resume with `config`, or None.

    The phase of a step follows from the config alone, so moved phase starts would retrain
    a frozen level or freeze one early; the finest level's phase may grow (train.steps).
    """
    if not (is_separate(saved) and is_separate(config)):
        return None
    before, after = phase_starts(saved), phase_starts(config)
    if before == after:
        return None
    kept = tuple(end - start for start, end in itertools.pairwise(before))
    return (
        f"the levels' phases of the run in this workdir start at steps {list(before)}, this "
        f"config's at {list(after)} (config.train.steps: {saved.train.steps!r} -> "
        f"{config.train.steps!r}, config.pyramid.level_steps: "
        f"{tuple(saved.pyramid.level_steps)!r} -> "
        f"{tuple(config.pyramid.level_steps)!r}); start a new workdir, or set "
        f"pyramid.level_steps={kept} to train the finest level longer"
    )


class PhasedState(NamedTuple):
    """The optimiser state of a separately trained pyramid: a step count, Adam per level."""

    count: jax.Array
    levels: dict[str, Any]


def _select(active: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)


def separate_optimizer(
    train_config: ml_collections.ConfigDict, bounds: list[tuple[int, int]]
) -> optax.GradientTransformation:
    """Adam per level, each stepping only during its level's phase and untouched outside it.

    Outside its phase a level gets zero updates and its moments are kept as they are, so
    its parameters stay bit for bit what its phase left.
    """
    inners = {
        f"level_{s + 1}": optax.adam(make_schedule(train_config, stop - start))
        for s, (start, stop) in enumerate(bounds)
    }

    def init(params: Any) -> PhasedState:
        return PhasedState(
            jnp.zeros((), jnp.int32), {name: tx.init(params[name]) for name, tx in inners.items()}
        )

    def update(grads: Any, state: PhasedState, params: Any = None) -> tuple[Any, PhasedState]:
        updates, levels = {}, {}
        for (name, tx), (start, stop) in zip(inners.items(), bounds, strict=True):
            active = (state.count >= start) & (state.count < stop)
            level_params = None if params is None else params[name]
            new_updates, new_state = tx.update(grads[name], state.levels[name], level_params)
            updates[name] = _select(active, new_updates, jax.tree.map(jnp.zeros_like, new_updates))
            levels[name] = _select(active, new_state, state.levels[name])
        return updates, PhasedState(state.count + 1, levels)

    return optax.GradientTransformation(init, update)


def phase_of(config: ml_collections.ConfigDict, step: int) -> int:
    """The phase (0-based level) that trains from host step number `step`; 0 unless separate."""
    if not is_separate(config):
        return 0
    return sum(step >= start for start in phase_starts(config)[1:])


def phase_index(step: jax.Array, bounds: list[tuple[int, int]]) -> jax.Array:
    """The 0-based level whose phase `step` (0-based, the step about to run) belongs to."""
    step = jnp.asarray(step)
    return sum((step >= start).astype(jnp.int32) for start, _ in bounds[1:])


def phase_learning_rate(
    train_config: ml_collections.ConfigDict, bounds: list[tuple[int, int]], step: jax.Array
) -> jax.Array:
    """The learning rate of the phase `step` belongs to, at the step's place in its phase."""
    rates = jnp.stack(
        [
            make_schedule(train_config, stop - start)(jnp.maximum(jnp.asarray(step) - start, 0))
            for start, stop in bounds
        ]
    )
    return rates[phase_index(step, bounds)]


def make_run_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The run's optimiser: Adam per level and phase when separate, else one Adam."""
    if is_separate(config):
        return separate_optimizer(config.train, phase_bounds(config))
    return make_optimizer(config.train)
