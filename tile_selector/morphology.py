"""Exact, fast equivalents of the few scipy.ndimage filters the per-read quality measures use.

Each full-resolution read of the selector goes through a 16-px maximum and minimum filter and
several binary openings and closings; scipy's versions are generic over every structuring element and
border mode and took a third of a read's measures (3-5 ms each on a 512x384 image). These handle
only what :mod:`tile_selector.quality` asks for, with numpy slices, and give bit-for-bit what scipy
gives (``tests/tile_selector/test_morphology.py`` compares them on random inputs):

- :func:`extreme_filter`: ``ndimage.maximum_filter`` / ``minimum_filter`` with a square window,
  mode ``reflect``, by the doubling (sparse-table) trick: log2(w) elementwise maxima per axis;
- :func:`erode`, :func:`dilate`, :func:`opening`, :func:`closing`: ``ndimage.binary_*`` with the
  default cross (4-connected) structure, ``border_value=0`` and ``iterations``.
"""

from __future__ import annotations

import numpy as np


def _extreme_1d(a: np.ndarray, w: int, axis: int, fn) -> np.ndarray:
    a = np.moveaxis(a, axis, 0)
    n = a.shape[0]
    lo = w // 2  # scipy's window for origin 0: [i - w // 2, i + (w - 1) // 2]
    p = np.pad(a, [(lo, w - 1 - lo)] + [(0, 0)] * (a.ndim - 1), mode="symmetric")  # scipy's 'reflect'
    m, k = p, 1
    while 2 * k <= w:  # m[i] = extreme of p[i:i + 2k]
        m = fn(m[:-k], m[k:])
        k *= 2
    return np.moveaxis(fn(m[:n], m[w - k:w - k + n]), 0, axis)


def extreme_filter(a: np.ndarray, w: int, fn=np.maximum) -> np.ndarray:
    """``ndimage.maximum_filter(a, w)`` (``fn=np.maximum``) or ``minimum_filter`` (``np.minimum``), 2-D."""
    return _extreme_1d(_extreme_1d(a, w, 1, fn), w, 0, fn)


def erode(x: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``ndimage.binary_erosion(x, iterations=iterations)`` of a 2-D bool array."""
    for _ in range(iterations):
        y = x.copy()
        y[1:] &= x[:-1]
        y[:-1] &= x[1:]
        y[:, 1:] &= x[:, :-1]
        y[:, :-1] &= x[:, 1:]
        y[0] = y[-1] = False  # outside the image counts as background
        y[:, 0] = y[:, -1] = False
        x = y
    return x


def dilate(x: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``ndimage.binary_dilation(x, iterations=iterations)`` of a 2-D bool array."""
    for _ in range(iterations):
        y = x.copy()
        y[1:] |= x[:-1]
        y[:-1] |= x[1:]
        y[:, 1:] |= x[:, :-1]
        y[:, :-1] |= x[:, 1:]
        x = y
    return x


def opening(x: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``ndimage.binary_opening(x, iterations=iterations)``."""
    return dilate(erode(x, iterations), iterations)


def closing(x: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``ndimage.binary_closing(x, iterations=iterations)`` (scipy's, which erodes from the border too)."""
    return erode(dilate(x, iterations), iterations)
