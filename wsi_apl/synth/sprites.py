"""Red cells and platelets as banks of small optical-density sprites, pasted many times per slide."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .raster import ellipse_dist, soft
from .stains import Stain


@dataclass
class Sprite:
    od: np.ndarray  # (h, w, 3)
    half: int       # offset from the centre to the top-left corner, px


def red_cell_sprites(mpp: float, stain: Stain, rng: np.random.Generator, n: int = 24) -> list[Sprite]:
    """A bank of red-cell OD sprites: 6.6-8.4 µm discs with central pallor, slightly irregular."""
    sprites = []
    for _ in range(n):
        d = float(rng.uniform(6.6, 8.4))
        a = d / 2
        b = a * float(rng.uniform(0.9, 1.0))
        half = int(math.ceil(a * 1.06 / mpp)) + 1
        xs = (np.arange(-half, half + 1, dtype=np.float32) + 0.0) * mpp
        X, Y = np.meshgrid(xs, xs)
        ang = float(rng.uniform(0, math.pi))
        harm = [(k, float(rng.uniform(0, 0.025)), float(rng.uniform(0, 6.3))) for k in (2, 3)]
        body = soft(ellipse_dist(X, Y, 0.0, 0.0, a, b, ang, harm), mpp)
        r = np.sqrt(X * X + Y * Y) / a
        pallor_r = float(rng.uniform(0.3, 0.48))
        depth = float(rng.uniform(0.35, 0.65))
        profile = 1.0 - depth * np.exp(-((r / pallor_r) ** 4)) + 0.12 * np.exp(-(((r - 0.85) / 0.12) ** 2))
        od = (body * profile * float(rng.uniform(0.85, 1.15)))[..., None] * stain.od["rbc"]
        sprites.append(Sprite(od.astype(np.float32), half))
    return sprites


def platelet_sprites(mpp: float, stain: Stain, rng: np.random.Generator, n: int = 12) -> list[Sprite]:
    """Small (1.5-3 µm) granular purple platelets."""
    sprites = []
    for _ in range(n):
        d = float(rng.uniform(1.5, 3.0))
        a = d / 2
        half = int(math.ceil(a * 1.3 / mpp)) + 1
        xs = np.arange(-half, half + 1, dtype=np.float32) * mpp
        X, Y = np.meshgrid(xs, xs)
        harm = [(k, float(rng.uniform(0, 0.12)), float(rng.uniform(0, 6.3))) for k in (2, 3, 5)]
        body = soft(ellipse_dist(X, Y, 0.0, 0.0, a, a * 0.85, float(rng.uniform(0, 3.1)), harm), mpp)
        grain = 1.0 + 0.5 * rng.standard_normal(body.shape).astype(np.float32)
        od = (body * np.clip(grain, 0.3, 2.0) * 0.8)[..., None] * stain.od["platelet"]
        sprites.append(Sprite(od.astype(np.float32), half))
    return sprites
