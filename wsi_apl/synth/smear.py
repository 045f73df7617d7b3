"""Where the smear lies on the slide, and its zones (thick, particle, monolayer, thin, glass).

The smear is a tongue of blood spread from where the drop was placed: a *thick* zone near the
start (cells pile up, red cells clump), marrow *particles* with cellular trails behind them, the
*monolayer* zone where cells lie apart (where a cytologist counts), and the *thin* feathered edge
(sparse, broken cells), on glass. The zones follow the local cell coverage, which this module
models along the smear's axis (:func:`coverage`). Positions are µm from the slide's top-left corner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

ZONES = ("glass", "thick", "monolayer", "thin", "particle")
ZONE_CODE = {z: i for i, z in enumerate(ZONES)}
#: Ground-truth zones follow the local cell coverage (share of glass covered by cells, >1 where they
#: pile up): thick where cells pile up, thin where they are sparse, monolayer in between.
THICK_COVERAGE = 0.9
THIN_COVERAGE = 0.25
NOISE_STEP = 40.0


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


def zone_codes(g: SmearGeometry, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Zone code (see :data:`ZONES`) at µm positions of the smear ``g``, from the local cell coverage."""
    u, v = g.uv(X, Y)
    inside = (u >= 0) & (u <= g.length) & (np.abs(v) <= g.half_width_at(u))
    cov = coverage(g, u, v, noise_at(g, np.asarray(X, np.float64), np.asarray(Y, np.float64)))
    z = np.where(cov >= THICK_COVERAGE, ZONE_CODE["thick"],
                 np.where(cov < THIN_COVERAGE, ZONE_CODE["thin"], ZONE_CODE["monolayer"]))
    for pu, pv, pr, _trail in g.particles:
        z = np.where((u - pu) ** 2 + (v - pv) ** 2 <= pr * pr, ZONE_CODE["particle"], z)
    return np.where(inside, z, ZONE_CODE["glass"]).astype(np.uint8)


def _plain_geometry(rng: np.random.Generator, wum: float, hum: float) -> SmearGeometry:
    """A camera frame taken inside the monolayer: the whole picture is monolayer."""
    return SmearGeometry(ox=-0.1 * wum, oy=hum / 2, theta=0.0, length=1.2 * wum, half_width=1.5 * hum,
                         thick_end=-1.0, mono_end=2.0, coverage_thick=0.0,
                         coverage_mono=float(rng.uniform(0.32, 0.48)), coverage_thin=0.0,
                         edge_harmonics=[], particles=[], noise_seed=int(rng.integers(1 << 30)))


def _draw_particles(rng: np.random.Generator, length: float, width: float) -> list[tuple[float, float, float, float]]:
    """1-4 marrow particles ``(u, v, radius, trail length)`` in the first half of the smear."""
    half = width / 2
    particles = []
    for _ in range(int(rng.integers(1, 5))):
        pu = float(rng.uniform(0.04, 0.5)) * length
        pv = float(rng.uniform(-0.55, 0.55)) * half
        pr = float(rng.uniform(0.025, 0.06)) * min(length, width * 2)
        particles.append((pu, pv, pr, pr * float(rng.uniform(3, 6))))
    return particles


def choose_geometry(rng: np.random.Generator, wum: float, hum: float, no_monolayer: bool,
                    plain: bool = False) -> SmearGeometry:
    """Draw the smear's placement, shape, zone boundaries and particles on a ``wum`` x ``hum`` µm slide."""
    if plain:
        return _plain_geometry(rng, wum, hum)
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
    particles = _draw_particles(rng, length, width)
    return SmearGeometry(
        ox=ox, oy=oy, theta=theta, length=length, half_width=half, thick_end=thick_end, mono_end=mono_end,
        coverage_thick=coverage_thick, coverage_mono=float(rng.uniform(0.4, 0.55)),
        coverage_thin=float(rng.uniform(0.1, 0.2)),
        edge_harmonics=[(k, float(rng.uniform(0, 0.05)), float(rng.uniform(0, 6.3))) for k in (1, 2, 3, 5)],
        particles=particles, noise_seed=int(rng.integers(1 << 30)), lateral_thinning=lateral)


def narrow_monolayer(g: SmearGeometry, rng: np.random.Generator) -> None:
    """Shrink the monolayer to a band of 250-450 µm across the smear, with sharper transitions.

    A real smear spread too fast or from too large a drop often has only such a band between its
    thick part and the feathered edge. Drawn from its own generator so that normal slides of the
    same seed stay as they were.
    """
    band = float(rng.uniform(250.0, 450.0))
    g.thick_end = float(rng.uniform(0.3, 0.5))
    g.mono_end = min(0.95, g.thick_end + band / g.length)
    g.ramp = 20.0 / g.length


def coverage(g: SmearGeometry, u: np.ndarray, v: np.ndarray, noise: np.ndarray) -> np.ndarray:
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


def attach_noise(g: SmearGeometry, shape: tuple[int, int]) -> np.ndarray:
    """Draw the smear's low-frequency density variation on a NOISE_STEP grid of ``shape``, store it in
    ``g.noise`` and return it (drawn from the smear's own ``noise_seed``)."""
    noise_rng = np.random.default_rng(g.noise_seed)
    low = ndimage.gaussian_filter(noise_rng.standard_normal(shape), 4.0)
    if min(low.shape) < 8:  # a camera frame of a few blocks: too small for the 160-µm variation (and
        low = np.zeros_like(low)  # its filtered noise is nearly constant: dividing by its spread explodes)
    low /= max(1e-6, low.std())
    g.noise = low
    return low


def noise_at(g: SmearGeometry, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """The smear's low-frequency density variation at µm positions (bilinear on its grid)."""
    if g.noise is None:
        return np.zeros(np.shape(X))
    fy = np.clip(Y / NOISE_STEP - 0.5, 0, g.noise.shape[0] - 1)
    fx = np.clip(X / NOISE_STEP - 0.5, 0, g.noise.shape[1] - 1)
    return ndimage.map_coordinates(g.noise, [np.ravel(fy), np.ravel(fx)], order=1, mode="nearest").reshape(np.shape(X))


def particle_boost(g: SmearGeometry, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
