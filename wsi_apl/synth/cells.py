"""Render single marrow cells as optical-density patches.

A cell is described in µm (:class:`Cell`); :func:`shape_of` derives its detailed geometry
(outline, nucleus parts, nucleoli, granules, Auer rods) deterministically from the cell's own seed,
so a cell drawn twice (it may straddle two render bands) is drawn identically and its ground-truth
box always matches its pixels. :func:`render_cell` rasterises it at a given mpp into an OD patch
of shape (h, w, 3) placed at integer level-0 pixel offsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .morphology import TypeSpec, spec_for
from .raster import capsule_dist, ellipse_dist, primitive_mask, soft
from .stains import Stain


@dataclass
class Cell:
    """One nucleated cell of the scene. Positions and sizes in µm (slide coordinates)."""

    id: int
    type: str
    x: float
    y: float
    diameter: float
    aspect: float
    angle: float          # radians, major axis direction
    seed: int
    variant: str = ""     # APL promyelocytes: hypergranular | microgranular
    auer: int = 0         # number of Auer rods (0: none)
    faggot: bool = False  # a bundle of Auer rods
    zone: str = ""
    density: float = 1.0  # staining thickness factor
    maturity: float = 0.5  # erythroblasts: 0 basophilic .. 1 orthochromatic


@dataclass
class Shape:
    """Geometry of a cell in its own frame (µm, u along the major axis, origin at the centre)."""

    spec: TypeSpec
    a: float
    b: float
    harmonics: list[tuple[int, float, float]]
    nucleus: list[tuple] = field(default_factory=list)      # primitives united
    nucleus_cut: list[tuple] = field(default_factory=list)  # primitives subtracted
    nucleoli: list[tuple[float, float, float]] = field(default_factory=list)
    hof: tuple[float, float, float, float] | None = None
    granules: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    granule_radius: float = 0.3
    rods: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    chromatin_shift: tuple[int, int] = (0, 0)
    edge_max: float = 1.0  # largest outline radius factor (1 + max perturbation)


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1])) if lo_hi[1] > lo_hi[0] else float(lo_hi[0])


@dataclass
class _Nucleus:
    """Where the nucleus lies in the cell frame: centre offset, radii (µm), offset direction."""

    ox: float
    oy: float
    an: float
    bn: float
    direction: float


def _outline(cell: Cell, spec: TypeSpec, rng: np.random.Generator) -> Shape:
    """The cell's outline (radii, edge harmonics) and chromatin texture offset."""
    a = cell.diameter / 2.0
    b = a * cell.aspect
    amp = 0.14 if spec.nucleus == "smudge" else 0.05  # real marrow cells are pressed out of round
    harmonics = [(k, float(rng.uniform(0.3, 1.0) * amp / (1 + 0.3 * i)), float(rng.uniform(0, 2 * math.pi)))
                 for i, k in enumerate((2, 3, 5))]
    phis = np.linspace(0, 2 * math.pi, 73)
    edge = 1 + sum(A * np.cos(k * phis + p) for k, A, p in harmonics)
    shape = Shape(spec=spec, a=a, b=b, harmonics=harmonics, edge_max=float(edge.max()))
    shape.chromatin_shift = (int(rng.integers(0, 10_000)), int(rng.integers(0, 10_000)))
    return shape


def _place_nucleus(cell: Cell, shape: Shape, rng: np.random.Generator) -> _Nucleus:
    """Nucleus size and position: offset towards one side by a share of the free room."""
    spec = shape.spec
    dn = cell.diameter * _u(rng, spec.nc_ratio) * math.sqrt(cell.aspect)
    an = dn / 2.0
    bn = an * float(rng.uniform(0.82, 1.0))
    free = max(0.0, shape.b - an * 1.02)
    direction = float(rng.uniform(0, 2 * math.pi))
    off = _u(rng, spec.eccentricity) * free
    ox, oy = off * math.cos(direction), off * math.sin(direction) * cell.aspect
    return _Nucleus(ox, oy, an, bn, direction)


def _round_nucleus(nuc: _Nucleus, ang_n: float, rng: np.random.Generator) -> tuple[list[tuple], list[tuple]]:
    return [("ellipse", nuc.ox, nuc.oy, nuc.an, nuc.bn, ang_n)], []


