"""The auto-context pyramid: shapes, context alignment and gradient flow per mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autocontext_jax.data.sampling import downsample_factor, level_region
from autocontext_jax.models.context import upsample_and_crop
from autocontext_jax.models.pyramid import AutoContextPyramid
from autocontext_jax.training.losses import dice_loss


def _pyramid(levels, mode="end_to_end", classes=3):
    return AutoContextPyramid(
        num_levels=levels, mode=mode, num_classes=classes, width=2, num_poolings=1
    )


def test_downsample_factors_follow_the_paper():
    assert [downsample_factor(s, 2) for s in (1, 2)] == [4, 2]
    assert [downsample_factor(s, 3) for s in (1, 2, 3)] == [8, 4, 2]
    assert downsample_factor(1, 1) == 2


@pytest.mark.slow
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_logits_of_every_level_have_the_crop_shape(levels):
    model = _pyramid(levels, classes=4)
    images = [jnp.ones((2, 8, 8, 8, 1))] * levels
    variables = model.init(jax.random.key(0), images)
    logits = model.apply(variables, images)
    assert [x.shape for x in logits] == [(2, 8, 8, 8, 4)] * levels
    first_kernel = variables["params"]["level_1"]["ConvBlock_0"]["Conv_0"]["kernel"]
    assert first_kernel.shape[-2] == 1
    for s in range(2, levels + 1):
        kernel = variables["params"][f"level_{s}"]["ConvBlock_0"]["Conv_0"]["kernel"]
        assert kernel.shape[-2] == 1 + 4  # image + K context channels
        assert model.level_in_channels(s) == 5


@pytest.mark.slow
def test_whole_volumes_nest_without_cropping():
    model = _pyramid(2)
    images = [jnp.ones((1, 4, 6, 8, 1)), jnp.ones((1, 8, 12, 16, 1))]
    variables = model.init(jax.random.key(0), images)
    logits = model.apply(variables, images)
    assert [x.shape[1:4] for x in logits] == [(4, 6, 8), (8, 12, 16)]


@pytest.mark.slow
def test_no_context_mode_has_image_channels_only():
    model = _pyramid(2, mode="none")
    images = [jnp.ones((1, 8, 8, 8, 1))] * 2
    variables = model.init(jax.random.key(0), images)
    assert variables["params"]["level_2"]["ConvBlock_0"]["Conv_0"]["kernel"].shape[-2] == 1


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="pyramid.mode"):
        _pyramid(2, mode="sideways").init(jax.random.key(0), [jnp.ones((1, 8, 8, 8, 1))] * 2)


@pytest.mark.parametrize("levels", [2, 3])
def test_a_coarse_marker_lands_on_the_finer_voxels_of_the_same_native_region(levels):
    crop, classes = 16, 2
    centre = (101, 77, 50)
    # A marker in one voxel of the level-(S-1) prediction, at a position off the centre.
    coarse_level = levels - 1
    marker = (5, 10, 6)  # inside the central half (voxels 4..11) that the finer level sees
    probs = np.zeros((1, crop, crop, crop, classes), np.float32)
    probs[..., 0] = 1.0
    probs[(0, *marker, 1)], probs[(0, *marker, 0)] = 1.0, 0.0
    context = np.asarray(upsample_and_crop(jnp.asarray(probs), (crop,) * 3))[0, ..., 1]

    # Native region of the marker voxel, and the finer voxels that lie inside it.
    coarse_start, _ = level_region(centre, crop, coarse_level, levels)
    fine_start, _ = level_region(centre, crop, levels, levels)
    coarse_factor = downsample_factor(coarse_level, levels)
    fine_factor = downsample_factor(levels, levels)
    expected = []
    for axis in range(3):
        native_lo = coarse_start[axis] + marker[axis] * coarse_factor
        lo = (native_lo - fine_start[axis]) // fine_factor
        expected.append(list(range(lo, lo + coarse_factor // fine_factor)))
    peak = np.argwhere(context == context.max())
    assert sorted(map(tuple, peak.tolist())) == sorted(
        (a, b, c) for a in expected[0] for b in expected[1] for c in expected[2]
    )
    # Trilinear upsampling leaks only into the immediate neighbours of those voxels.
    nonzero = np.argwhere(context > 1e-6)
    for axis in range(3):
        assert nonzero[:, axis].min() >= expected[axis][0] - 1
        assert nonzero[:, axis].max() <= expected[axis][-1] + 1


def test_upsample_and_crop_refuses_an_impossible_crop():
    with pytest.raises(ValueError, match="centre-crop"):
        upsample_and_crop(jnp.ones((1, 4, 4, 4, 2)), (9, 8, 8))


def _level_1_gradient(mode):
    model = _pyramid(2, mode=mode)
    images = [
        jax.random.normal(jax.random.key(1), (2, 8, 8, 8, 1)),
        jax.random.normal(jax.random.key(2), (2, 8, 8, 8, 1)),
    ]
    targets = jax.nn.one_hot(jax.random.randint(jax.random.key(3), (2, 8, 8, 8), 0, 3), 3)
    variables = model.init(jax.random.key(0), images)

    def level_2_loss(params):
        logits = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )[0]
        return dice_loss(logits[1], targets)

    grads = jax.grad(level_2_loss)(variables["params"])
    return max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["level_1"]))


@pytest.mark.slow
def test_end_to_end_sends_the_finer_loss_into_level_1():
    assert _level_1_gradient("end_to_end") > 1e-8


@pytest.mark.parametrize("mode", ["stagewise", "none"])
def test_stagewise_and_none_keep_level_1_out_of_the_finer_loss(mode):
    assert _level_1_gradient(mode) == 0.0
