"""The paper's multi-class soft Dice (Eq. 1) and the optional cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autocontext_jax.training.losses import DICE_SMOOTH, dice_loss, segmentation_loss


def _numpy_dice_loss(logits, targets, first_class=0):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    k = logits.shape[-1]
    p, t = p.reshape(-1, k), targets.reshape(-1, k)
    dice = [
        (2 * np.sum(p[:, c] * t[:, c]) + DICE_SMOOTH)
        / (np.sum(p[:, c]) + np.sum(t[:, c]) + DICE_SMOOTH)
        for c in range(first_class, k)
    ]
    return 1.0 - np.mean(dice)


def test_dice_loss_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 5, 4, 8)).astype(np.float32) * 3
    targets = np.eye(8, dtype=np.float32)[rng.integers(0, 8, size=(2, 6, 5, 4))]
    got = float(dice_loss(jnp.asarray(logits), jnp.asarray(targets)))
    assert got == pytest.approx(_numpy_dice_loss(logits, targets), rel=1e-5)


def test_dice_loss_accepts_soft_targets():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 4, 4, 4, 3)).astype(np.float32)
    targets = rng.dirichlet(np.ones(3), size=(1, 4, 4, 4)).astype(np.float32)
    got = float(dice_loss(jnp.asarray(logits), jnp.asarray(targets)))
    assert got == pytest.approx(_numpy_dice_loss(logits, targets), rel=1e-5)


def test_perfect_prediction_gives_zero_dice_loss():
    labels = jax.random.randint(jax.random.key(0), (1, 8, 8, 8), 0, 4)
    targets = jax.nn.one_hot(labels, 4)
    assert float(dice_loss(targets * 100.0, targets)) == pytest.approx(0.0, abs=1e-6)


def test_dice_ce_adds_the_cross_entropy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 4, 4, 4, 3)).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=(1, 4, 4, 4))]
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.mean(np.sum(targets * log_p, -1))
    got = float(segmentation_loss("dice_ce", jnp.asarray(logits), jnp.asarray(targets)))
    assert got == pytest.approx(_numpy_dice_loss(logits, targets) + ce, rel=1e-5)


def test_dice_loss_can_leave_the_background_out_of_the_average():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 4, 4, 5)).astype(np.float32)
    targets = np.eye(5, dtype=np.float32)[rng.integers(0, 5, size=(2, 4, 4, 4))]
    got = float(dice_loss(jnp.asarray(logits), jnp.asarray(targets), include_background=False))
    assert got == pytest.approx(_numpy_dice_loss(logits, targets, first_class=1), rel=1e-5)
    with_background = float(dice_loss(jnp.asarray(logits), jnp.asarray(targets)))
    assert got != pytest.approx(with_background, rel=1e-3)
