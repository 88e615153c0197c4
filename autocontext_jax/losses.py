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


def dice_loss(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """One minus the soft Dice averaged over the K classes (Eq. 1 of the paper, plus one)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return 1.0 - jnp.mean(soft_dice_per_class(probs, targets))


def cross_entropy_loss(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Voxel-averaged cross-entropy against one-hot or soft targets."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


LOSSES = {
    "dice": dice_loss,
    "dice_ce": lambda logits, targets: (
        dice_loss(logits, targets) + cross_entropy_loss(logits, targets)
    ),
}


def segmentation_loss(name: str, logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """The loss called `name` (`dice` or `dice_ce`) of one pyramid level."""
    return LOSSES[name](logits, targets)
