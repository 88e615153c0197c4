"""The multi-scale auto-context pyramid of 3D U-Nets (Roth et al., MICCAI 2018).

Level 1 sees the image downsampled by 2^S; level s sees it downsampled by 2^(S-s+1).
How level s > 1 takes level s-1's softmax as context is the rule of models/context.py.

The context modes: `end_to_end` (one summed loss, gradients flow through the context into
the coarser levels), `stagewise` (one summed loss, trained jointly, the context through
`stop_gradient`), `separate` (each level trained in its own phase of steps on the frozen
coarser levels' inference-mode predictions: training/phases.py), `none` (no context).
The forward pass of `stagewise` and `separate` is that of `end_to_end`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from autocontext_jax.config import schema
from autocontext_jax.models import context
from autocontext_jax.models.unet import UNet3D

CONTEXT_MODES = schema.choices("pyramid.mode")
# The dtype of each allowed model.compute_dtype.
COMPUTE_DTYPES = {name: jnp.dtype(name) for name in schema.choices("model.compute_dtype")}


class AutoContextPyramid(nn.Module):
    """S stacked 3D U-Nets; level s > 1 takes level s-1's softmax as extra channels."""

    num_levels: int = 2
    mode: str = "end_to_end"
    num_classes: int = 8
    in_channels: int = 1
    width: int = 32
    num_poolings: int = 3
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    conv_impl: str = "auto"
    # Training only: the probability of replacing an example's context by the uniform 1/K,
    # drawn from the "context" rng stream.
    context_dropout: float = 0.0

    def setup(self) -> None:
        """Create one U-Net per level, named level_1 (coarsest) ... level_S (finest)."""
        if self.mode not in CONTEXT_MODES:
            raise ValueError(f"pyramid.mode must be one of {CONTEXT_MODES}, got {self.mode!r}")
        self.levels = [
            UNet3D(**self._unet_fields(), name=f"level_{s + 1}") for s in range(self.num_levels)
        ]

    def _unet_fields(self) -> dict[str, Any]:
        # The one place the pyramid hands its fields to the U-Net of a level.
        return {
            "num_classes": self.num_classes,
            "width": self.width,
            "num_poolings": self.num_poolings,
            "dtype": self.dtype,
            "bn_momentum": self.bn_momentum,
            "conv_impl": self.conv_impl,
        }

    def level_network(self) -> UNet3D:
        """A standalone U-Net equal to every level's: it applies the subtree `level_s` unchanged."""
        return UNet3D(**self._unet_fields(), parent=None)

    def takes_context(self, level: int) -> bool:
        """Whether pyramid `level` (1-based) gets the coarser level's softmax as input."""
        return context.takes_context(level, self.mode)

    def level_in_channels(self, level: int) -> int:
        """Number of input channels of pyramid `level` (1-based)."""
        return self.in_channels + (self.num_classes if self.takes_context(level) else 0)

    @property
    def padding_multiple(self) -> int:
        """What every size of a whole volume is padded to a multiple of: 2^levels * 2^poolings.

        Level grids then nest exactly (each finer grid twice the coarser one) and every
        level's grid is divisible by its U-Net's poolings.
        """
        return 2**self.num_levels * 2**self.num_poolings

    def __call__(self, images: Sequence[jnp.ndarray], train: bool = False) -> list[jnp.ndarray]:
        """Map per-level images (coarsest first, each (B, D, H, W, C)) to per-level logits.

        Training crops have the same size at every level, so each finer level sees the
        central half of the coarser field of view; whole volumes have finer levels
        exactly twice the size of the coarser one. Both are "upsample x2, centre-crop".
        """
        if len(images) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} image levels, got {len(images)}")
        stop = self.mode != "end_to_end"

        def run_level(level: int, coarser_logits: jnp.ndarray | None) -> jnp.ndarray:
            x = images[level - 1]
            if coarser_logits is not None:
                dropped = None
                if train and self.context_dropout > 0:
                    key = self.make_rng("context")
                    dropped = context.context_dropout_mask(key, x.shape[0], self.context_dropout)
                probs = context.context_probabilities(coarser_logits, stop_gradient=stop)
                x = context.finer_input(x, probs, dropped)
            return self.levels[level - 1](x, train=train)

        return context.coarse_to_fine(self.num_levels, self.mode, run_level)


def build_pyramid(
    config: ml_collections.ConfigDict, conv_impl: str | None = None
) -> AutoContextPyramid:
    """Build the pyramid module described by `config.model` and `config.pyramid`.

    `conv_impl` is the lowering to build it with, where a run has resolved `auto` for its
    host (runtime/autotune.py); None: the config's own, `auto` then its untimed default.
    Every lowering computes the same function of the same parameters.
    """
    return AutoContextPyramid(
        num_levels=config.pyramid.levels,
        mode=config.pyramid.mode,
        num_classes=config.model.num_classes,
        in_channels=config.model.in_channels,
        width=config.model.width,
        num_poolings=config.model.num_poolings,
        dtype=COMPUTE_DTYPES[config.model.compute_dtype],
        bn_momentum=config.model.bn_momentum,
        conv_impl=conv_impl or config.model.conv_impl,
        context_dropout=float(config.pyramid.context_dropout),
    )
