"""CT intensity normalisation: a fixed Hounsfield window, then a fixed affine scaling."""

from __future__ import annotations

import ml_collections
import numpy as np


def normalize_hu(hu: np.ndarray | float, data_config: ml_collections.ConfigDict) -> np.ndarray:
    """Clip Hounsfield units to `data.intensity_clip`, then subtract the mean, divide by std."""
    low, high = data_config.intensity_clip
    clipped = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    return (clipped - np.float32(data_config.intensity_mean)) / np.float32(
        data_config.intensity_std
    )


def normalized_pad_value(data_config: ml_collections.ConfigDict) -> float:
    """The normalised intensity of everything outside the scan (`data.pad_value_hu`)."""
    return float(normalize_hu(data_config.pad_value_hu, data_config))
