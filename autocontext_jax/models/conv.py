"""The U-Net's 3x3x3 convolution, lowered the way each backend runs fastest.

XLA's CPU backend runs a 3D convolution through a generic path at about a tenth of the
matmul peak, while its 2D convolutions and matrix products run at a third to three
quarters of it. So on CPU a k x k x k "same" convolution becomes 2D convolutions over
(H, W), with every depth slice a batch element:

- input folding: the k depth neighbours of every voxel stacked as k C input channels;
- output folding: one 2D convolution to k O channels, the partial sums of the k depth
  taps, then added with a shift of one slice per tap.

`depth_folded` is input folding differentiated by autodiff, and what `auto` falls back to
on CPU when it is not timed (runtime/autotune.py times the candidates once per host).
`folded` has its own gradient, written for YNNPACK (the CPU kernel library XLA uses by
default), whose kernels are fastest with many output channels and slow on the
convolution autodiff makes of the kernel gradient: its forward pass folds the output when
C >= O and the input otherwise, its input gradient (the same "same" convolution, kernel
flipped, channels swapped) follows the same rule, and its kernel gradient is one matrix
product per depth slice between that slice's k^3 C x (B H W) patch matrix (built
channels-first, so its copies are long contiguous runs) and the output gradient. Our
programs compile without YNNPACK unless their `model.conv_impl` ends in `_ynnpack`
(`compiler_options`); XLA's Eigen kernels then run both lowerings about equally fast, and
`depth_folded` compiles in half the time. GPUs and TPUs run the native 3D convolution
(cuDNN, the TPU convolution unit). Every lowering is the same function of the same kernel,
so parameters and checkpoints do not care which ran.

YNNPACK is part of the conv_impl's name rather than a field of its own because it is a
property of the compiled program that goes with the lowering: the two are timed together
(`auto`), named together, and a named conv_impl then fixes both.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from autocontext_jax.config import schema

# native: XLA's 3D convolution; depth_folded: input folding differentiated by autodiff;
# folded: the per-shape folding with the hand-written gradient above.
LOWERINGS = ("native", "depth_folded", "folded")
# A conv_impl named LOWERING + this compiles with YNNPACK on (XLA's default on CPU); without
# it, off. Meaningless on GPU and TPU, where YNNPACK does not run.
YNNPACK_SUFFIX = "_ynnpack"
CONV_IMPLS = schema.choices("model.conv_impl")
# The named conv_impls, each a lowering with YNNPACK off, then on: what `auto` chooses from.
NAMED_CONV_IMPLS = tuple(impl for impl in CONV_IMPLS if impl != "auto")


def untimed_default(backend: str | None = None) -> str:
    """What `auto` is when it is not timed: `native` on GPU and TPU, `depth_folded` on CPU.

    On CPU, compiled without YNNPACK, `depth_folded` ran as fast as `folded` at the default
    and the paper crops (within 2-4 %, interleaved in one process) and compiles in about
    half the time. `backend` defaults to JAX's default backend.
    """
    return "depth_folded" if (backend or jax.default_backend()) == "cpu" else "native"


def resolve_conv_impl(impl: str, backend: str | None = None) -> str:
    """The named conv_impl `impl` stands for: itself, or `untimed_default` for `auto`.

    A run resolves `auto` by timing instead (runtime/autotune.py) and builds its model with
    the named result, so `auto` reaches here only where nothing timed it.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    return untimed_default(backend) if impl == "auto" else impl


def lowering(impl: str) -> str:
    """The lowering of `impl` (one of LOWERINGS), its YNNPACK setting left aside."""
    return resolve_conv_impl(impl).removesuffix(YNNPACK_SUFFIX)


# On CPU, XLA hands 2D convolutions and matrix products to YNNPACK by default; with that
# library turned off it runs them through Eigen. Interleaved in one process on the idle
# 2-core CPU: the default train step 5-10 % faster, the paper's 6 % (with depth_folded), a
# forward pass of an inference tile 1.3-1.5x faster; per layer, faster for most shapes,
# not all. The same CPU loaded by other jobs ran the step 1.2-1.4x faster with YNNPACK on
# (docs/performance.md): which is faster depends on the host, so `auto` times both.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _ynnpack_option_known() -> bool:
    """Whether this XLA knows the option that turns YNNPACK off (an older one has none)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(0.0).compile()
    except jax.errors.JaxRuntimeError as error:
        if "No such compile option" in str(error):
            return False
        raise
    return True


def compiler_options(impl: str, backend: str | None = None) -> dict[str, str] | None:
    """XLA options to compile a program of `impl`'s convolutions with (None: XLA's defaults).

    On CPU, YNNPACK fusion is turned off unless `impl` ends in `_ynnpack` (see above); an
    XLA too old to know the option has no YNNPACK to turn off. `backend` defaults to JAX's
    default backend; `auto` is its untimed default.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or resolve_conv_impl(impl, backend).endswith(YNNPACK_SUFFIX):
        return None
    return dict(_CPU_COMPILER_OPTIONS) if _ynnpack_option_known() else None


