"""Label overlays on CT slices, as RGB arrays: for TensorBoard and the plot command."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# RGB of the paper's classes 0..7. Its figures' legend is not in the text we have, so these
# are ours: artery red and portal vein blue (the usual vessel colours), organs distinct hues.
CLASS_COLOURS = np.array(
    [
        (0, 0, 0),
        (230, 25, 25),  # artery
        (40, 90, 230),  # portal vein
        (160, 80, 40),  # liver
        (150, 40, 200),  # spleen
        (240, 200, 30),  # stomach
        (30, 190, 60),  # gallbladder
        (250, 130, 180),  # pancreas
    ],
    dtype=np.uint8,
)
# Soft-tissue window for display, in Hounsfield units.
DISPLAY_WINDOW_HU = (-160.0, 240.0)
PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}


def class_colours(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: the paper's eight, then evenly spaced hues for more classes."""
    if num_classes <= len(CLASS_COLOURS):
        return CLASS_COLOURS[:num_classes]
    hues = np.linspace(0, 1, num_classes - len(CLASS_COLOURS), endpoint=False)
    extra = np.stack([np.abs(np.sin(np.pi * (hues + shift))) for shift in (0, 1 / 3, 2 / 3)], 1)
    return np.concatenate([CLASS_COLOURS, (255 * extra).astype(np.uint8)])


def display_slice(volume: np.ndarray, plane: str, index: int | None = None) -> np.ndarray:
    """A 2D slice of an (X, Y, Z) RAS volume, oriented as radiologists view it.

    Axial: anterior up, the patient's right on the left of the image; coronal: superior
    up, right on the left. `index` defaults to the middle of the volume.
    """
    axis = PLANES[plane]
    index = volume.shape[axis] // 2 if index is None else index
    section = np.take(volume, index, axis=axis)
    # Rows become the second remaining axis (Y or Z) running downwards, columns X running
    # right to left.
    return section.T[::-1, ::-1]


def ct_to_grey(hu: np.ndarray, window: tuple[float, float] = DISPLAY_WINDOW_HU) -> np.ndarray:
    """Hounsfield units to grey levels 0..255 in a display window, as (H, W, 3) uint8."""
    low, high = window
    grey = np.clip((hu - low) / (high - low), 0.0, 1.0) * 255.0
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)


def overlay(hu: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """A CT slice in grey with every foreground label blended in its class colour."""
    if hu.shape != labels.shape:
        raise ValueError(f"image slice {hu.shape} and label slice {labels.shape} differ")
    grey = ct_to_grey(hu).astype(np.float32)
    colours = class_colours(num_classes).astype(np.float32)[labels]
    foreground = (labels > 0)[..., None]
    blended = np.where(foreground, (1 - alpha) * grey + alpha * colours, grey)
    return np.round(blended).astype(np.uint8)


def panel(
    hu: np.ndarray,
    reference: np.ndarray,
    predictions: Sequence[np.ndarray],
    num_classes: int,
    plane: str,
    index: int | None = None,
) -> np.ndarray:
    """One row of images: CT, reference overlaid, then each level's prediction overlaid."""
    image = display_slice(hu, plane, index)
    tiles = [ct_to_grey(image), overlay(image, display_slice(reference, plane, index), num_classes)]
    tiles += [overlay(image, display_slice(p, plane, index), num_classes) for p in predictions]
    gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
    row = [tiles[0]]
    for tile in tiles[1:]:
        row += [gap, tile]
    return np.concatenate(row, axis=1)
