"""Soft-edged rasterisation of the shapes cells are made of, in µm on a pixel grid.

Each ``*_dist`` gives the signed distance (µm, positive inside) from pixel centres ``(U, V)`` to a
primitive's edge; :func:`soft` turns it into a pixel coverage with a one-pixel ramp.
"""

from __future__ import annotations

import math

import numpy as np


def soft(dist_um: np.ndarray, mpp: float) -> np.ndarray:
    """Coverage of a pixel from the signed distance (µm, positive inside) to an edge: 1-px ramp."""
    return np.clip(dist_um / mpp + 0.5, 0.0, 1.0)


def ellipse_dist(U, V, cx, cy, a, b, ang, harmonics=None):
    """To the edge of an ellipse centred at ``(cx, cy)``, radii ``a``, ``b``, turned by ``ang``, its
    radius modulated by ``harmonics`` ``[(k, amplitude, phase)]``."""
    c, s = math.cos(ang), math.sin(ang)
    x = (U - cx) * c + (V - cy) * s
    y = -(U - cx) * s + (V - cy) * c
    xn, yn = x / a, y / b
    rn = np.sqrt(xn * xn + yn * yn)
    rho = np.sqrt(x * x + y * y)
    edge = 1.0
    if harmonics:
        phi = np.arctan2(yn, xn)
        edge = 1.0 + sum(A * np.cos(k * phi + p) for k, A, p in harmonics)
    rb = np.where(rn > 1e-3, rho / np.maximum(rn, 1e-3), min(a, b))
    return rb * (edge - rn)


def capsule_dist(U, V, x0, y0, x1, y1, w):
    """To the edge of a capsule of width ``w`` around the segment ``(x0, y0)``-``(x1, y1)``."""
    dx, dy = x1 - x0, y1 - y0
    ll = dx * dx + dy * dy
    t = np.clip(((U - x0) * dx + (V - y0) * dy) / max(ll, 1e-9), 0.0, 1.0)
    d = np.sqrt((U - x0 - t * dx) ** 2 + (V - y0 - t * dy) ** 2)
    return w / 2.0 - d


def arc_dist(U, V, cx, cy, radius, t, start, span):
    """To the edge of a band of thickness ``t`` along a circular arc (``start``, ``span`` in radians)."""
    x, y = U - cx, V - cy
    rho = np.sqrt(x * x + y * y)
    phi = np.mod(np.arctan2(y, x) - start, 2 * math.pi)
    on = phi <= span
    d_on = np.abs(rho - radius)
    e0 = np.hypot(x - radius * math.cos(start), y - radius * math.sin(start))
    e1 = np.hypot(x - radius * math.cos(start + span), y - radius * math.sin(start + span))
    d = np.where(on, d_on, np.minimum(e0, e1))
    return t / 2.0 - d


def primitive_mask(U, V, prim, mpp):
    """Pixel coverage of a nucleus primitive ``("ellipse" | "capsule" | "arc", *parameters)``."""
    kind = prim[0]
    if kind == "ellipse":
        return soft(ellipse_dist(U, V, *prim[1:6], prim[6] if len(prim) > 6 else None), mpp)
    if kind == "capsule":
        return soft(capsule_dist(U, V, *prim[1:6]), mpp)
    if kind == "arc":
        return soft(arc_dist(U, V, *prim[1:7]), mpp)
    raise ValueError(kind)
