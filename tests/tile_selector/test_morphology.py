"""The hand-written filters give bit for bit what scipy.ndimage gives."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tile_selector.morphology import closing, dilate, erode, extreme_filter, opening


@pytest.mark.parametrize("shape", [(384, 512), (100, 37), (5, 3), (17, 16), (1, 40), (3, 1)])
def test_extreme_filters_equal_scipy(shape):
    rng = np.random.default_rng(sum(shape))
    g = rng.random(shape).astype(np.float32)
    for w in (1, 2, 3, 15, 16, 17, 33):
        assert np.array_equal(extreme_filter(g, w, np.maximum), ndimage.maximum_filter(g, w)), w
        assert np.array_equal(extreme_filter(g, w, np.minimum), ndimage.minimum_filter(g, w)), w


@pytest.mark.parametrize("shape", [(384, 512), (100, 37), (5, 3), (1, 40), (3, 1)])
def test_binary_morphology_equals_scipy(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.3, 0.6, 0.9):
        b = rng.random(shape) < density
        for it in (1, 2, 3):
            assert np.array_equal(erode(b, it), ndimage.binary_erosion(b, iterations=it))
            assert np.array_equal(dilate(b, it), ndimage.binary_dilation(b, iterations=it))
            assert np.array_equal(opening(b, it), ndimage.binary_opening(b, iterations=it))
            assert np.array_equal(closing(b, it), ndimage.binary_closing(b, iterations=it))


def test_a_wrong_filter_would_be_caught():
    """The comparison can fail: an 8-connected erosion is not scipy's default."""
    b = np.zeros((9, 9), bool)
    b[2:7, 2:7] = True
    b[2, 2] = False
    eight = ndimage.binary_erosion(b, structure=np.ones((3, 3), bool))
    assert not np.array_equal(erode(b), eight)
