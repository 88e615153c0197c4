"""Augmentation that runs on the device, inside the jitted train step.

Intensity augmentation always runs here. The spatial warp runs here when
`augment.device` says so (spatial_on_device): the host then ships raw boxes and the
transform's parameters (data/augment.py: device_region) instead of finished crops, and
device_pyramid_crops turns them into the very crops data/augment.py would have cut.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections

from autocontext_jax.data.augment import spatial_augmentation_on
from autocontext_jax.data.sampling import downsample_factor


def spatial_on_device(augment: ml_collections.ConfigDict, backend: str) -> bool:
    """Whether the spatial warp runs on the device: `augment.device`, `auto` per backend.

    `auto` warps on the device on an accelerator, and on the host on a CPU, where the host
    workers warp while the step runs and the device path measured slower
    (benchmarks/input_pipeline.py); with no spatial augmentation configured the host
    path, which then only cuts crops, is kept on every backend.
    """
    if augment.device == "auto":
        return backend != "cpu" and spatial_augmentation_on(augment)
    return augment.device == "device"


def _smooth_field(control: jax.Array, edge: int) -> jax.Array:
    """data/augment.py's smooth field: control points spread with Gaussian weights."""
    points = control.shape[1]
    positions = (jnp.arange(points) + 0.5) * edge / points
    grid = jnp.arange(edge, dtype=jnp.float32)[:, None]
    weights = jnp.exp(-0.5 * ((grid - positions[None, :]) / (edge / points)) ** 2)
    weights = weights / weights.sum(axis=1, keepdims=True)
    field = jnp.einsum("xi,cijk->cxjk", weights, control)
    field = jnp.einsum("yj,cxjk->cxyk", weights, field)
    return jnp.einsum("zk,cxyk->cxyz", weights, field)


def _gather(box: jax.Array, index: list[jax.Array], outside) -> jax.Array:
    """box[index], or `outside` where the index leaves the box."""
    inside = jnp.ones(index[0].shape, bool)
    for i, n in enumerate(box.shape):
        inside &= (index[i] >= 0) & (index[i] < n)
    flat = (index[0] * box.shape[1] + index[1]) * box.shape[2] + index[2]
    values = jnp.take(box.reshape(-1), jnp.clip(flat, 0, box.size - 1))
    return jnp.where(inside, values, outside)


def warp_box(example: dict[str, jax.Array], edge: int) -> tuple[jax.Array, jax.Array]:
    """The E^3 region of one example of raw box and transform: image linear, labels nearest.

    Own gathers rather than jax.scipy.ndimage.map_coordinates: its nearest neighbour
    rounds half to even, scipy's (the host path) rounds half up.
    """
    offsets = jnp.arange(edge, dtype=jnp.float32) - edge // 2
    grid = jnp.meshgrid(offsets, offsets, offsets, indexing="ij")
    matrix = example["matrix"]
    field = _smooth_field(example["elastic"], edge)
    coordinates = [
        example["origin"][i] + sum(matrix[i, j] * grid[j] for j in range(3)) + field[i]
        for i in range(3)
    ]
    low = [jnp.floor(c) for c in coordinates]
    fraction = [c - f for c, f in zip(coordinates, low, strict=True)]
    low = [f.astype(jnp.int32) for f in low]
    image = jnp.zeros((edge,) * 3, jnp.float32)
    for corner in itertools.product((0, 1), repeat=3):
        weight = 1.0
        for i in range(3):
            weight = weight * (fraction[i] if corner[i] else 1.0 - fraction[i])
        index = [low[i] + corner[i] for i in range(3)]
        image = image + weight * _gather(example["image_box"], index, example["pad_value"])
    # scipy's order 0 reads floor(x + 0.5).
    nearest = [jnp.floor(c + 0.5).astype(jnp.int32) for c in coordinates]
    label = _gather(example["label_box"], nearest, jnp.uint8(0))
    return image, label


def device_pyramid_crops(
    batch: dict[str, jax.Array], crop_size: int, num_levels: int, num_classes: int
) -> dict[str, jax.Array]:
    """The batch of pyramid crops (image, class fractions) warped from a batch of raw boxes.

    One warp of the region the coarsest level sees per example; every level is cut from
    it and averaged in blocks, as data/augment.py: augmented_pyramid_crops does on the host.
    """
    edge = downsample_factor(1, num_levels) * crop_size
    c = crop_size

    def one(example: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        region_image, region_label = warp_box(example, edge)
        images, labels = [], []
        for level in range(1, num_levels + 1):
            factor = downsample_factor(level, num_levels)
            first = edge // 2 - (factor * c) // 2
            window = (slice(first, first + factor * c),) * 3
            blocks = (c, factor, c, factor, c, factor)
            images.append(region_image[window].reshape(blocks).mean(axis=(1, 3, 5)))
            level_label = region_label[window].reshape(blocks)
            # A comparison per class, fused into its reduction: no (E^3, K) one-hot.
            labels.append(
                jnp.stack(
                    [(level_label == k).mean(axis=(1, 3, 5)) for k in range(num_classes)],
                    axis=-1,
                )
            )
        return jnp.stack(images)[..., None], jnp.stack(labels)

    image, label = jax.vmap(one)(batch)
    return {"image": image, "label": label}


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
