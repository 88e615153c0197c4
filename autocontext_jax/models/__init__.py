"""The 3D U-Net and the auto-context pyramid built from it."""

import jax.numpy as jnp
import ml_collections

from autocontext_jax.models.pyramid import AutoContextPyramid

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_pyramid(config: ml_collections.ConfigDict) -> AutoContextPyramid:
    """Build the pyramid module described by `config.model` and `config.pyramid`."""
    return AutoContextPyramid(
        num_levels=config.pyramid.levels,
        mode=config.pyramid.mode,
        num_classes=config.model.num_classes,
        in_channels=config.model.in_channels,
        width=config.model.width,
        num_poolings=config.model.num_poolings,
        dtype=COMPUTE_DTYPES[config.model.compute_dtype],
        bn_momentum=config.model.bn_momentum,
        conv_impl=config.model.get("conv_impl", "auto"),
    )
