"""The U-Net's 3x3x3 convolution, lowered the way each backend runs fastest.

XLA's CPU backend runs a 3D convolution through a generic path at about a tenth of the
matmul peak, while its 2D convolution (Eigen's spatial convolution) runs at half of it or
better. A 3x3x3 "same" convolution is exactly a 3x3 2D convolution over (H, W) whose input
channels are the three depth neighbours of every voxel stacked (3 C channels), applied to
every depth slice as a batch element. On CPU we use that form; GPUs and TPUs run the native
3D convolution (cuDNN, the TPU convolution unit), which is already their fastest path.
Both are the same function of the same kernel, so parameters and checkpoints do not care.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "native", "depth_folded")


def resolve_conv_impl(impl: str) -> str:
    """The lowering `impl` stands for on the default backend (`auto`: fastest known)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "depth_folded" if jax.default_backend() == "cpu" else "native"
    return impl


def conv3d_same(x: jnp.ndarray, kernel: jnp.ndarray, impl: str = "auto") -> jnp.ndarray:
    """Stride-1 "same" 3D convolution of channels-last `x` with a (k, k, k, C, O) kernel."""
    impl = resolve_conv_impl(impl)
    size = kernel.shape[0]
    if impl == "native" or size == 1:
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )
    if kernel.shape[:3] != (size,) * 3 or size % 2 == 0:
        raise ValueError(f"depth_folded needs an odd cubic kernel, got {kernel.shape[:3]}")
    batch, depth, height, width, channels = x.shape
    out_channels = kernel.shape[-1]
    half = size // 2
    padded = jnp.pad(x, ((0, 0), (half, half), (0, 0), (0, 0), (0, 0)))
    # Channel index i * C + c holds depth neighbour i of channel c, matching the kernel below.
    stacked = jnp.concatenate([padded[:, i : i + depth] for i in range(size)], axis=-1)
    kernel_2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(
        size, size, size * channels, out_channels
    )
    y = jax.lax.conv_general_dilated(
        stacked.reshape(batch * depth, height, width, size * channels),
        kernel_2d,
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y.reshape(batch, depth, height, width, out_channels)


class Conv3D(nn.Module):
    """A bias-free stride-1 "same" k x k x k convolution with `flax.linen.Conv`'s parameters.

    The kernel is (k, k, k, C, O), initialised like `nn.Conv`'s (LeCun normal over
    k^3 C inputs), so the two modules are interchangeable parameter for parameter.
    """

    features: int
    kernel_size: int = 3
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Convolve a channels-last (B, D, H, W, C) tensor."""
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*(self.kernel_size,) * 3, x.shape[-1], self.features),
            jnp.float32,
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv3d_same(x, kernel, self.impl)
