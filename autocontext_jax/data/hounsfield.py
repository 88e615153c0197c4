"""Does a scan look like CT in Hounsfield units? A cheap look before segmenting it.

A model trained on CT segments anything it is given; a label map or an MR image passed
by mistake comes back as a plausible-looking wrong answer. These checks only warn.
"""

from __future__ import annotations

import numpy as np

# Air is about -1000 HU and cortical bone up to about 3000; metal goes higher, rarely far.
HU_LOW, HU_HIGH = -1100.0, 3000.0
# "Far outside": a margin past which a CT scanner's output does not go (padding aside).
MARGIN_HU = 2000.0
# A label map holds few distinct integers (TotalSegmentator's 118 classes included).
MAX_LABEL_VALUES = 256
# Every 4th voxel along each axis: enough to judge a range, 64 times less to sort.
STRIDE = 4


def hounsfield_warning(image: np.ndarray) -> str | None:
    """Why `image` does not look like CT in HU (a label map, a range far off), or None."""
    sample = np.asarray(image[::STRIDE, ::STRIDE, ::STRIDE] if image.ndim == 3 else image)
    sample = sample.ravel()
    if sample.size == 0:
        return None
    values = np.unique(sample)
    if values.size <= MAX_LABEL_VALUES and np.all(values == np.rint(values)) and values[0] >= 0:
        return (
            f"holds only {values.size} distinct non-negative integers "
            f"({int(values[0])}..{int(values[-1])}): a label map rather than CT in HU?"
        )
    low, high = np.percentile(sample, [0.5, 99.5])
    if low < HU_LOW - MARGIN_HU or high > HU_HIGH + MARGIN_HU:
        return (
            f"intensities {low:.0f}..{high:.0f} lie far outside CT's {HU_LOW:.0f}..{HU_HIGH:.0f} "
            f"HU: not CT in Hounsfield units?"
        )
    if high - low < 100.0:
        return f"intensities span only {low:.3g}..{high:.3g}: not CT in Hounsfield units?"
    return None
