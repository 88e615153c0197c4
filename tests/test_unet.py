"""The 3D U-Net: parameter count of the paper, shapes, dtypes, and the up-convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autocontext_jax.models.init import count_parameters
from autocontext_jax.models.unet import UNet3D, UpConv, max_pool_2x2x2

PAPER_PARAMETERS = 19.07e6


def _abstract_params(module, channels):
    x = jnp.zeros((1, 8, 8, 8, channels))
    return jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]


def test_paper_unet_has_19_07_million_parameters():
    params = _abstract_params(UNet3D(num_classes=8, width=32, num_poolings=3), 1)
    assert count_parameters(params) == pytest.approx(PAPER_PARAMETERS, rel=0.005)


def test_parameter_count_follows_the_cicek_layout():
    # Width w, one pooling: convs 1->w, w->2w, 2w->2w, 2w->4w, up 4w->4w (2x2x2, bias),
    # convs 6w->2w, 2w->2w, head 2w->K; BatchNorm adds scale and shift per conv channel.
    w, k = 4, 3
    convs = [(1, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (6 * w, 2 * w), (2 * w, 2 * w)]
    expected = sum(27 * a * b + 2 * b for a, b in convs)
    expected += 8 * 4 * w * 4 * w + 4 * w  # up-convolution
    expected += 2 * w * k + k  # 1x1x1 head
    params = _abstract_params(UNet3D(num_classes=k, width=w, num_poolings=1), 1)
    assert count_parameters(params) == expected


@pytest.mark.slow
@pytest.mark.parametrize("poolings", [1, 2, 3])
def test_output_is_float32_logits_of_the_input_size(poolings):
    model = UNet3D(num_classes=5, width=2, num_poolings=poolings)
    x = jnp.ones((2, 8, 16, 8, 3))
    variables = model.init(jax.random.key(0), x)
    out = model.apply(variables, x)
    assert out.shape == (2, 8, 16, 8, 5)
    assert out.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_parameters():
    model = UNet3D(num_classes=3, width=2, num_poolings=1, dtype=jnp.bfloat16)
    x = jnp.ones((1, 8, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
    assert model.apply(variables, x).dtype == jnp.float32


def test_upconv_equals_a_stride_2_transposed_convolution():
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 5, 6))
    ours = UpConv(7)
    variables = ours.init(jax.random.key(2), x)
    reference = nn.ConvTranspose(7, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
    # flax's ConvTranspose does not flip its kernel: tap (1-i, 1-j, 1-k) writes offset (i, j, k).
    flipped = {"params": {**variables["params"]}}
    flipped["params"]["kernel"] = variables["params"]["kernel"][::-1, ::-1, ::-1]
    expected = reference.apply(flipped, x)
    np.testing.assert_allclose(ours.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    assert expected.shape == (2, 6, 8, 10, 7)


def test_batch_statistics_are_updated_in_training_only():
    model = UNet3D(num_classes=3, width=2, num_poolings=1)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 1)) * 3 + 1
    variables = model.init(jax.random.key(0), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    # In inference the running statistics are used and left exactly as they were...
    _, unchanged = model.apply(variables, x, train=False, mutable=["batch_stats"])
    for a, b in zip(before, jax.tree.leaves(unchanged["batch_stats"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # ...and they, not the batch's statistics, normalise: an example's output does not depend
    # on the rest of its batch in inference, as it does in training.
    alone = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(model.apply(variables, x, train=False)[:1], alone, atol=1e-6)
    trained_alone, _ = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])
    trained, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(trained[:1], trained_alone, atol=1e-3)


def test_max_pool_equals_flax_max_pool_and_its_gradient_on_relu_outputs():
    x = jax.nn.relu(jax.random.normal(jax.random.key(7), (2, 4, 6, 8, 3)))

    def pooled_sum(pool):
        return lambda x: jnp.sum(pool(x) * jnp.arange(3.0))

    flax_pool = lambda x: nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))  # noqa: E731
    np.testing.assert_array_equal(max_pool_2x2x2(x), flax_pool(x))
    # Through the ReLU, as in the network: ties (zeros) carry no gradient either way.
    ours = jax.grad(lambda z: pooled_sum(max_pool_2x2x2)(jax.nn.relu(z)))(x - 0.5)
    reference = jax.grad(lambda z: pooled_sum(flax_pool)(jax.nn.relu(z)))(x - 0.5)
    np.testing.assert_allclose(ours, reference)
