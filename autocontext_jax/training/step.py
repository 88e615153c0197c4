"""The pure train step (state, batch, rng) -> (state, metrics), compiled over the mesh."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from autocontext_jax.data.device_augment import augment_intensity, device_pyramid_crops
from autocontext_jax.models import context, conv
from autocontext_jax.models.pyramid import AutoContextPyramid
from autocontext_jax.runtime import parallel
from autocontext_jax.training import phases
from autocontext_jax.training.losses import segmentation_loss
from autocontext_jax.training.state import TrainState, ema_update, make_schedule

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# The context dropout's keys: fold_in(step key, this), apart from the augmentation's.
_CONTEXT_STREAM = 1_000_003


def all_finite(*trees) -> jax.Array:
    """A scalar bool: whether every element of every array in `trees` is finite."""
    leaves = jax.tree.leaves(trees)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def level_inputs(
    batch: Batch, rng: jax.Array, config: ml_collections.ConfigDict
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Each level's augmented image crop and target, coarsest first, from a host batch.

    A batch of raw boxes (`image_box`, the device path of the spatial augmentation) is
    warped into the levels' crops first; the intensity augmentation follows on both paths.
    """
    num_levels = config.pyramid.levels
    if "image_box" in batch:
        batch = device_pyramid_crops(
            batch, config.data.crop_size, num_levels, config.model.num_classes
        )
    image = augment_intensity(rng, batch["image"], config.augment)
    images = [image[:, s] for s in range(num_levels)]
    targets = [batch["label"][:, s] for s in range(num_levels)]
    return images, targets


def weighted_loss(level_losses: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """The summed loss of the levels, each weighted by `pyramid.level_loss_weights` if set."""
    weights = tuple(config.pyramid.level_loss_weights)
    if not weights:
        return jnp.sum(level_losses)
    return jnp.sum(jnp.asarray(weights, level_losses.dtype) * level_losses)


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    phase: int = 0,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """The pure train step (state, batch, rng) -> (state, metrics) for `model`.

    `batch["image"]` is (B, S, c, c, c, C) and `batch["label"]` (B, S, c, c, c, K), level 1
    (coarsest) first. The total loss is the sum of the level losses; whether level s-1
    learns from level s's loss is decided by the pyramid's mode. A batch of raw boxes
    (`image_box`, the device path of the spatial augmentation) is warped into those
    crops first, inside the step. A separately trained pyramid has a step of its own per
    phase (`make_separate_train_step`, level `phase` + 1 learning; `make_train_steps`).
    """
    if phases.is_separate(config):
        return make_separate_train_step(model, optimizer, config, phase)
    schedule = make_schedule(config.train)
    num_levels = config.pyramid.levels
    dropout = model.context_dropout > 0  # the pyramid's own field, from the config

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(rng, state.step)
        images, targets = level_inputs(batch, rng, config)
        rngs = {"context": jax.random.fold_in(rng, _CONTEXT_STREAM)} if dropout else None

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs=rngs,
            )
            level_losses = jnp.stack(
                [
                    segmentation_loss(
                        config.loss.name,
                        level_logits,
                        level_targets,
                        config.loss.dice_background,
                    )
                    for level_logits, level_targets in zip(logits, targets, strict=True)
                ]
            )
            return weighted_loss(level_losses, config), (level_losses, updates["batch_stats"])

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (level_losses, batch_stats)), grads = grad_fn(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=ema_update(state.ema_params, params, state.step, config.train.ema_decay),
        )
        metrics = {
            # One device-side flag, read by the loop only where it synchronises anyway.
            "finite": all_finite(loss, grads, params, batch_stats),
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
        }
        for s in range(num_levels):
            metrics[f"loss_level_{s + 1}"] = level_losses[s]
        return new_state, metrics

    return train_step


