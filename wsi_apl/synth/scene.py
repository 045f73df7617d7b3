"""A whole bone-marrow smear as a scene: geometry, zones, focus, and every cell in it.

The smear is a tongue of blood spread from where the drop was placed: a *thick* zone near the
start (cells pile up, red cells clump), marrow *particles* with cellular trails behind them, the
*monolayer* zone where cells lie apart (where a cytologist counts), and the *thin* feathered edge
(sparse, broken cells), on glass. Orientation, shape and proportions vary per slide; out-of-focus
patches of several strengths are laid over it. Positions are µm from the slide's top-left corner.

The scene renders itself band by band (:meth:`Scene.render_band`) so that slides far larger than
memory can be written tile by tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .cells import Cell, NoiseBank, cell_box_px, platelet_sprites, red_cell_sprites, render_cell, shape_of
from .morphology import spec_for
from .stains import Stain

ZONES = ("glass", "thick", "monolayer", "thin", "particle")
ZONE_CODE = {z: i for i, z in enumerate(ZONES)}
#: Ground-truth zones follow the local cell coverage (share of glass covered by cells, >1 where they
#: pile up): thick where cells pile up, thin where they are sparse, monolayer in between.
THICK_COVERAGE = 0.9
THIN_COVERAGE = 0.25
NOISE_STEP = 40.0


@dataclass
class BlurPatch:
    x: float       # µm, centre
    y: float
    rx: float      # µm, radii
    ry: float
    angle: float
    sigma: float   # µm, Gaussian blur at the centre

    def weight(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Blur weight in [0, 1] (1 inside, smooth fall-off over the outer 30 %)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = ((X - self.x) * c + (Y - self.y) * s) / self.rx
        v = (-(X - self.x) * s + (Y - self.y) * c) / self.ry
        r = np.sqrt(u * u + v * v)
        return np.clip((1.15 - r) / 0.3, 0.0, 1.0)


@dataclass
class SmearGeometry:
    """Where the smear lies: its axis, length, half-width and zone boundaries (all µm)."""

    ox: float
    oy: float
    theta: float
    length: float
    half_width: float
    thick_end: float  # fraction of length
    mono_end: float
    coverage_thick: float
    coverage_mono: float
    coverage_thin: float
    edge_harmonics: list[tuple[int, float, float]]
    particles: list[tuple[float, float, float, float]]  # (u, v, radius, trail length) in µm
    noise_seed: int
    lateral_thinning: float = 0.65  # coverage factor along the smear's long edges
    ramp: float = 0.03  # width of the zone transitions, as a fraction of the length
    noise: np.ndarray | None = None  # low-frequency density variation on a NOISE_STEP-µm grid

    def uv(self, X, Y):
        c, s = math.cos(self.theta), math.sin(self.theta)
        return (X - self.ox) * c + (Y - self.oy) * s, -(X - self.ox) * s + (Y - self.oy) * c

    def half_width_at(self, u):
        t = np.clip(u / self.length, 0.0, 1.0)
        tongue = np.where(t > 0.62, np.sqrt(np.clip(1.0 - ((t - 0.62) / 0.38) ** 2, 0.0, 1.0)), 1.0)
        start = np.clip(u / (0.04 * self.length), 0.0, 1.0) ** 0.5
        wobble = 1.0 + sum(A * np.cos(k * t * math.pi + p) for k, A, p in self.edge_harmonics)
        return self.half_width * tongue * start * wobble


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
        u, v = g.uv(X, Y)
        inside = (u >= 0) & (u <= g.length) & (np.abs(v) <= g.half_width_at(u))
        cov = _coverage(g, u, v, _noise_at(g, np.asarray(X, np.float64), np.asarray(Y, np.float64)))
        z = np.where(cov >= THICK_COVERAGE, ZONE_CODE["thick"],
                     np.where(cov < THIN_COVERAGE, ZONE_CODE["thin"], ZONE_CODE["monolayer"]))
        for pu, pv, pr, _trail in g.particles:
            z = np.where((u - pu) ** 2 + (v - pv) ** 2 <= pr * pr, ZONE_CODE["particle"], z)
        return np.where(inside, z, ZONE_CODE["glass"]).astype(np.uint8)

    def blur_at(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Blur sigma (µm) at µm positions."""
        out = np.full(np.shape(X), self.base_blur, np.float32)
        for p in self.blur:
            out = np.maximum(out, p.sigma * p.weight(X, Y))
        return out

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

    def shape(self, cell: Cell):
        """The cell's geometry (derived from its seed each time: cheap next to rendering, no memory)."""
        return shape_of(cell)

    def max_blur_px(self) -> int:
        sig = max([self.base_blur] + [p.sigma for p in self.blur])
        return int(math.ceil(3.0 * sig / self.mpp)) + 2

    def _od_region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Optical density (h, w, 3) of the level-0 pixel region [x0, x1) x [y0, y1)."""
        assets = self._assets()
        h, w = y1 - y0, x1 - x0
        od = np.zeros((h, w, 3), np.float32)
        mpp = self.mpp
        # plasma haze over the smear, from a coarse zone map
        if self.geometry is not None:
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
            haze = (inside[np.ix_(iy, ix)] * (1 - ty) * (1 - tx) + inside[np.ix_(iy + 1, ix)] * ty * (1 - tx)
                    + inside[np.ix_(iy, ix + 1)] * (1 - ty) * tx + inside[np.ix_(iy + 1, ix + 1)] * ty * tx)
            od += haze.astype(np.float32)[..., None] * self.stain.od["plasma_bg"]

        def paste(patch: np.ndarray, px: int, py: int):
            ph, pw = patch.shape[:2]
            ax0, ay0 = max(px, x0), max(py, y0)
            ax1, ay1 = min(px + pw, x1), min(py + ph, y1)
            if ax1 <= ax0 or ay1 <= ay0:
                return
            od[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] += patch[ay0 - py:ay1 - py, ax0 - px:ax1 - px]

        for key, xy_name, spr_name in (("rbc", "rbc_xy", "rbc_sprite"), ("plt", "plt_xy", "plt_sprite")):
            sprites = assets[key]
            if not sprites:
                continue
            max_half = max(s.half for s in sprites)
            order, ys = assets[f"{key}_order"], assets[f"{key}_y"]
            lo = np.searchsorted(ys, (y0 - max_half) * mpp)
            hi = np.searchsorted(ys, (y1 + max_half) * mpp)
            idx = order[lo:hi]
            xy = getattr(self, xy_name)[idx]
            spr = getattr(self, spr_name)[idx]
            sel = (xy[:, 0] >= (x0 - max_half) * mpp) & (xy[:, 0] <= (x1 + max_half) * mpp)
            for (cx, cy), si in zip(xy[sel], spr[sel]):
                s = sprites[int(si)]
                paste(s.od, int(cx / mpp) - s.half, int(cy / mpp) - s.half)

        order, ys = assets["cell_order"], assets["cell_y"]
        reach = 30.0  # µm, larger than any cell radius
        lo = np.searchsorted(ys, y0 * mpp - reach)
        hi = np.searchsorted(ys, y1 * mpp + reach)
        for i in order[lo:hi]:
            cell = self.cells[int(i)]
            if not (x0 * mpp - reach <= cell.x <= x1 * mpp + reach):
                continue
            shape = self.shape(cell)
            bx0, by0, bx1, by1 = cell_box_px(cell, shape, mpp)
            if bx1 < x0 or bx0 > x1 or by1 < y0 or by0 > y1:
                continue
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
        h, w = trans.shape[:2]
        mpp = self.mpp
        if self.base_blur / mpp >= 0.6:
            _gauss_box(trans, self.base_blur / mpp)
        for p in self.blur:
            sig_px = p.sigma / mpp
            if sig_px < 0.6:
                continue
            ext = max(p.rx, p.ry) * 1.2
            bx0 = int((p.x - ext) / mpp) - ex0
            by0 = int((p.y - ext) / mpp) - ey0
            bx1 = int((p.x + ext) / mpp) - ex0 + 1
            by1 = int((p.y + ext) / mpp) - ey0 + 1
            cx0, cy0, cx1, cy1 = max(0, bx0), max(0, by0), min(w, bx1), min(h, by1)
            if cx1 <= cx0 or cy1 <= cy0:
                continue
            pad = int(3 * sig_px) + 1
            rx0, ry0, rx1, ry1 = max(0, cx0 - pad), max(0, cy0 - pad), min(w, cx1 + pad), min(h, cy1 + pad)
            region = trans[ry0:ry1, rx0:rx1].copy()
            _gauss_box(region, sig_px)
            sub = region[cy0 - ry0:cy1 - ry0, cx0 - rx0:cx1 - rx0]
            X, Y = np.meshgrid((np.arange(cx0, cx1) + ex0 + 0.5) * mpp, (np.arange(cy0, cy1) + ey0 + 0.5) * mpp)
            wgt = p.weight(X, Y)[..., None]
            # a weaker blur towards the patch edge: blend the blurred image by the weight
            trans[cy0:cy1, cx0:cx1] = trans[cy0:cy1, cx0:cx1] * (1.0 - wgt) + sub * wgt


def _gauss_box(img: np.ndarray, sigma_px: float) -> None:
    """Approximate a Gaussian blur of ``sigma_px`` in place with three box filters per axis.

    Wide blurs are computed on a copy reduced by an integer factor and enlarged back (bilinear):
    the result is smooth at that scale anyway, and the cost no longer grows with the blur.
    """
    f = int(sigma_px // 3)
    if f >= 2:
        h, w = img.shape[:2]
        hh, ww = (h + f - 1) // f, (w + f - 1) // f
        padded = np.pad(img, ((0, hh * f - h), (0, ww * f - w), (0, 0)), mode="edge")
        small = padded.reshape(hh, f, ww, f, img.shape[2]).mean(axis=(1, 3))
        _gauss_box(small, math.sqrt(max(0.25, sigma_px * sigma_px - (f * f - 1) / 12.0)) / f)
        big = ndimage.zoom(small, (f, f, 1), order=1, grid_mode=True, mode="nearest")
        img[...] = big[:h, :w]
        return
    # three passes of an odd box width w give a variance of (w² - 1) / 4 (odd: no half-pixel shift)
    width = 2 * int(round((math.sqrt(4.0 * sigma_px * sigma_px + 1.0) - 1.0) / 2.0)) + 1
    if width <= 1:
        return
    for axis in (0, 1):
        for _ in range(3):
            ndimage.uniform_filter1d(img, width, axis=axis, output=img, mode="nearest")


# ---------------------------------------------------------------------------------------------
# scene construction


@dataclass
class SceneParams:
    """What a slide should look like (drawn per slide by the cohort)."""

    composition: dict[str, float]       # nucleated type -> share
    auer_share: dict[str, float]        # type -> share of those cells carrying Auer rods
    faggot_share: float = 0.0           # share of rod-bearing cells that are faggot cells
    apl_variant_share: float = 0.0      # share of promyelocytes that are microgranular (APL)
    abnormal_promyelocytes: bool = False
    cellularity: float = 1.0            # nucleated-cell richness (hemodilution < 0.3)
    defect: str = "none"                # none | blurred | no_monolayer | empty
    smear: str = "normal"               # normal | narrow (the monolayer is a band of 250-450 µm)
    blur_patches: tuple[int, int] = (1, 4)


_OVERSAMPLE = 3.0


def _choose_geometry(rng: np.random.Generator, wum: float, hum: float, no_monolayer: bool,
                     plain: bool = False) -> SmearGeometry:
    if plain:  # a camera frame taken inside the monolayer: the whole picture is monolayer
        return SmearGeometry(ox=-0.1 * wum, oy=hum / 2, theta=0.0, length=1.2 * wum, half_width=1.5 * hum,
                             thick_end=-1.0, mono_end=2.0, coverage_thick=0.0,
                             coverage_mono=float(rng.uniform(0.32, 0.48)), coverage_thin=0.0,
                             edge_harmonics=[], particles=[], noise_seed=int(rng.integers(1 << 30)))
    theta = float(rng.uniform(0, 2 * math.pi))
    aspect = float(rng.uniform(1.3, 2.2))  # length / width
    c, s = abs(math.cos(theta)), abs(math.sin(theta))
    # the largest smear of this aspect whose rotated box fits in 88 % of the slide
    fill = float(rng.uniform(0.8, 0.92))
    length = min(fill * wum / (c + s / aspect), fill * hum / (s + c / aspect))
    width = length / aspect
    cx = wum / 2 + float(rng.normal(0, 0.02)) * wum
    cy = hum / 2 + float(rng.normal(0, 0.02)) * hum
    ox = cx - math.cos(theta) * length / 2
    oy = cy - math.sin(theta) * length / 2
    thick_end = float(rng.uniform(0.18, 0.3))
    mono_end = float(rng.uniform(0.62, 0.76))
    lateral = 0.65
    coverage_thick = float(rng.uniform(1.4, 2.2))
    if no_monolayer:  # cells pile up over the whole smear, edges included
        thick_end, mono_end = 0.97, 0.98
        lateral, coverage_thick = 1.0, max(coverage_thick, 1.7)
    half = width / 2
    particles = []
    for _ in range(int(rng.integers(1, 5))):
        pu = float(rng.uniform(0.04, 0.5)) * length
        pv = float(rng.uniform(-0.55, 0.55)) * half
        pr = float(rng.uniform(0.025, 0.06)) * min(length, width * 2)
        particles.append((pu, pv, pr, pr * float(rng.uniform(3, 6))))
    return SmearGeometry(
        ox=ox, oy=oy, theta=theta, length=length, half_width=half, thick_end=thick_end, mono_end=mono_end,
        coverage_thick=coverage_thick, coverage_mono=float(rng.uniform(0.4, 0.55)),
        coverage_thin=float(rng.uniform(0.1, 0.2)),
        edge_harmonics=[(k, float(rng.uniform(0, 0.05)), float(rng.uniform(0, 6.3))) for k in (1, 2, 3, 5)],
        particles=particles, noise_seed=int(rng.integers(1 << 30)), lateral_thinning=lateral)


def _narrow_monolayer(g: SmearGeometry, rng: np.random.Generator) -> None:
    """Shrink the monolayer to a band of 250-450 µm across the smear, with sharper transitions.

    A real smear spread too fast or from too large a drop often has only such a band between its
    thick part and the feathered edge. Drawn from its own generator so that normal slides of the
    same seed stay as they were.
    """
    band = float(rng.uniform(250.0, 450.0))
    g.thick_end = float(rng.uniform(0.3, 0.5))
    g.mono_end = min(0.95, g.thick_end + band / g.length)
    g.ramp = 20.0 / g.length


def _coverage(g: SmearGeometry, u: np.ndarray, v: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Area fraction of the glass covered by cells (can exceed 1 where cells pile up)."""
    t = u / g.length
    ramp = lambda x, w=g.ramp: 1.0 / (1.0 + np.exp(-x / w))  # noqa: E731
    thick = ramp(g.thick_end - t)
    thin = ramp(t - g.mono_end)
    cov = g.coverage_thick * thick + g.coverage_mono * (1 - thick) * (1 - thin)
    cov += thin * g.coverage_thin * np.clip(1.0 - (t - g.mono_end) / (1.0 - g.mono_end + 1e-6), 0.25, 1.0)
    lateral = np.abs(v) / np.maximum(g.half_width_at(u), 1e-6)
    cov *= np.where(lateral > 0.85, g.lateral_thinning, 1.0)
    return cov * np.exp(0.2 * noise)


