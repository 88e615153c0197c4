"""Augmentation that runs on the device, inside the jitted train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


def augment_intensity(
    rng: jax.Array, image: jax.Array, augment: ml_collections.ConfigDict
) -> jax.Array:
    """Random per-example gamma, intensity scale, shift and noise of (B, S, D, H, W, C) images.

    Gamma, scale and shift are shared by the levels of an example (one anatomy, one
    scanner); each is applied with probability `augment.probability`. Gamma acts on the
    example's own intensity range, mapped to [0, 1] and back.
    """
    batch = image.shape[0]
    keys = jax.random.split(rng, 6)
    example_shape = (batch,) + (1,) * (image.ndim - 1)

    def draw(key_apply: jax.Array, key_value: jax.Array, low: float, high: float, neutral):
        apply = jax.random.bernoulli(key_apply, augment.probability, example_shape)
        value = jax.random.uniform(key_value, example_shape, minval=low, maxval=high)
        return jnp.where(apply, value, neutral)

    scale = draw(keys[0], keys[1], 1 - augment.intensity_scale, 1 + augment.intensity_scale, 1.0)
    shift = draw(keys[2], keys[3], -augment.intensity_shift, augment.intensity_shift, 0.0)
    noise_std = draw(keys[4], keys[5], 0.0, augment.noise_std, 0.0)
    noise = jax.random.normal(jax.random.fold_in(rng, 1), image.shape, image.dtype)
    if augment.gamma > 0:
        # Its own keys, so the draws above stay what they were without gamma.
        gamma_keys = jax.random.split(jax.random.fold_in(rng, 2), 2)
        log_gamma = draw(*gamma_keys, -augment.gamma, augment.gamma, 0.0)
        axes = tuple(range(1, image.ndim))
        low = jnp.min(image, axis=axes, keepdims=True)
        span = jnp.max(image, axis=axes, keepdims=True) - low + 1e-6
        gamma_image = ((image - low) / span) ** jnp.exp(log_gamma) * span + low
        image = jnp.where(log_gamma == 0.0, image, gamma_image)
    return image * scale + shift + noise * noise_std