def make_separate_train_step(
    model: AutoContextPyramid,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    phase: int,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """The step of phase `phase` of a separately trained pyramid: only level `phase` + 1 learns.

    The phase is fixed when the step is built, not chosen inside it: on XLA's CPU backend
    a `lax.switch` between the phases made every step 15 times slower (3.8 s against 0.24
    s at the default size). In level p's phase the coarser levels run in inference mode
    (running BatchNorm statistics, the evaluated parameters: the average when
    train.ema_decay > 0), so level p learns from the context it will get at evaluation;
    level p trains on its own loss; finer levels do not run. The frozen levels'
    parameters, statistics, averages and moments are left as they are (`optimizer` is
    `phases.separate_optimizer`). The loss of a level not yet trained is logged as NaN;
    that of a frozen level is its inference-mode loss on the batch. Context dropout
    applies to the context of the level that learns.
    """
    bounds = phases.phase_bounds(config)
    num_levels = config.pyramid.levels
    net = model.level_network()
    names = [f"level_{s + 1}" for s in range(num_levels)]
    averaged = config.train.ema_decay > 0
    dropout = model.context_dropout

    def level_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
        return segmentation_loss(config.loss.name, logits, targets, config.loss.dice_background)

    def phase_loss(state: TrainState, images: list, targets: list, key: jax.Array):
        frozen = state.ema_params if averaged else state.params
        dropped = context.context_dropout_mask(key, images[0].shape[0], dropout)

        def loss_fn(params):
            losses, batch_stats = [], dict(state.batch_stats)

            def run_level(level: int, coarser_logits: jax.Array | None) -> jax.Array:
                s, name = level - 1, names[level - 1]
                x = images[s]
                if coarser_logits is not None:
                    probs = context.context_probabilities(coarser_logits, stop_gradient=True)
                    x = context.finer_input(x, probs, dropped if s == phase else None)
                if s < phase:
                    variables = {"params": frozen[name], "batch_stats": state.batch_stats[name]}
                    logits = net.apply(variables, x, train=False)
                else:
                    variables = {"params": params[name], "batch_stats": state.batch_stats[name]}
                    logits, updates = net.apply(variables, x, train=True, mutable=["batch_stats"])
                    batch_stats[name] = updates["batch_stats"]
                losses.append(level_loss(logits, targets[s]))
                return logits

            # Level `phase` + 1 learns; the finer levels do not run in its phase.
            context.coarse_to_fine(phase + 1, model.mode, run_level)
            untrained = [jnp.full((), jnp.nan, jnp.float32)] * (num_levels - phase - 1)
            return losses[phase], (jnp.stack(losses + untrained), batch_stats)

        return jax.value_and_grad(loss_fn, has_aux=True)(state.params)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(rng, state.step)
        images, targets = level_inputs(batch, rng, config)
        key = jax.random.fold_in(rng, _CONTEXT_STREAM)
        (loss, (level_losses, batch_stats)), grads = phase_loss(state, images, targets, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = {}
        for s, (name, (start, _)) in enumerate(zip(names, bounds, strict=True)):
            # Each level's average starts with its phase, as a run of its own would.
            new = ema_update(
                state.ema_params[name],
                params[name],
                jnp.maximum(state.step - start, 0),
                config.train.ema_decay,
            )
            ema_params[name] = new if s == phase else state.ema_params[name]
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=ema_params,
        )
        metrics = {
            "finite": all_finite(loss, grads, params, batch_stats),
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": phases.phase_learning_rate(config.train, bounds, state.step),
        }
        for s in range(num_levels):
            metrics[f"loss_level_{s + 1}"] = level_losses[s]
        return new_state, metrics

    return train_step


def make_train_steps(
    model: nn.Module, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict
) -> list[Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]]:
    """The run's steps: one per phase of a separately trained pyramid (`phases.phase_of`
    picks the step of a step number), else the one step."""
    count = config.pyramid.levels if phases.is_separate(config) else 1
    return [make_train_step(model, optimizer, config, phase) for phase in range(count)]


def jit_train_step(
    train_step: Callable, mesh: jax.sharding.Mesh, conv_impl: str
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """Compile the step over `mesh`: batch split on its leading axis, the rest replicated.

    The state is donated so parameters and optimiser moments are updated in place.
    `conv_impl` is the lowering the step's model was built with (`model.conv_impl`): it
    says whether the program compiles with YNNPACK (`conv.compiler_options`).
    """
    replicated = parallel.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(replicated, parallel.batch_sharded(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
        compiler_options=conv.compiler_options(conv_impl),
    )
