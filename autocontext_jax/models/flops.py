"""Analytic floating-point operation counts of the U-Net and the pyramid.

A convolution costs 2 FLOPs (one multiply, one add) per kernel tap, input channel, output
channel and output voxel; pooling, BatchNorm, activations and losses are not counted, as
is usual when quoting a network's FLOPs. A train step costs three forward passes (forward,
gradient with respect to activations, gradient with respect to weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from autocontext_jax.models.pyramid import build_pyramid
from autocontext_jax.models.unet import conv_channels


def unet_forward_flops(
    spatial_shape: Sequence[int], in_channels: int, num_classes: int, width: int, num_poolings: int
) -> int:
    """FLOPs of one forward pass of the 3D U-Net (models/unet.py) on one example."""
    voxels = [
        int(np.prod([n // 2**level for n in spatial_shape])) for level in range(num_poolings + 1)
    ]
    macs = sum(
        voxels[level] * 27 * inputs * outputs
        for level, inputs, outputs in conv_channels(in_channels, width, num_poolings)
    )
    # Up-convolution: every coarse voxel writes a 2x2x2 block, its w * 2^(l+2) channels kept.
    macs += sum(
        voxels[level + 1] * 8 * (width * 2 ** (level + 2)) ** 2 for level in range(num_poolings)
    )
    macs += voxels[0] * 2 * width * num_classes  # the 1x1x1 logits
    return 2 * macs


def pyramid_forward_flops(config: ml_collections.ConfigDict, spatial_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of the whole pyramid on one example of crop `spatial_shape`."""
    model = build_pyramid(config)
    return sum(
        unet_forward_flops(
            spatial_shape,
            model.level_in_channels(level),
            model.num_classes,
            model.width,
            model.num_poolings,
        )
        for level in range(1, model.num_levels + 1)
    )


def train_step_flops(config: ml_collections.ConfigDict) -> int:
    """FLOPs of one train step of `config`: three forward passes of the global batch."""
    crop = (config.data.crop_size,) * 3
    return 3 * config.train.batch_size * pyramid_forward_flops(config, crop)
