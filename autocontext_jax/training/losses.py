"""Segmentation losses on softmax outputs: the paper's multi-class soft Dice, and CE."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Keeps the ratio defined when a class is absent from both prediction and reference.
DICE_SMOOTH = 1e-5


def soft_dice_per_class(probs: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Soft Dice of each class over all voxels of the batch: (..., K) -> (K,).

    `targets` may be one-hot or soft (class fractions of each voxel); Eq. 1 of Roth et
    al. is defined for any values in [0, 1].
    """
    axes = tuple(range(probs.ndim - 1))
    intersection = jnp.sum(probs * targets, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
    return (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)


def dice_loss(
    logits: jnp.ndarray, targets: jnp.ndarray, include_background: bool = True
) -> jnp.ndarray:
    """One minus the soft Dice averaged over the classes (Eq. 1 of the paper, plus one).

    The paper averages over all K classes; `include_background=False` averages over the
    K-1 structures only, as nnU-Net does, so that they share the whole Dice gradient.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    dice = soft_dice_per_class(probs, targets)
    return 1.0 - jnp.mean(dice if include_background else dice[1:])


def cross_entropy_loss(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Voxel-averaged cross-entropy against one-hot or soft targets."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


def segmentation_loss(
    name: str, logits: jnp.ndarray, targets: jnp.ndarray, dice_background: bool = True
) -> jnp.ndarray:
    """The loss called `name` (`dice` or `dice_ce`) of one pyramid level."""
    loss = dice_loss(logits, targets, dice_background)
    if name == "dice_ce":
        loss = loss + cross_entropy_loss(logits, targets)
    return loss
