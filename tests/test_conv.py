"""The fast convolution lowering is the plain 3D convolution, value and gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autocontext_jax.models.conv import (
    LOWERINGS,
    NAMED_CONV_IMPLS,
    Conv3D,
    compiler_options,
    conv3d_same,
    lowering,
    resolve_conv_impl,
)
from autocontext_jax.models.flops import unet_forward_flops
from autocontext_jax.models.unet import UNet3D


def _plain(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["depth_folded", "folded"])
@pytest.mark.parametrize(
    ("shape", "out_channels", "size"),
    [
        ((2, 5, 6, 7, 3), 4, 3),  # C < O: forward folds the input, input gradient the output
        ((1, 6, 4, 5, 5), 2, 3),  # C > O: the other way round
        ((1, 4, 3, 6, 2), 2, 3),  # C = O
        ((1, 7, 6, 5, 2), 3, 5),  # a 5x5x5 kernel
    ],
)
def test_folded_convolutions_equal_the_plain_one_with_gradients(impl, shape, out_channels, size):
    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (size, size, size, shape[-1], out_channels))
    probe = jax.random.normal(jax.random.key(2), (*shape[:-1], out_channels))

    def loss(function):
        return lambda x, k: jnp.sum(function(x, k) * probe)

    with jax.default_matmul_precision("highest"):
        folded_value = conv3d_same(x, kernel, impl)
        plain_value = _plain(x, kernel)
        folded = jax.grad(loss(lambda x, k: conv3d_same(x, k, impl)), (0, 1))(x, kernel)
        plain = jax.grad(loss(_plain), (0, 1))(x, kernel)
    np.testing.assert_allclose(folded_value, plain_value, rtol=1e-5, atol=1e-4)
    for ours, reference in zip(folded, plain, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_folded_convolution_works_under_vmap_and_in_bfloat16():
    x = jax.random.normal(jax.random.key(7), (3, 1, 4, 4, 4, 2))
    kernel = jax.random.normal(jax.random.key(8), (3, 3, 3, 2, 3))
    batched = jax.vmap(lambda v: conv3d_same(v, kernel, "folded"))(x)
    np.testing.assert_allclose(
        batched, _plain(x.reshape(3, 4, 4, 4, 2), kernel)[:, None], rtol=1e-5, atol=1e-4
    )
    # Mixed precision: the kernel gradient comes back in the kernel's dtype.
    low = jax.grad(lambda k: conv3d_same(x[0].astype(jnp.bfloat16), k, "folded").sum())(
        kernel.astype(jnp.bfloat16)
    )
    assert low.dtype == jnp.bfloat16
    reference = jax.grad(lambda k: _plain(x[0], k).sum())(kernel)
    np.testing.assert_allclose(low.astype(jnp.float32), reference, rtol=5e-2, atol=5e-1)


def test_conv3d_module_matches_flax_conv_parameter_for_parameter():
    x = jax.random.normal(jax.random.key(3), (1, 4, 4, 4, 2))
    ours = Conv3D(5, impl="depth_folded")
    reference = nn.Conv(5, (3, 3, 3), padding="SAME", use_bias=False)
    ours_vars = ours.init(jax.random.key(4), x)
    reference_vars = reference.init(jax.random.key(4), x)
    # Same shapes and the same initialiser: identical parameters from the same key.
    np.testing.assert_array_equal(ours_vars["params"]["kernel"], reference_vars["params"]["kernel"])
    np.testing.assert_allclose(
        ours.apply(ours_vars, x), reference.apply(reference_vars, x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "impl", ["depth_folded", "folded", "depth_folded_ynnpack", "folded_ynnpack"]
)
def test_unet_outputs_and_gradients_agree_across_lowerings(impl):
    x = jax.random.normal(jax.random.key(5), (2, 4, 8, 4, 1))
    native = UNet3D(num_classes=3, width=2, num_poolings=1, conv_impl="native")
    folded = native.clone(conv_impl=impl)
    variables = native.init(jax.random.key(6), x)

    def loss(model):
        def value(params):
            logits, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

        # Compiled as the project compiles it: YNNPACK on for _ynnpack only (on CPU).
        options = compiler_options(model.conv_impl)
        gradient = jax.jit(jax.value_and_grad(value, has_aux=True), compiler_options=options)
        return gradient(variables["params"])

    # Full float32 products: GPUs otherwise run float32 convolutions in TF32, differently
    # rounded for the two lowerings, and the comparison would measure that instead.
    with jax.default_matmul_precision("highest"):
        (_, native_logits), native_grads = loss(native)
        (_, folded_logits), folded_grads = loss(folded)
    np.testing.assert_allclose(folded_logits, native_logits, rtol=1e-4, atol=1e-4)
    for ours, reference in zip(
        jax.tree.leaves(folded_grads), jax.tree.leaves(native_grads), strict=True
    ):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_auto_lowering_and_bad_names():
    cpu = jax.default_backend() == "cpu"
    # Untimed (runtime/autotune.py times it where a run has a cache folder).
    assert resolve_conv_impl("auto") == ("depth_folded" if cpu else "native")
    assert resolve_conv_impl("auto", "gpu") == "native"
    assert resolve_conv_impl("auto", "cpu") == "depth_folded"
    # An explicit choice is always honoured.
    assert resolve_conv_impl("folded") == "folded"
    assert resolve_conv_impl("native") == "native"
    assert resolve_conv_impl("folded_ynnpack") == "folded_ynnpack"
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("winograd")


def test_every_named_conv_impl_is_a_lowering_with_ynnpack_off_or_on():
    assert NAMED_CONV_IMPLS == (
        "native",
        "depth_folded",
        "folded",
        "native_ynnpack",
        "depth_folded_ynnpack",
        "folded_ynnpack",
    )
    assert [lowering(impl) for impl in NAMED_CONV_IMPLS] == [*LOWERINGS, *LOWERINGS]
    # On GPU and TPU there is no YNNPACK: XLA's defaults whatever the name.
    assert compiler_options("depth_folded", "gpu") is None
    assert compiler_options("depth_folded_ynnpack", "gpu") is None
    # On CPU, _ynnpack compiles with XLA's defaults (YNNPACK on), the rest without it.
    assert compiler_options("folded_ynnpack", "cpu") is None
    assert compiler_options("native", "cpu") in (None, {"xla_cpu_experimental_ynn_fusion_type": ""})
    assert compiler_options("auto", "cpu") == compiler_options("depth_folded", "cpu")


def _jaxpr_flops(jaxpr) -> int:
    """FLOPs of every convolution and dot product in a jaxpr, nested calls included."""
    total = 0
    for equation in jaxpr.eqns:
        if equation.primitive.name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in equation.invars)
            (out,) = (v.aval for v in equation.outvars)
            # Output elements times the taps and input channels that each sums.
            total += 2 * out.size * rhs.size // rhs.shape[-1]
        elif equation.primitive.name == "dot_general":
            lhs, _ = (v.aval for v in equation.invars)
            (out,) = (v.aval for v in equation.outvars)
            (contracting, _), _ = equation.params["dimension_numbers"]
            total += 2 * out.size * int(np.prod([lhs.shape[d] for d in contracting]))
        for param in equation.params.values():
            if hasattr(param, "jaxpr"):
                total += _jaxpr_flops(param.jaxpr)
    return total


@pytest.mark.slow
def test_cpu_programs_compile_without_ynnpack_and_compute_the_same():
    options = compiler_options("folded", "cpu")
    if options is None:
        pytest.skip("this XLA has no YNNPACK fusion to turn off")
    assert options == {"xla_cpu_experimental_ynn_fusion_type": ""}
    x = jax.random.normal(jax.random.key(0), (2, 6, 8, 8, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 8))

    def loss(x, kernel):
        return jnp.sum(conv3d_same(x, kernel, "folded") ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), compiler_options=options)
    lowered = grad.lower(x, kernel).compile().as_text()
    assert "__ynn_fusion" not in lowered
    for ours, xla in zip(
        jax.tree.leaves(grad(x, kernel)),
        jax.tree.leaves(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel)),
        strict=True,
    ):
        np.testing.assert_allclose(ours, xla, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("poolings,in_channels", [(1, 1), (3, 9)])
def test_analytic_flops_match_the_traced_network(poolings, in_channels):
    model = UNet3D(num_classes=8, width=4, num_poolings=poolings, conv_impl="native")
    x = jnp.zeros((1, 16, 8, 16, in_channels))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x))(variables)
    assert unet_forward_flops((16, 8, 16), in_channels, 8, 4, poolings) == _jaxpr_flops(jaxpr.jaxpr)
