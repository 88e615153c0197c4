"""autocontext-jax: a multi-scale auto-context pyramid of 3D U-Nets in JAX."""

__version__ = "0.1.0"