def _kidney_nucleus(nuc: _Nucleus, ang_n: float, rng: np.random.Generator) -> tuple[list[tuple], list[tuple]]:
    ox, oy, an, bn = nuc.ox, nuc.oy, nuc.an, nuc.bn
    psi = nuc.direction + math.pi + float(rng.normal(0, 0.4))  # indent faces the cell centre
    rc = an * float(rng.uniform(0.42, 0.6))
    return ([("ellipse", ox, oy, an, bn, ang_n)],
            [("ellipse", ox + 1.0 * an * math.cos(psi), oy + 1.0 * bn * math.sin(psi), rc, rc, 0.0)])


def _band_nucleus(nuc: _Nucleus, ang_n: float, rng: np.random.Generator) -> tuple[list[tuple], list[tuple]]:
    radius = nuc.an * 0.68
    t = float(rng.uniform(1.9, 2.7))
    start = float(rng.uniform(0, 2 * math.pi))
    span = float(rng.uniform(math.radians(200), math.radians(280)))
    return [("arc", 0.0, 0.0, radius, t, start, span)], []


def _segmented_nucleus(nuc: _Nucleus, ang_n: float, rng: np.random.Generator) -> tuple[list[tuple], list[tuple]]:
    n_lobes = int(rng.choice([2, 3, 3, 4, 4, 5]))
    radius = nuc.an * 0.62
    start = float(rng.uniform(0, 2 * math.pi))
    span = float(rng.uniform(math.radians(160), math.radians(290)))
    parts: list[tuple] = []
    centres = []
    for i in range(n_lobes):
        phi = start + span * i / max(1, n_lobes - 1)
        cx, cy = radius * math.cos(phi), radius * math.sin(phi)
        r = float(rng.uniform(1.5, 2.1))
        parts.append(("ellipse", cx, cy, r, r * float(rng.uniform(0.75, 0.95)), float(rng.uniform(0, math.pi))))
        centres.append((cx, cy))
    for (x0, y0), (x1, y1) in zip(centres[:-1], centres[1:]):
        parts.append(("capsule", x0, y0, x1, y1, 0.55))
    return parts, []


def _bilobed_nucleus(nuc: _Nucleus, ang_n: float, rng: np.random.Generator) -> tuple[list[tuple], list[tuple]]:
    ox, oy, an = nuc.ox, nuc.oy, nuc.an
    phi = float(rng.uniform(0, math.pi))
    sep = an * 0.48
    rl = an * 0.6
    parts: list[tuple] = []
    for sign in (-1, 1):
        parts.append(("ellipse", ox + sign * sep * math.cos(phi), oy + sign * sep * math.sin(phi),
                      rl, rl * float(rng.uniform(0.75, 0.95)), phi + math.pi / 2))
    parts.append(("capsule", ox - sep * math.cos(phi), oy - sep * math.sin(phi),
                  ox + sep * math.cos(phi), oy + sep * math.sin(phi), an * 0.35))
    return parts, []


#: Nucleus kind -> its primitives ``(united, subtracted)`` from the placed nucleus, its angle and the rng.
_NUCLEUS_PARTS = {"round": _round_nucleus, "kidney": _kidney_nucleus, "band": _band_nucleus,
                  "segmented": _segmented_nucleus, "bilobed": _bilobed_nucleus}


def _wobble_nucleus(shape: Shape, seed: int) -> None:
    """Irregular nuclear outlines (folds, notches, flattening against the cell edge); drawn from a
    stream of their own, so that every other draw of the cell stays as in earlier generators."""
    wobble = np.random.default_rng([seed, 7])
    for i, prim in enumerate(shape.nucleus):
        if prim[0] == "ellipse":
            harm = [(k, float(wobble.uniform(0.01, 0.06)) / (1 + 0.4 * n), float(wobble.uniform(0, 2 * math.pi)))
                    for n, k in enumerate((2, 3, 4, 6))]
            shape.nucleus[i] = (*prim, harm)


def _add_nucleoli_and_hof(shape: Shape, nuc: _Nucleus, rng: np.random.Generator) -> None:
    """Nucleoli inside the nucleus, and the perinuclear pale zone (hof) on the side facing the centre."""
    spec = shape.spec
    ox, oy, an, bn = nuc.ox, nuc.oy, nuc.an, nuc.bn
    n_nucleoli = int(rng.integers(spec.nucleoli[0], spec.nucleoli[1] + 1))
    for _ in range(n_nucleoli):
        rr = an * 0.5 * math.sqrt(float(rng.uniform()))
        th = float(rng.uniform(0, 2 * math.pi))
        shape.nucleoli.append((ox + rr * math.cos(th), oy + rr * math.sin(th), float(rng.uniform(0.7, 1.3))))

    if spec.hof > 0 and rng.uniform() < spec.hof:
        towards = nuc.direction + math.pi
        hr = an * float(rng.uniform(0.45, 0.65))
        shape.hof = (ox + (an + hr * 0.35) * math.cos(towards), oy + (bn + hr * 0.35) * math.sin(towards), hr,
                     0.55)


