"""The warning for inputs that do not look like CT in Hounsfield units."""

from __future__ import annotations

import numpy as np

from autocontext_jax.data.hounsfield import hounsfield_warning


def _ct(rng):
    """Air around a body of soft tissue with some bone, as a CT scan in HU."""
    image = np.full((40, 40, 40), -1000.0) + rng.normal(0, 20, (40, 40, 40))
    image[8:32, 8:32, :] = 40 + rng.normal(0, 30, (24, 24, 40))
    image[18:22, 18:22, :] = 1200.0
    return image.astype(np.float32)


def test_ct_passes_and_a_label_map_or_another_range_is_named():
    rng = np.random.default_rng(0)
    assert hounsfield_warning(_ct(rng)) is None
    # CT stored as integers (int16 HU) is still CT.
    assert hounsfield_warning(np.rint(_ct(rng))) is None
    labels = np.zeros((40, 40, 40), np.float32)
    labels[5:20, 5:20, 5:20] = 5
    labels[22:30, 22:30, 22:30] = 117
    assert "a label map" in hounsfield_warning(labels)
    mr = rng.uniform(0, 1, (40, 40, 40)).astype(np.float32)
    assert "span only" in hounsfield_warning(mr)
    shifted = _ct(rng) + 32768.0  # unsigned storage without its rescale intercept
    assert "far outside" in hounsfield_warning(shifted)
