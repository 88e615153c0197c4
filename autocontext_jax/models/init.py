"""Initial variables of the pyramid, and parameter counts."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from autocontext_jax.models.pyramid import AutoContextPyramid


def init_variables(model: AutoContextPyramid, seed: int) -> dict[str, Any]:
    """Initial parameters and BatchNorm statistics of the pyramid.

    Parameters do not depend on the spatial size, so the smallest valid crop is used;
    the 'rbg' generator compiles several times faster than threefry for this many
    initialisers, and initialisation happens once.
    """
    edge = 2**model.num_poolings
    images = [jnp.zeros((1, edge, edge, edge, model.in_channels))] * model.num_levels
    init = jax.jit(model.init, static_argnames="train")
    return init(jax.random.key(seed, impl="rbg"), images, train=False)


def abstract_variables(model: AutoContextPyramid) -> dict[str, Any]:
    """The shapes and dtypes of the pyramid's variables, without computing them."""
    return jax.eval_shape(lambda: init_variables(model, 0))


def count_parameters(tree: Any) -> int:
    """Total number of scalars in a pytree of arrays or shape structs."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))
