"""The 3D U-Net and the auto-context pyramid built from it."""

from autocontext_jax.models.pyramid import COMPUTE_DTYPES, AutoContextPyramid, build_pyramid

__all__ = ["COMPUTE_DTYPES", "AutoContextPyramid", "build_pyramid"]
