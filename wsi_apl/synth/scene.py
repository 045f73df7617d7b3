"""A whole bone-marrow smear as a scene: geometry, zones, focus, and every cell in it.

The smear is a tongue of blood spread from where the drop was placed: a *thick* zone near the
start (cells pile up, red cells clump), marrow *particles* with cellular trails behind them, the
*monolayer* zone where cells lie apart (where a cytologist counts), and the *thin* feathered edge
(sparse, broken cells), on glass. Orientation, shape and proportions vary per slide; out-of-focus
patches of several strengths are laid over it. Positions are µm from the slide's top-left corner.

The smear's geometry and zones live in :mod:`.smear`, focus in :mod:`.focus`, and the steps that
populate the smear in :mod:`.layout`; :func:`build_scene` runs them in order.

The scene renders itself band by band (:meth:`Scene.render_region`) so that slides far larger than
memory can be written tile by tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .cells import Cell, NoiseBank, Shape, cell_box_px, render_cell, shape_of
from .focus import BlurPatch, apply_blur, blur_sigma, draw_blur
from .layout import (
    SceneParams,
    block_coverage,
    draw_candidates,
    draw_nucleated,
    make_cells,
    place_red_cells_and_platelets,
    settle,
)
from .smear import (
    NOISE_STEP,
    THICK_COVERAGE,
    THIN_COVERAGE,
    ZONE_CODE,
    ZONES,
    SmearGeometry,
    choose_geometry,
    narrow_monolayer,
    zone_codes,
)
from .sprites import Sprite, platelet_sprites, red_cell_sprites
from .stains import Stain

__all__ = ["NOISE_STEP", "THICK_COVERAGE", "THIN_COVERAGE", "ZONES", "ZONE_CODE", "BlurPatch", "Scene",
           "SceneParams", "SmearGeometry", "build_scene"]


@dataclass
class Scene:
    """Every object of one synthetic slide, and how to render it."""

    width: int             # level-0 px
    height: int
    mpp: float
    stain: Stain
    seed: int
    geometry: SmearGeometry | None
    cells: list[Cell]
    rbc_xy: np.ndarray      # (n, 2) µm
    rbc_sprite: np.ndarray  # (n,) sprite index
    plt_xy: np.ndarray
    plt_sprite: np.ndarray
    blur: list[BlurPatch]
    base_blur: float        # µm, whole slide
    background: str = "glass"
    _cache: dict = field(default_factory=dict, repr=False)

    # -- maps ---------------------------------------------------------------------------------
    def zone_at(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Zone code (see :data:`ZONES`) at µm positions, from the local cell coverage."""
        g = self.geometry
        if g is None:
            return np.full(np.shape(X), ZONE_CODE["monolayer"], np.uint8)
        return zone_codes(g, X, Y)

    def blur_at(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Blur sigma (µm) at µm positions."""
        return blur_sigma(self.blur, self.base_blur, X, Y)

    def maps(self, map_mpp: float) -> tuple[np.ndarray, np.ndarray]:
        """Zone codes (uint8) and blur sigma in µm (float32) on a grid of ``map_mpp`` µm/px."""
        w = max(1, int(round(self.width * self.mpp / map_mpp)))
        h = max(1, int(round(self.height * self.mpp / map_mpp)))
        X, Y = np.meshgrid((np.arange(w) + 0.5) * map_mpp, (np.arange(h) + 0.5) * map_mpp)
        return self.zone_at(X, Y), self.blur_at(X, Y)

    # -- rendering ---------------------------------------------------------------------------
    def _assets(self):
        if not self._cache:
            rng = np.random.default_rng([self.seed, 7])
            self._cache["bank"] = NoiseBank(self.mpp, self.seed)
            self._cache["rbc"] = red_cell_sprites(self.mpp, self.stain, rng)
            self._cache["plt"] = platelet_sprites(self.mpp, self.stain, rng)
            order = np.argsort([c.y for c in self.cells]) if self.cells else np.zeros(0, int)
            self._cache["cell_order"] = order
            self._cache["cell_y"] = np.array([self.cells[i].y for i in order]) if len(order) else np.zeros(0)
            ro = np.argsort(self.rbc_xy[:, 1]) if len(self.rbc_xy) else np.zeros(0, int)
            self._cache["rbc_order"] = ro
            self._cache["rbc_y"] = self.rbc_xy[ro, 1] if len(ro) else np.zeros(0)
            po = np.argsort(self.plt_xy[:, 1]) if len(self.plt_xy) else np.zeros(0, int)
            self._cache["plt_order"] = po
            self._cache["plt_y"] = self.plt_xy[po, 1] if len(po) else np.zeros(0)
            noise_rng = np.random.default_rng([self.seed, 11])
            self._cache["noise"] = noise_rng.normal(0, 1, (512, 512, 3)).astype(np.float32)
        return self._cache

    def shape(self, cell: Cell) -> Shape:
        """The cell's geometry (derived from its seed each time: cheap next to rendering, no memory)."""
        return shape_of(cell)

    def max_blur_px(self) -> int:
        sig = max([self.base_blur] + [p.sigma for p in self.blur])
        return int(math.ceil(3.0 * sig / self.mpp)) + 2

    def _plasma_haze(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Share (h, w) of each pixel of the region lying on the smear, bilinear from a coarse zone map."""
        mpp = self.mpp
        # on a grid aligned to absolute multiples of ``step`` so that neighbouring regions meet seamlessly
        step = max(1, int(round(8.0 / mpp)))
        gx0, gy0 = (x0 // step) * step, (y0 // step) * step
        gx = np.arange(gx0, x1 + 2 * step, step)
        gy = np.arange(gy0, y1 + 2 * step, step)
        GX, GY = np.meshgrid(gx * mpp, gy * mpp)
        inside = (self.zone_at(GX, GY) != ZONE_CODE["glass"]).astype(np.float32)
        # bilinear between grid nodes, evaluated at this region's pixels
        fy = (np.arange(y0, y1) - gy0) / step
        fx = (np.arange(x0, x1) - gx0) / step
        iy, ix = np.floor(fy).astype(int), np.floor(fx).astype(int)
        ty, tx = (fy - iy)[:, None], (fx - ix)[None, :]
        return (inside[np.ix_(iy, ix)] * (1 - ty) * (1 - tx) + inside[np.ix_(iy + 1, ix)] * ty * (1 - tx)
                + inside[np.ix_(iy, ix + 1)] * (1 - ty) * tx + inside[np.ix_(iy + 1, ix + 1)] * ty * tx)

    def _sprites_in(self, key: str, x0: int, y0: int, x1: int, y1: int) -> list[tuple[Sprite, float, float]]:
        """``(sprite, x, y)`` (µm centres) of the red cells (``key="rbc"``) or platelets (``"plt"``)
        whose sprites may reach the region."""
        assets = self._assets()
        sprites = assets[key]
        if not sprites:
            return []
        mpp = self.mpp
        max_half = max(s.half for s in sprites)
        order, ys = assets[f"{key}_order"], assets[f"{key}_y"]
        lo = np.searchsorted(ys, (y0 - max_half) * mpp)
        hi = np.searchsorted(ys, (y1 + max_half) * mpp)
        idx = order[lo:hi]
        xy = getattr(self, f"{key}_xy")[idx]
        spr = getattr(self, f"{key}_sprite")[idx]
        sel = (xy[:, 0] >= (x0 - max_half) * mpp) & (xy[:, 0] <= (x1 + max_half) * mpp)
        return [(sprites[int(si)], cx, cy) for (cx, cy), si in zip(xy[sel], spr[sel])]

    def _cells_in(self, x0: int, y0: int, x1: int, y1: int) -> list[tuple[Cell, Shape]]:
        """``(cell, shape)`` of the nucleated cells whose box meets the region, in order of ``y``."""
        assets = self._assets()
        mpp = self.mpp
        order, ys = assets["cell_order"], assets["cell_y"]
        reach = 30.0  # µm, larger than any cell radius
        lo = np.searchsorted(ys, y0 * mpp - reach)
        hi = np.searchsorted(ys, y1 * mpp + reach)
        found = []
        for i in order[lo:hi]:
            cell = self.cells[int(i)]
            if not (x0 * mpp - reach <= cell.x <= x1 * mpp + reach):
                continue
            shape = self.shape(cell)
            bx0, by0, bx1, by1 = cell_box_px(cell, shape, mpp)
            if bx1 < x0 or bx0 > x1 or by1 < y0 or by0 > y1:
                continue
            found.append((cell, shape))
        return found

    def _od_region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Optical density (h, w, 3) of the level-0 pixel region [x0, x1) x [y0, y1)."""
        assets = self._assets()
        h, w = y1 - y0, x1 - x0
        od = np.zeros((h, w, 3), np.float32)
        mpp = self.mpp
        # plasma haze over the smear, from a coarse zone map
        if self.geometry is not None:
            od += self._plasma_haze(x0, y0, x1, y1).astype(np.float32)[..., None] * self.stain.od["plasma_bg"]

        def paste(patch: np.ndarray, px: int, py: int):
            ph, pw = patch.shape[:2]
            ax0, ay0 = max(px, x0), max(py, y0)
            ax1, ay1 = min(px + pw, x1), min(py + ph, y1)
            if ax1 <= ax0 or ay1 <= ay0:
                return
            od[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] += patch[ay0 - py:ay1 - py, ax0 - px:ax1 - px]

        for key in ("rbc", "plt"):
            for s, cx, cy in self._sprites_in(key, x0, y0, x1, y1):
                paste(s.od, int(cx / mpp) - s.half, int(cy / mpp) - s.half)
        for cell, shape in self._cells_in(x0, y0, x1, y1):
            px, py, patch, _ = render_cell(cell, shape, mpp, self.stain, assets["bank"])
            paste(patch, px, py)
        return od

    def render_region(self, x0: int, y0: int, x1: int, y1: int, band_index: int = 0) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a level-0 region, with focus, illumination and sensor noise."""
        m = self.max_blur_px()
        ex0, ey0, ex1, ey1 = x0 - m, y0 - m, x1 + m, y1 + m
        od = self._od_region(ex0, ey0, ex1, ey1)
        trans = np.exp(-math.log(10.0) * od)
        self._apply_blur(trans, ex0, ey0)
        trans = trans[m:m + (y1 - y0), m:m + (x1 - x0)]
        st = self.stain
        img = np.power(np.clip(trans * st.illumination, 0.0, 1.0), st.gamma) * 255.0
        noise = self._assets()["noise"]
        ny = (np.arange(y0, y1) * 7 + band_index * 131) % noise.shape[0]
        nx = (np.arange(x0, x1) * 3) % noise.shape[1]
        img += noise[np.ix_(ny, nx)] * st.noise_sigma
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    def _apply_blur(self, trans: np.ndarray, ex0: int, ey0: int) -> None:
        """Blur ``trans`` in place where the scene is out of focus (box-filter Gaussians)."""
        apply_blur(trans, self.blur, self.base_blur, self.mpp, ex0, ey0)


def _empty_scene(width: int, height: int, mpp: float, stain: Stain, seed: int) -> Scene:
    """A slide with nothing on it (the ``empty`` defect)."""
    return Scene(width, height, mpp, stain, seed, None, [], np.zeros((0, 2)), np.zeros(0, int),
                 np.zeros((0, 2)), np.zeros(0, int), [], 0.0)


def build_scene(width: int, height: int, mpp: float, stain: Stain, params: SceneParams, seed: int,
                plain: bool = False) -> Scene:
    """Lay out a whole smear: geometry, blur patches, red cells, platelets and nucleated cells.

    Every step draws from the one generator ``rng`` in turn (see :mod:`.layout`), so the order of
    the steps is part of the slide's identity for a seed.
    """
    rng = np.random.default_rng([seed, 1])
    wum, hum = width * mpp, height * mpp
    if params.defect == "empty":
        return _empty_scene(width, height, mpp, stain, seed)
    g = choose_geometry(rng, wum, hum, params.defect == "no_monolayer", plain)
    if params.smear == "narrow" and not plain:
        narrow_monolayer(g, np.random.default_rng([seed, 7]))
    # focus: a slight whole-slide softness and a few out-of-focus patches
    blur, base_blur = draw_blur(rng, g, params.blur_patches, params.defect == "blurred")
    # candidate positions: Poisson per 40-µm block with intensity from the coverage
    BX, BY, cov = block_coverage(g, wum, hum)
    cand = draw_candidates(rng, g, BX, BY, cov, params.cellularity)
    nuc = draw_nucleated(rng, params, cand.zone[cand.is_nuc])
    keep = settle(rng, cand, nuc.diameter, cov)
    cells = make_cells(rng, seed, params, cand, nuc, keep)
    rbc_xy, rbc_sprite, plt_xy, plt_sprite = place_red_cells_and_platelets(rng, cand, keep)
    return Scene(width, height, mpp, stain, seed, g, cells, rbc_xy, rbc_sprite, plt_xy, plt_sprite, blur, base_blur)
