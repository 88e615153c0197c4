"""The train state (a pytree), its optimiser, its parameter average, and where it comes from."""

from __future__ import annotations

import pathlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp

from autocontext_jax.models.init import abstract_variables, init_variables
from autocontext_jax.runtime import checkpointing


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, so it can be donated and saved."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # Exponential moving average of the parameters (train.ema_decay), used to evaluate.
    ema_params: Any


def make_schedule(
    train_config: ml_collections.ConfigDict, steps: int | None = None
) -> optax.Schedule:
    """The learning-rate schedule named by `train.schedule`, over `steps` (default train.steps).

    A `steps` shorter than the warm-up (a phase of a separately trained pyramid) warms up
    for all but its last step.
    """
    if train_config.schedule == "constant":
        return optax.constant_schedule(train_config.learning_rate)
    warmup_steps = train_config.warmup_steps
    if steps is None:
        steps = train_config.steps
    else:
        warmup_steps = min(warmup_steps, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(steps, 1),
        end_value=train_config.learning_rate * train_config.final_lr_fraction,
    )


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with the configured schedule."""
    return optax.adam(make_schedule(train_config))


def create_train_state(
    model: nn.Module, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    """A fresh train state at step 0."""
    variables = init_variables(model, seed)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(params),
        # A copy: the step donates the state, and one buffer cannot be donated twice.
        ema_params=jax.tree.map(jnp.copy, params),
    )


def abstract_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    seed: int,
    sharding: jax.sharding.Sharding,
) -> TrainState:
    """The train state's shapes, dtypes and sharding, without computing it.

    A checkpoint restored into this never compiles and runs the initialisation only to
    overwrite it.
    """
    abstract = jax.eval_shape(lambda: create_train_state(model, optimizer, seed))
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract
    )


def restore_or_create_state(
    manager: ocp.CheckpointManager,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    seed: int,
    sharding: jax.sharding.Sharding,
) -> tuple[TrainState, int | None, dict | None]:
    """(state, step, pipeline state) of the newest intact checkpoint of `manager`.

    Without a checkpoint: a fresh state, None and None.
    """
    target = abstract_train_state(model, optimizer, seed, sharding)
    state, step, pipeline = checkpointing.restore_latest(manager, target)
    if step is None:
        state = jax.device_put(create_train_state(model, optimizer, seed), sharding)
    return state, step, pipeline


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """One step of the parameter average; early steps use a shorter memory (1+t)/(10+t)."""
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def evaluated_params_field(train_config: ml_collections.ConfigDict) -> str:
    """The TrainState field that is evaluated: `ema_params` when train.ema_decay > 0."""
    return "ema_params" if train_config.ema_decay > 0 else "params"


def evaluation_variables(state: TrainState, train_config: ml_collections.ConfigDict) -> dict:
    """The variables to evaluate: averaged parameters when train.ema_decay > 0.

    What `restore_evaluation_variables` reads from a checkpoint of this state.
    """
    params = getattr(state, evaluated_params_field(train_config))
    return {"params": params, "batch_stats": state.batch_stats}


def restore_evaluation_variables(
    workdir: str | pathlib.Path,
    model: nn.Module,
    train_config: ml_collections.ConfigDict,
    sharding: jax.sharding.Sharding,
    step: int | None = None,
    live: bool = False,
    note_unchecked: bool = True,
) -> tuple[dict[str, Any], int]:
    """(variables, step): what `evaluation_variables` gives, read from a run's checkpoint.

    Only the parameters it evaluates (the average when train.ema_decay > 0; the last
    parameters, which the train step uses, when `live`) and the BatchNorm statistics are
    read, into the shapes of `model`.
    """
    abstract = abstract_variables(model)
    params_field = "params" if live else evaluated_params_field(train_config)
    target = {params_field: abstract["params"], "batch_stats": abstract["batch_stats"]}
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), target
    )
    restored, step = checkpointing.restore_fields(workdir, target, step, note_unchecked)
    return {"params": restored[params_field], "batch_stats": restored["batch_stats"]}, step
