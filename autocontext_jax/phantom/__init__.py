"""Synthetic abdominal CT phantom, written as a Medical Segmentation Decathlon / nnU-Net dataset.

It is the project's embedded default dataset: every case is a random but anatomically arranged
abdomen (Hounsfield-like intensities, partial-volume blur, noise) with the eight classes of
`labels.PAPER_CLASS_NAMES`. Organs are smooth random blobs that a small 3D U-Net learns in minutes;
arteries and portal veins are thin branching tubes a few mm across, so a coarse pyramid level
alone cannot segment them well (the point of Roth et al. 2018).
"""

from autocontext_jax.phantom.generate import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    generate_case,
)
from autocontext_jax.phantom.write import write_phantom_dataset

__all__ = ["DEFAULT_SHAPE", "DEFAULT_SPACING", "generate_case", "write_phantom_dataset"]
