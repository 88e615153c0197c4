"""Slices shown as radiologists view them, with labels in their class colours."""

import numpy as np
import pytest

from autocontext_jax.evaluation import visualize


def test_axial_slices_put_anterior_up_and_the_patients_right_on_the_left():
    volume = np.zeros((6, 5, 4))
    volume[5, 4, 2] = 1.0  # the most right (+x), most anterior (+y) voxel of slice z=2
    volume[0, 0, 2] = 2.0  # the most left, most posterior one
    image = visualize.display_slice(volume, "axial", 2)
    assert image.shape == (5, 6)
    assert image[0, 0] == 1.0 and image[-1, -1] == 2.0


def test_coronal_slices_put_superior_up():
    volume = np.zeros((6, 5, 4))
    volume[5, 2, 3] = 1.0  # right, superior
    image = visualize.display_slice(volume, "coronal")  # middle: y = 2
    assert image.shape == (4, 6) and image[0, 0] == 1.0


def test_overlay_colours_only_the_labelled_pixels():
    hu = np.full((3, 3), 1000.0)  # white in the soft-tissue window
    labels = np.zeros((3, 3), np.uint8)
    labels[1, 1] = 1
    rgb = visualize.overlay(hu, labels, 8, alpha=1.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 3, 3)
    assert tuple(rgb[1, 1]) == tuple(visualize.CLASS_COLOURS[1])
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    with pytest.raises(ValueError, match="differ"):
        visualize.overlay(hu, labels[:2], 8)


def test_more_classes_than_the_paper_get_distinct_colours():
    colours = visualize.class_colours(12)
    assert colours.shape == (12, 3)
    assert len({tuple(c) for c in colours}) == 12


def test_panel_puts_ct_reference_and_levels_side_by_side():
    hu = np.zeros((10, 8, 6))
    labels = np.zeros((10, 8, 6), np.uint8)
    row = visualize.panel(hu, labels, [labels, labels, labels], 8, "axial")
    assert row.shape == (8, 5 * 10 + 4 * 2, 3)
