"""The 3D U-Net of Çiçek et al. (2016), channels-last, as a flax linen module.

Layout (width w, P poolings): analysis level l has two 3x3x3 conv + BatchNorm + ReLU
blocks with w*2^l and w*2^(l+1) channels, followed by 2x2x2 max pooling; the bottom level
(l = P) has the same two blocks; each synthesis level upsamples with a 2x2x2 stride-2
transposed convolution that keeps the channel count, concatenates the analysis skip and
applies two conv blocks with w*2^(l+1) channels; a 1x1x1 convolution gives the K logits.
At w=32, P=3, one input channel and 8 classes this is 19.07 M parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from autocontext_jax.models.conv import Conv3D

Dtype = Any


class ConvBlock(nn.Module):
    """3x3x3 convolution, BatchNorm and ReLU."""

    features: int
    dtype: Dtype = jnp.float32
    bn_momentum: float = 0.9
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Apply the block to a channels-last (B, D, H, W, C) tensor."""
        # No conv bias: the BatchNorm shift that follows makes it redundant. The name keeps
        # the parameter paths of `nn.Conv`, which this module replaces one for one.
        x = Conv3D(self.features, 3, impl=self.conv_impl, dtype=self.dtype, name="Conv_0")(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )(x)
        return nn.relu(x)


class UpConv(nn.Module):
    """2x2x2 transposed convolution with stride 2 (the U-Net's "up-convolution").

    With kernel size equal to stride, every input voxel writes its own 2x2x2 output
    block, so the layer is one channel matmul followed by a depth-to-space reshape, and
    much faster on CPU than a dilated convolution. Kernel tap (i, j, k) writes output
    offset (i, j, k), as in PyTorch's ConvTranspose3d; `flax.linen.ConvTranspose` is the
    same function with the spatial kernel axes reversed.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Double every spatial size of a channels-last (B, D, H, W, C) tensor."""
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=-1),
            (2, 2, 2, x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        batch, depth, height, width, _ = x.shape
        y = jnp.einsum("bdhwc,ijkco->bdihjwko", x, kernel)
        y = y.reshape(batch, 2 * depth, 2 * height, 2 * width, self.features)
        return y + bias


def max_pool_2x2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2x2 max pooling with stride 2 of a channels-last tensor with even spatial sizes.

    A reshape and a max instead of `nn.max_pool`'s reduce-window, whose gradient is a
    select-and-scatter that XLA's CPU backend runs slowly. The two differ only in how a
    tie shares the gradient; ties come from ReLU zeros, whose gradient is zero anyway.
    """
    batch, depth, height, width, channels = x.shape
    blocks = x.reshape(batch, depth // 2, 2, height // 2, 2, width // 2, 2, channels)
    return blocks.max(axis=(2, 4, 6))


def conv_channels(in_channels: int, width: int, num_poolings: int) -> list[tuple[int, int, int]]:
    """(level, input channels, output channels) of each 3x3x3 convolution of `UNet3D`, in order.

    Level l runs at the input's size / 2^l. The layout of the module docstring, which
    `UNet3D.__call__` builds and `flops.unet_forward_flops` counts.
    """
    layers = []
    channels = in_channels
    for level in range(num_poolings + 1):
        first, second = width * 2**level, width * 2 ** (level + 1)
        layers += [(level, channels, first), (level, first, second)]
        channels = second
    for level in reversed(range(num_poolings)):
        # The up-convolution keeps its channels; the analysis skip is concatenated to them.
        skip = width * 2 ** (level + 1)
        layers += [(level, skip + channels, skip), (level, skip, skip)]
        channels = skip
    return layers


class UNet3D(nn.Module):
    """Çiçek et al. 3D U-Net mapping (B, D, H, W, C_in) to (B, D, H, W, K) logits."""

    num_classes: int = 8
    width: int = 32
    num_poolings: int = 3
    dtype: Dtype = jnp.float32
    bn_momentum: float = 0.9
    # How 3x3x3 convolutions are lowered (models/conv.py); every choice is the same function.
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Return float32 logits; `train` selects batch statistics and updates them."""
        x = x.astype(self.dtype)
        skips = []
        for level in range(self.num_poolings + 1):
            x = self._block(self.width * 2**level, x, train)
            x = self._block(self.width * 2 ** (level + 1), x, train)
            if level < self.num_poolings:
                skips.append(x)
                x = max_pool_2x2x2(x)
        for level in reversed(range(self.num_poolings)):
            x = UpConv(x.shape[-1], dtype=self.dtype)(x)
            x = jnp.concatenate([skips[level], x], axis=-1)
            x = self._block(self.width * 2 ** (level + 1), x, train)
            x = self._block(self.width * 2 ** (level + 1), x, train)
        logits = nn.Conv(self.num_classes, (1, 1, 1), dtype=self.dtype, param_dtype=jnp.float32)(x)
        return logits.astype(jnp.float32)

    def _block(self, features: int, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        block = ConvBlock(
            features, dtype=self.dtype, bn_momentum=self.bn_momentum, conv_impl=self.conv_impl
        )
        return block(x, train)