def _add_granules(shape: Shape, nuc: _Nucleus, rng: np.random.Generator) -> None:
    """Cytoplasmic granules, uniform over the cell's disc."""
    spec = shape.spec
    a, b = shape.a, shape.b
    cyto_area = math.pi * (a * b - (nuc.an * nuc.bn if spec.nucleus != "segmented" else 3.0))
    n = int(rng.poisson(max(0.0, _u(rng, spec.granule_density) * cyto_area)))
    rr = np.sqrt(rng.uniform(0, 0.97, n))  # uniform over the disc
    th = rng.uniform(0, 2 * math.pi, n)
    shape.granules = np.stack([rr * np.cos(th) * a, rr * np.sin(th) * b], axis=1)
    shape.granule_radius = _u(rng, spec.granule_radius_um)


def _add_rods(shape: Shape, cell: Cell, nuc: _Nucleus, rng: np.random.Generator) -> None:
    """``cell.auer`` Auer rods in the cytoplasm (a faggot cell's bundle roughly parallel)."""
    a, b = shape.a, shape.b
    ox, oy, an, bn = nuc.ox, nuc.oy, nuc.an, nuc.bn
    base_angle = float(rng.uniform(0, math.pi))
    n_rods = cell.auer
    for _ in range(n_rods):
        for _try in range(20):
            rr = math.sqrt(float(rng.uniform(0.15, 0.7)))
            th = float(rng.uniform(0, 2 * math.pi))
            cx, cy = rr * a * math.cos(th), rr * b * math.sin(th)
            if ((cx - ox) / an) ** 2 + ((cy - oy) / bn) ** 2 > 1.3:
                break
        if cell.faggot:
            ang = base_angle + float(rng.normal(0, 0.18))
            length = float(rng.uniform(3.0, 6.0))
        else:
            ang = float(rng.uniform(0, math.pi))
            length = float(rng.uniform(3.5, 7.0))
        # keep the rod inside the cell outline
        length = min(length, 2 * max(0.5, min(a, b) * 0.9 - math.hypot(cx, cy) * 0.5))
        w = float(rng.uniform(0.6, 1.0))
        dx, dy = 0.5 * length * math.cos(ang), 0.5 * length * math.sin(ang)
        shape.rods.append((cx - dx, cy - dy, cx + dx, cy + dy, w))


def shape_of(cell: Cell) -> Shape:
    """Derive the full geometry of ``cell`` from its seed (deterministic).

    The helpers draw from the cell's generator in a fixed order (outline, nucleus, its parts,
    nucleoli and hof, granules, rods): the order is part of the cell's identity for a seed.
    """
    rng = np.random.default_rng(cell.seed)
    spec = spec_for(cell.type, cell.variant)
    shape = _outline(cell, spec, rng)
    if spec.nucleus == "smudge":
        return shape
    nuc = _place_nucleus(cell, shape, rng)
    ang_n = float(rng.uniform(0, math.pi))
    parts = _NUCLEUS_PARTS.get(spec.nucleus)
    if parts is not None:
        united, cut = parts(nuc, ang_n, rng)
        shape.nucleus.extend(united)
        shape.nucleus_cut.extend(cut)
    _wobble_nucleus(shape, cell.seed)
    _add_nucleoli_and_hof(shape, nuc, rng)
    if spec.granule != "none":
        _add_granules(shape, nuc, rng)
    if cell.auer > 0:
        _add_rods(shape, cell, nuc, rng)
    return shape


def cell_box_px(cell: Cell, shape: Shape, mpp: float) -> tuple[float, float, float, float]:
    """Level-0 pixel box ``(x0, y0, x1, y1)`` of the cell outline (mask >= 0.5)."""
    a, b = shape.a * shape.edge_max, shape.b * shape.edge_max
    c, s = math.cos(cell.angle), math.sin(cell.angle)
    hx = math.sqrt((a * c) ** 2 + (b * s) ** 2)
    hy = math.sqrt((a * s) ** 2 + (b * c) ** 2)
    return ((cell.x - hx) / mpp, (cell.y - hy) / mpp, (cell.x + hx) / mpp, (cell.y + hy) / mpp)