def _conv2d_same(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Stride-1 "same" 2D convolution of (N, H, W, C) with an (k, k, C, O) kernel."""
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _input_folded(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """The 3D convolution as one 2D convolution of the depth-stacked input (k C channels)."""
    batch, depth, height, width, channels = x.shape
    size, out_channels = kernel.shape[0], kernel.shape[-1]
    half = size // 2
    padded = jnp.pad(x, ((0, 0), (half, half), (0, 0), (0, 0), (0, 0)))
    # Channel index i * C + c holds depth neighbour i of channel c, matching the kernel below.
    stacked = jnp.concatenate([padded[:, i : i + depth] for i in range(size)], axis=-1)
    kernel_2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(
        size, size, size * channels, out_channels
    )
    y = _conv2d_same(stacked.reshape(batch * depth, height, width, size * channels), kernel_2d)
    return y.reshape(batch, depth, height, width, out_channels)


def _output_folded(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """The 3D convolution as one 2D convolution to k O channels and a shifted sum."""
    batch, depth, height, width, channels = x.shape
    size, out_channels = kernel.shape[0], kernel.shape[-1]
    half = size // 2
    # Output channel i * O + o is depth tap i's contribution to channel o of slice d - i + half.
    kernel_2d = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(
        size, size, channels, size * out_channels
    )
    taps = _conv2d_same(x.reshape(batch * depth, height, width, channels), kernel_2d)
    taps = taps.reshape(batch, depth, height, width, size, out_channels)
    taps = jnp.pad(taps, ((0, 0), (half, half), (0, 0), (0, 0), (0, 0), (0, 0)))
    return sum(taps[:, i : i + depth, :, :, i] for i in range(size))


def _folded_forward(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """The faster folding for these channel counts (see the module docstring)."""
    if x.shape[-1] >= kernel.shape[-1]:
        return _output_folded(x, kernel)
    return _input_folded(x, kernel)


def _kernel_gradient(x: jnp.ndarray, grad: jnp.ndarray, size: int) -> jnp.ndarray:
    """d(loss)/d(kernel) of a "same" convolution: one patch-matrix product per depth slice."""
    batch, depth, height, width, channels = x.shape
    out_channels = grad.shape[-1]
    half = size // 2
    # (D + 2h, B, C, H + 2h, W + 2h): a tap's patch rows are contiguous runs of W voxels.
    source = jnp.pad(
        jnp.transpose(x, (1, 0, 4, 2, 3)),
        ((half, half), (0, 0), (0, 0), (half, half), (half, half)),
    )
    grads = jnp.transpose(grad, (1, 0, 2, 3, 4)).reshape(depth, batch, -1, out_channels)

    def add_slice(total, inputs):
        index, grad_slice = inputs
        slab = jax.lax.dynamic_slice_in_dim(source, index, size, axis=0)
        patches = jnp.stack(
            [
                slab[i, :, :, j : j + height, k : k + width]
                for i in range(size)
                for j in range(size)
                for k in range(size)
            ],
            axis=1,
        ).reshape(batch, size**3 * channels, -1)
        product = jnp.einsum(
            "bkv,bvo->bko", patches, grad_slice, preferred_element_type=jnp.float32
        )
        return total + product, None

    # One depth slice per product: its patch matrix stays in cache. Measured on CPU against
    # chunks of 2 to D slices, which were slower at every U-Net shape timed (up to 6x).
    # The batch stays a batch axis until after the loop, so a batch sharded over devices
    # or processes is summed by one collective at the end, never one per slice.
    total, _ = jax.lax.scan(
        add_slice,
        jnp.zeros((batch, size**3 * channels, out_channels), jnp.float32),
        (jnp.arange(depth), grads),
    )
    return total.sum(0).reshape(size, size, size, channels, out_channels)


@jax.custom_vjp
def _folded(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    return _folded_forward(x, kernel)


def _folded_fwd(x, kernel):
    return _folded_forward(x, kernel), (x, kernel)


def _folded_bwd(residuals, grad):
    x, kernel = residuals
    # The transpose of a "same" odd-kernel convolution: flip every tap, swap C and O.
    transposed = jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4)
    grad_x = _folded_forward(grad, transposed)
    grad_kernel = _kernel_gradient(x, grad, kernel.shape[0])
    return grad_x, grad_kernel.astype(kernel.dtype)


_folded.defvjp(_folded_fwd, _folded_bwd)


def conv3d_same(x: jnp.ndarray, kernel: jnp.ndarray, impl: str = "auto") -> jnp.ndarray:
    """Stride-1 "same" 3D convolution of channels-last `x` with a (k, k, k, C, O) kernel."""
    impl = lowering(impl)
    size = kernel.shape[0]
    if impl == "native" or size == 1:
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )
    if kernel.shape[:3] != (size,) * 3 or size % 2 == 0:
        raise ValueError(f"{impl} needs an odd cubic kernel, got {kernel.shape[:3]}")
    if impl == "depth_folded":
        return _input_folded(x, kernel)
    return _folded(x, kernel)


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
