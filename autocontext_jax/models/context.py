"""The auto-context rule, once: how a coarser level's output becomes a finer level's input.

Level s > 1 of the pyramid (unless the mode is `none`) takes the softmax of level s-1,
upsampled x2 (trilinear, half-voxel centres), centre-cropped to its own field of view and
concatenated to its image as K extra channels; levels run coarse to fine. The pyramid
module, the separate step, tiled inference and the diagnostics all go through these
functions, so a change to the method (another context, another alignment) is made here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp

Output = TypeVar("Output")


def takes_context(level: int, mode: str) -> bool:
    """Whether pyramid `level` (1-based) gets the coarser level's softmax in context `mode`."""
    return level > 1 and mode != "none"


def coarse_to_fine(
    num_levels: int, mode: str, run_level: Callable[[int, Output | None], Output]
) -> list[Output]:
    """Every level's output, coarsest first: `run_level(level, coarser output or None)`.

    A level that takes context gets the output of the level just coarser than it.
    """
    outputs: list[Output] = []
    for level in range(1, num_levels + 1):
        coarser = outputs[-1] if takes_context(level, mode) else None
        outputs.append(run_level(level, coarser))
    return outputs


def context_probabilities(coarser_logits: jnp.ndarray, stop_gradient: bool = False) -> jnp.ndarray:
    """The coarser level's softmax over classes (the context), optionally without gradient."""
    probs = jax.nn.softmax(coarser_logits, axis=-1)
    return jax.lax.stop_gradient(probs) if stop_gradient else probs


def upsample_and_crop(probs: jnp.ndarray, spatial_shape: Sequence[int]) -> jnp.ndarray:
    """Upsample channels-last `probs` x2 (trilinear) and centre-crop to `spatial_shape`.

    The resize uses half-voxel centres, so voxel i of the upsampled grid covers the
    first or second half of coarse voxel i // 2: exactly the nesting of two grids whose
    voxels are 2^k x 2^k x 2^k blocks of the same native grid.
    """
    batch, *coarse, channels = probs.shape
    up = jax.image.resize(probs, (batch, *(2 * n for n in coarse), channels), method="trilinear")
    starts = []
    for full, want in zip(up.shape[1:4], spatial_shape, strict=True):
        if want > full or (full - want) % 2:
            raise ValueError(f"cannot centre-crop an upsampled context of size {full} to {want}")
        starts.append((full - want) // 2)
    return jax.lax.slice(
        up,
        (0, *starts, 0),
        (batch, *(s + n for s, n in zip(starts, spatial_shape, strict=True)), channels),
    )


def finer_input(
    image: jnp.ndarray, coarser_probs: jnp.ndarray, dropped: jnp.ndarray | None = None
) -> jnp.ndarray:
    """`image` (B, D, H, W, C) with the coarser level's probabilities as K more channels.

    The probabilities are upsampled x2 and centre-cropped to the image's grid. Examples
    where the (B,) bool `dropped` is set get the uniform 1/K instead (context dropout).
    """
    context = upsample_and_crop(coarser_probs, image.shape[1:4])
    if dropped is not None:
        uniform = jnp.full_like(context, 1.0 / context.shape[-1])
        context = jnp.where(dropped[:, None, None, None, None], uniform, context)
    return jnp.concatenate([image, context.astype(image.dtype)], axis=-1)


def context_dropout_mask(key: jax.Array, batch: int, rate: float) -> jnp.ndarray | None:
    """Which of `batch` examples lose their context, each with probability `rate` (None at 0)."""
    if rate <= 0.0:
        return None
    return jax.random.bernoulli(key, rate, (batch,))