class NoiseBank:
    """Zero-mean, unit-variance band-limited noise fields at a few grain sizes (µm), at one mpp."""

    SCALES = (0.2, 0.35, 0.5, 0.8, 1.1, 1.5)

    def __init__(self, mpp: float, seed: int, size_um: float = 64.0):
        rng = np.random.default_rng(seed)
        n = int(max(128, math.ceil(size_um / mpp)))
        self.size = n
        self.fields = {}
        for s in self.SCALES:
            f = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), max(0.5, s / mpp),
                                        mode="wrap")
            f -= f.mean()
            f /= max(1e-6, float(f.std()))
            self.fields[s] = f

    def crop(self, scale_um: float, shift: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
        key = min(self.SCALES, key=lambda s: abs(s - scale_um))
        f = self.fields[key]
        h, w = shape
        oy, ox = shift[0] % self.size, shift[1] % self.size
        ys = (np.arange(h) + oy) % self.size
        xs = (np.arange(w) + ox) % self.size
        return f[np.ix_(ys, xs)]


def _pixel_frame(cell: Cell, shape: Shape, mpp: float) -> tuple[int, int, np.ndarray, np.ndarray]:
    """``(x0, y0, U, V)``: the patch's integer level-0 pixel offset, and its pixel centres in µm in the
    cell frame (relative to the cell centre, rotated onto the major axis), each (h, w)."""
    bx0, by0, bx1, by1 = cell_box_px(cell, shape, mpp)
    x0, y0 = int(math.floor(bx0)) - 1, int(math.floor(by0)) - 1
    x1, y1 = int(math.ceil(bx1)) + 1, int(math.ceil(by1)) + 1
    # pixel centres in µm relative to the cell centre, rotated into the cell frame
    xs = (np.arange(x0, x1, dtype=np.float32) + 0.5) * mpp - cell.x
    ys = (np.arange(y0, y1, dtype=np.float32) + 0.5) * mpp - cell.y
    X, Y = np.meshgrid(xs, ys)
    c, s = math.cos(cell.angle), math.sin(cell.angle)
    U = X * c + Y * s
    V = -X * s + Y * c
    return x0, y0, U, V


def _nucleus_mask(U: np.ndarray, V: np.ndarray, shape: Shape, mpp: float, outline: np.ndarray) -> np.ndarray:
    """Nucleus coverage (h, w) in [0, 1]: its primitives united, the cut ones removed, within the outline."""
    nucleus = np.zeros(U.shape, np.float32)
    for prim in shape.nucleus:
        np.maximum(nucleus, primitive_mask(U, V, prim, mpp), out=nucleus)
    for prim in shape.nucleus_cut:
        nucleus *= 1.0 - primitive_mask(U, V, prim, mpp)
    nucleus *= outline
    return nucleus


def _chromatin_density(U: np.ndarray, V: np.ndarray, shape: Shape, mpp: float, bank: NoiseBank) -> np.ndarray:
    """Chromatin texture (coarse clumps in lymphocytes, plasma cells, erythroblasts), paler in nucleoli."""
    spec = shape.spec
    chrom = bank.crop(spec.chromatin_scale_um, shape.chromatin_shift, U.shape)
    chrom_density = np.clip(1.0 + spec.chromatin_amp * chrom, 0.35, 2.2) * spec.nucleus_density
    for nx, ny, nr in shape.nucleoli:
        m = soft(ellipse_dist(U, V, nx, ny, nr, nr * 0.85, 0.0), mpp)
        chrom_density = chrom_density * (1.0 - 0.5 * m)
    return chrom_density


def _cytoplasm_od(cell: Cell, spec: TypeSpec, od_of: dict) -> np.ndarray:
    """The cytoplasm's colour (OD per unit density)."""
    if cell.type == "erythroblast":
        m = cell.maturity
        return od_of["cyto_baso"] * (1.0 - m) + od_of["rbc"] * 1.4 * m
    wb, wn = spec.cyto_mix
    return od_of["cyto_baso"] * wb + od_of["cyto_neutral"] * wn


def _cytoplasm(U: np.ndarray, V: np.ndarray, shape: Shape, mpp: float, bank: NoiseBank, outline: np.ndarray,
               nucleus: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Cytoplasm density (h, w), lighter in the hof, and the hof's coverage (None without one)."""
    tex = bank.crop(0.8, (shape.chromatin_shift[1], shape.chromatin_shift[0]), U.shape)
    cyto = (outline - nucleus) * shape.spec.cyto_density * np.clip(1.0 + 0.08 * tex, 0.6, 1.4)
    if shape.hof is None:
        return cyto, None
    hx, hy, hr, depth = shape.hof
    hof = soft(ellipse_dist(U, V, hx, hy, hr, hr * 0.8, 0.0), mpp) * outline
    return cyto * (1.0 - depth * hof), hof


def _granules_od(cell: Cell, shape: Shape, mpp: float, x0: int, y0: int, outline: np.ndarray, nucleus: np.ndarray,
                 hof: np.ndarray | None, od_of: dict) -> np.ndarray:
    """OD (h, w, 3) of the cytoplasmic granules, each a small Gaussian dot at its nearest pixel."""
    spec = shape.spec
    h, w = outline.shape
    c, s = math.cos(cell.angle), math.sin(cell.angle)
    gx = (shape.granules[:, 0] * c - shape.granules[:, 1] * s + cell.x) / mpp - x0 - 0.5
    gy = (shape.granules[:, 0] * s + shape.granules[:, 1] * c + cell.y) / mpp - y0 - 0.5
    ix = np.clip(np.rint(gx).astype(int), 0, w - 1)
    iy = np.clip(np.rint(gy).astype(int), 0, h - 1)
    keep = outline[iy, ix] > 0.5
    if not spec.granules_over_nucleus:
        keep &= nucleus[iy, ix] < 0.5
    if hof is not None:
        keep &= hof[iy, ix] < 0.5
    imp = np.zeros((h, w), np.float32)
    np.add.at(imp, (iy[keep], ix[keep]), 1.0)
    sigma = max(0.35, shape.granule_radius / mpp / 1.3)
    gran = ndimage.gaussian_filter(imp, sigma) * (2 * math.pi * sigma * sigma)
    kind = {"azur": "azur_granule", "spec": "spec_granule", "eos": "eos_granule"}[spec.granule]
    # azurophilic granules: many, fine and each faint, a purple dust over the cytoplasm (and the
    # nucleus) rather than separate dots
    strength = {"azur_granule": 0.55, "spec_granule": 1.0}.get(kind, 0.9)
    return (np.minimum(gran, 1.6) * outline * strength)[..., None] * od_of[kind]


def _rods_od(U: np.ndarray, V: np.ndarray, shape: Shape, mpp: float, outline: np.ndarray, od_of: dict) -> np.ndarray:
    """OD (h, w, 3) of the Auer rods."""
    rods = np.zeros(U.shape, np.float32)
    for rod in shape.rods:
        np.maximum(rods, soft(capsule_dist(U, V, *rod), mpp), out=rods)
    return (rods * outline * 1.1)[..., None] * od_of["auer"]


def render_cell(cell: Cell, shape: Shape, mpp: float, stain: Stain, bank: NoiseBank
                ) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Rasterise ``cell`` at ``mpp``.

    Returns ``(x0, y0, od, nucleus)``: the integer level-0 pixel offset of the patch, its OD
    (h, w, 3) float32 and the nucleus coverage (h, w) in [0, 1] (for tests that count nuclei).
    """
    x0, y0, U, V = _pixel_frame(cell, shape, mpp)
    spec = shape.spec
    od_of = stain.od

    outline = soft(ellipse_dist(U, V, 0.0, 0.0, shape.a, shape.b, 0.0, shape.harmonics), mpp)
    if spec.nucleus == "smudge":
        streak = bank.crop(spec.chromatin_scale_um, shape.chromatin_shift, U.shape)
        dens = outline * np.clip(1.0 + spec.chromatin_amp * streak, 0.2, 2.0) * spec.nucleus_density
        od = dens[..., None] * od_of["nucleus"] * cell.density
        return x0, y0, od.astype(np.float32), outline.astype(np.float32)

    nucleus = _nucleus_mask(U, V, shape, mpp, outline)
    chrom_density = _chromatin_density(U, V, shape, mpp, bank)
    cyto, hof = _cytoplasm(U, V, shape, mpp, bank, outline, nucleus)
    od = cyto[..., None] * _cytoplasm_od(cell, spec, od_of) + (nucleus * chrom_density)[..., None] * od_of["nucleus"]
    if len(shape.granules):
        od = od + _granules_od(cell, shape, mpp, x0, y0, outline, nucleus, hof, od_of)
    if shape.rods:
        od = od + _rods_od(U, V, shape, mpp, outline, od_of)
    return x0, y0, (od * cell.density).astype(np.float32), nucleus