def _noise_at(g: SmearGeometry, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """The smear's low-frequency density variation at µm positions (bilinear on its grid)."""
    if g.noise is None:
        return np.zeros(np.shape(X))
    fy = np.clip(Y / NOISE_STEP - 0.5, 0, g.noise.shape[0] - 1)
    fx = np.clip(X / NOISE_STEP - 0.5, 0, g.noise.shape[1] - 1)
    return ndimage.map_coordinates(g.noise, [np.ravel(fy), np.ravel(fx)], order=1, mode="nearest").reshape(np.shape(X))


def _particle_boost(g: SmearGeometry, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inside a particle, cellular-trail factor >= 1) at smear coordinates."""
    inside = np.zeros(np.shape(u), bool)
    trail = np.ones(np.shape(u), np.float64)
    for pu, pv, pr, tl in g.particles:
        d2 = (u - pu) ** 2 + (v - pv) ** 2
        inside |= d2 <= pr * pr
        du = u - pu
        along = (du > 0) & (du < tl) & (np.abs(v - pv) < pr * 1.6)
        trail = np.where(along, np.maximum(trail, 1.0 + 1.6 * (1 - du / tl)), trail)
    return inside, trail


def build_scene(width: int, height: int, mpp: float, stain: Stain, params: SceneParams, seed: int,
                plain: bool = False) -> Scene:
    """Lay out a whole smear: geometry, blur patches, red cells, platelets and nucleated cells."""
    rng = np.random.default_rng([seed, 1])
    wum, hum = width * mpp, height * mpp
    if params.defect == "empty":
        return Scene(width, height, mpp, stain, seed, None, [], np.zeros((0, 2)), np.zeros(0, int),
                     np.zeros((0, 2)), np.zeros(0, int), [], 0.0)
    g = _choose_geometry(rng, wum, hum, params.defect == "no_monolayer", plain)
    if params.smear == "narrow" and not plain:
        _narrow_monolayer(g, np.random.default_rng([seed, 7]))

    # focus: a slight whole-slide softness and a few out-of-focus patches
    blur = []
    n_blur = int(rng.integers(params.blur_patches[0], params.blur_patches[1] + 1))
    for _ in range(n_blur):
        u = float(rng.uniform(0.1, 0.95)) * g.length
        v = float(rng.uniform(-0.6, 0.6)) * g.half_width
        c, s = math.cos(g.theta), math.sin(g.theta)
        r = float(rng.uniform(0.04, 0.14)) * g.length
        blur.append(BlurPatch(g.ox + u * c - v * s, g.oy + u * s + v * c, r, r * float(rng.uniform(0.5, 1.0)),
                              float(rng.uniform(0, math.pi)), float(rng.choice([1.2, 2.0, 3.0, 4.0]))))
    base_blur = float(rng.uniform(0.15, 0.3))  # an oil objective's softness (generator 1: 0.05-0.2 µm)
    if params.defect == "blurred":
        base_blur = float(rng.uniform(1.5, 3.0))
        blur = []

    # candidate positions: Poisson per 40-µm block with intensity from the coverage
    block = NOISE_STEP
    nx, ny = int(math.ceil(wum / block)), int(math.ceil(hum / block))
    BX, BY = np.meshgrid((np.arange(nx) + 0.5) * block, (np.arange(ny) + 0.5) * block)
    bu, bv = g.uv(BX, BY)
    inside = (bu >= 0) & (bu <= g.length) & (np.abs(bv) <= g.half_width_at(bu) + block)
    noise_rng = np.random.default_rng(g.noise_seed)
    low = ndimage.gaussian_filter(noise_rng.standard_normal(BX.shape), 4.0)
    if min(low.shape) < 8:  # a camera frame of a few blocks: too small for the 160-µm variation (and
        low = np.zeros_like(low)  # its filtered noise is nearly constant: dividing by its spread explodes)
    low /= max(1e-6, low.std())
    g.noise = low
    cov = np.where(inside, _coverage(g, bu, bv, low), 0.0)
    in_particle, trail = _particle_boost(g, bu, bv)
    cov = np.where(in_particle, np.maximum(cov, 2.5), cov)

    rbc_area = math.pi * 3.75 ** 2
    counts = rng.poisson(cov * block * block / rbc_area * _OVERSAMPLE)  # overlaps resolved below
    n = int(counts.sum())
    bidx = np.repeat(np.arange(counts.size), counts.ravel())
    px = BX.ravel()[bidx] + rng.uniform(-block / 2, block / 2, n)
    py = BY.ravel()[bidx] + rng.uniform(-block / 2, block / 2, n)
    pu, pv = g.uv(px, py)
    in_smear = (pu >= 0) & (pu <= g.length) & (np.abs(pv) <= g.half_width_at(pu))
    px, py, pu, pv = px[in_smear], py[in_smear], pu[in_smear], pv[in_smear]
    bidx = bidx[in_smear]
    zone = Scene(width, height, mpp, stain, seed, g, [], np.zeros((0, 2)), np.zeros(0, int), np.zeros((0, 2)),
                 np.zeros(0, int), [], 0.0).zone_at(px, py)
    part_in, trail_f = _particle_boost(g, pu, pv)

    # nucleated share of objects: richer in particles and their trails
    f_nuc = np.clip(0.33 * params.cellularity * trail_f, 0.01, 0.75)
    f_nuc = np.where(part_in, 0.75, f_nuc)
    u01 = rng.uniform(size=len(px))
    is_nuc = u01 < f_nuc
    is_plt = (~is_nuc) & (u01 > 0.97)

    # nucleated cell types from the composition; more smudge cells on the feathered edge
    types = list(params.composition)
    probs = np.array([params.composition[t] for t in types], np.float64)
    probs /= probs.sum()
    n_nuc = int(is_nuc.sum())
    type_idx = rng.choice(len(types), size=n_nuc, p=probs)
    nuc_zone = zone[is_nuc]
    smudge_extra = rng.uniform(size=n_nuc) < np.where(nuc_zone == ZONE_CODE["thin"], 0.12, 0.015)

    diam = np.empty(n_nuc)
    cell_types = []
    for i in range(n_nuc):
        t = "smudge" if smudge_extra[i] else types[type_idx[i]]
        cell_types.append(t)
    variants = [""] * n_nuc
    if params.abnormal_promyelocytes:
        vr = rng.uniform(size=n_nuc)
        variants = ["" if t != "promyelocyte" else ("microgranular" if vr[i] < params.apl_variant_share
                                                   else "hypergranular")
                    for i, t in enumerate(cell_types)]
    for i, t in enumerate(cell_types):
        d0, d1 = spec_for(t, variants[i]).diameter_um
        diam[i] = rng.uniform(d0, d1)

    # resolve overlaps outside the thick zone and particles (cells lie apart in a monolayer)
    radius = np.full(len(px), 3.75)
    radius[is_nuc] = diam / 2
    radius[is_plt] = 1.2
    allow_overlap = (zone == ZONE_CODE["thick"]) | (zone == ZONE_CODE["particle"])
    keep = _resolve_overlaps(px, py, radius, allow_overlap, rng)
    # thin the oversampled draw back to each block's target coverage (after the overlap resolution,
    # which brought dense zones near the packing limit and left sparse ones oversampled)
    disc = math.pi * radius ** 2
    achieved = np.bincount(bidx[keep], weights=disc[keep], minlength=counts.size) / (block * block)
    target = cov.ravel()
    ratio = np.where(achieved > 0, target / np.maximum(achieved, 1e-9), 1.0)
    keep &= rng.uniform(size=len(px)) < np.minimum(1.0, ratio[bidx])

    nuc_positions = np.flatnonzero(is_nuc)
    cells: list[Cell] = []
    zone_names = ZONES
    cell_seed = np.random.default_rng([seed, 2]).integers(0, 2 ** 62, size=n_nuc)
    auer_draw = rng.uniform(size=n_nuc)
    faggot_draw = rng.uniform(size=n_nuc)
    n_rods_draw = rng.integers(1, 4, size=n_nuc)
    aspects = rng.uniform(size=n_nuc)
    angles = rng.uniform(0, 2 * math.pi, n_nuc)
    dens = np.exp(rng.normal(0, 0.08, n_nuc))
    maturity = rng.uniform(size=n_nuc)
    for k, pos in enumerate(nuc_positions):
        if not keep[pos]:
            continue
        t = cell_types[k]
        spec = spec_for(t, variants[k])
        auer = 0
        faggot = False
        if auer_draw[k] < params.auer_share.get(t, 0.0):
            faggot = faggot_draw[k] < params.faggot_share
            auer = int(rng.integers(6, 15)) if faggot else int(n_rods_draw[k])
        cells.append(Cell(
            id=len(cells), type=t, x=float(px[pos]), y=float(py[pos]), diameter=float(diam[k]),
            aspect=float(spec.aspect[0] + aspects[k] * (spec.aspect[1] - spec.aspect[0])),
            angle=float(angles[k]), seed=int(cell_seed[k]), variant=variants[k], auer=auer, faggot=faggot,
            zone=zone_names[int(zone[pos])], density=float(dens[k]), maturity=float(maturity[k])))
    rbc_sel = keep & ~is_nuc & ~is_plt
    plt_sel = keep & is_plt
    rbc_xy = np.stack([px[rbc_sel], py[rbc_sel]], axis=1)
    plt_xy = np.stack([px[plt_sel], py[plt_sel]], axis=1)
    # red-cell rouleaux in the thick zone: short stacks of coins
    thick_idx = np.flatnonzero(zone[rbc_sel] == ZONE_CODE["thick"])
    if len(thick_idx):
        starts = rng.choice(thick_idx, size=max(1, len(thick_idx) // 25), replace=False)
        extra = []
        for i in starts:
            ang = rng.uniform(0, math.pi)
            for j in range(1, int(rng.integers(3, 8))):
                extra.append(rbc_xy[i] + j * 2.6 * np.array([math.cos(ang), math.sin(ang)]))
        if extra:
            rbc_xy = np.concatenate([rbc_xy, np.array(extra)])
    rbc_sprite = rng.integers(0, 24, len(rbc_xy))
    plt_sprite = rng.integers(0, 12, len(plt_xy))
    return Scene(width, height, mpp, stain, seed, g, cells, rbc_xy, rbc_sprite, plt_xy, plt_sprite, blur, base_blur)


def _resolve_overlaps(x, y, r, allow_overlap, rng, tile: float = 500.0) -> np.ndarray:
    """Drop objects overlapping an earlier one, except where overlap is allowed (thick zone).

    Clashing pairs are searched tile by tile (each tile with a halo of two maximum radii), so memory
    stays bounded on whole slides with millions of objects; the greedy resolution is then global.
    """
    keep = np.ones(len(x), bool)
    if len(x) < 2:
        return keep
    reach = 2 * float(r.max())
    tx = np.floor(x / tile).astype(np.int64)
    ty = np.floor(y / tile).astype(np.int64)
    ntx = int(tx.max()) + 1
    tid = ty * ntx + tx
    order = np.argsort(tid, kind="stable")
    sorted_tid = tid[order]
    found_i, found_j = [], []
    for t in np.unique(sorted_tid):
        cy, cx = divmod(int(t), ntx)
        parts = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                nx_, ny_ = cx + dx, cy + dy
                if nx_ < 0 or ny_ < 0 or nx_ >= ntx:
                    continue
                nt = ny_ * ntx + nx_
                lo, hi = np.searchsorted(sorted_tid, nt), np.searchsorted(sorted_tid, nt, side="right")
                if hi > lo:
                    parts.append(order[lo:hi])
        idx = np.concatenate(parts)
        x0, y0 = cx * tile - reach, cy * tile - reach
        near = (x[idx] >= x0) & (x[idx] < x0 + tile + 2 * reach) & (y[idx] >= y0) & (y[idx] < y0 + tile + 2 * reach)
        idx = idx[near]
        if len(idx) < 2:
            continue
        pairs = cKDTree(np.stack([x[idx], y[idx]], axis=1)).query_pairs(r=reach, output_type="ndarray")
        if len(pairs) == 0:
            continue
        i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
        i, j = np.minimum(i, j), np.maximum(i, j)
        mine = tid[i] == t  # each pair is taken in the tile of its smaller index only
        i, j = i[mine], j[mine]
        d = np.hypot(x[i] - x[j], y[i] - y[j])
        clash = (d < (r[i] + r[j]) * 0.92) & ~(allow_overlap[i] & allow_overlap[j])
        found_i.append(i[clash])
        found_j.append(j[clash])
    if not found_i:
        return keep
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    prio = rng.permutation(len(x))
    # the one with the larger priority number gives way
    loser = np.where(prio[i] > prio[j], i, j)
    winner = np.where(prio[i] > prio[j], j, i)
    seq = np.argsort(np.minimum(prio[i], prio[j]), kind="stable")
    for a, b in zip(winner[seq], loser[seq]):
        if keep[a]:
            keep[b] = False
    return keep
