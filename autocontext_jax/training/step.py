"""The pure train step (state, batch, rng) -> (state, metrics), compiled over the mesh."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from autocontext_jax.data.device_augment import augment_intensity, device_pyramid_crops
from autocontext_jax.models import conv
from autocontext_jax.training import parallel
from autocontext_jax.training.losses import segmentation_loss
from autocontext_jax.training.state import TrainState, ema_update, make_schedule

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def all_finite(*trees) -> jax.Array:
    """A scalar bool: whether every element of every array in `trees` is finite."""
    leaves = jax.tree.leaves(trees)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """The pure train step (state, batch, rng) -> (state, metrics) for `model`.

    `batch["image"]` is (B, S, c, c, c, C) and `batch["label"]` (B, S, c, c, c, K), level 1
    (coarsest) first. The total loss is the sum of the level losses; whether level s-1
    learns from level s's loss is decided by the pyramid's mode. A batch of raw boxes
    (`image_box`, the device path of the spatial augmentation) is warped into those
    crops first, inside the step.
    """
    schedule = make_schedule(config.train)
    num_levels = config.pyramid.levels

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(rng, state.step)
        if "image_box" in batch:
            batch = device_pyramid_crops(
                batch, config.data.crop_size, num_levels, config.model.num_classes
            )
        image = augment_intensity(rng, batch["image"], config.augment)
        images = [image[:, s] for s in range(num_levels)]
        targets = [batch["label"][:, s] for s in range(num_levels)]

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
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
            return jnp.sum(level_losses), (level_losses, updates["batch_stats"])

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


def jit_train_step(
    train_step: Callable, mesh: jax.sharding.Mesh
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """Compile the step over `mesh`: batch split on its leading axis, the rest replicated.

    The state is donated so parameters and optimiser moments are updated in place.
    """
    replicated = parallel.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(replicated, parallel.batch_sharded(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
        compiler_options=conv.compiler_options(),
    )
