"""Populating a smear: red cells, platelets and nucleated cells where its coverage puts them.

The steps of :func:`wsi_apl.synth.scene.build_scene`, in the order it takes them (they all draw
from the scene's one generator, so the order is part of the slide's identity): candidate objects
per 40-µm block (:func:`block_coverage`, :func:`draw_candidates`), the nucleated cells' types and
sizes (:func:`draw_nucleated`), overlaps resolved and the density thinned back to the coverage
(:func:`settle`), then the cells themselves (:func:`make_cells`) and the red cells' rouleaux and
sprites (:func:`place_red_cells_and_platelets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .cells import Cell
from .morphology import spec_for
from .smear import NOISE_STEP, ZONE_CODE, ZONES, SmearGeometry, attach_noise, coverage, particle_boost, zone_codes

#: Candidate objects drawn per block, relative to the target coverage (overlaps resolved afterwards).
OVERSAMPLE = 3.0
RBC_RADIUS = 3.75  # µm
PLATELET_RADIUS = 1.2


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


@dataclass
class Candidates:
    """Objects drawn over the smear, before overlaps are resolved (µm positions, one entry each)."""

    x: np.ndarray
    y: np.ndarray
    zone: np.ndarray    # zone code at the object
    block: np.ndarray   # flat index of the NOISE_STEP block it was drawn in
    is_nuc: np.ndarray  # a nucleated cell
    is_plt: np.ndarray  # a platelet (neither: a red cell)


@dataclass
class Nucleated:
    """Type, variant and diameter (µm) of every nucleated candidate, in candidate order."""

    types: list[str]
    variants: list[str]
    diameter: np.ndarray


def block_coverage(g: SmearGeometry, wum: float, hum: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block centres ``(BX, BY)`` (µm) of a NOISE_STEP grid over the slide and each block's target
    coverage; draws the smear's density noise (``g.noise``) on that grid."""
    block = NOISE_STEP
    nx, ny = int(math.ceil(wum / block)), int(math.ceil(hum / block))
    BX, BY = np.meshgrid((np.arange(nx) + 0.5) * block, (np.arange(ny) + 0.5) * block)
    bu, bv = g.uv(BX, BY)
    inside = (bu >= 0) & (bu <= g.length) & (np.abs(bv) <= g.half_width_at(bu) + block)
    low = attach_noise(g, BX.shape)
    cov = np.where(inside, coverage(g, bu, bv, low), 0.0)
    in_particle, _trail = particle_boost(g, bu, bv)
    cov = np.where(in_particle, np.maximum(cov, 2.5), cov)
    return BX, BY, cov


def draw_candidates(rng: np.random.Generator, g: SmearGeometry, BX: np.ndarray, BY: np.ndarray, cov: np.ndarray,
                    cellularity: float) -> Candidates:
    """Poisson-many objects per block (intensity from the coverage), kept inside the smear; each a
    nucleated cell, platelet or red cell, nucleated ones richer in particles and their trails."""
    block = NOISE_STEP
    rbc_area = math.pi * RBC_RADIUS ** 2
    counts = rng.poisson(cov * block * block / rbc_area * OVERSAMPLE)  # overlaps resolved below
    n = int(counts.sum())
    bidx = np.repeat(np.arange(counts.size), counts.ravel())
    px = BX.ravel()[bidx] + rng.uniform(-block / 2, block / 2, n)
    py = BY.ravel()[bidx] + rng.uniform(-block / 2, block / 2, n)
    pu, pv = g.uv(px, py)
    in_smear = (pu >= 0) & (pu <= g.length) & (np.abs(pv) <= g.half_width_at(pu))
    px, py, pu, pv = px[in_smear], py[in_smear], pu[in_smear], pv[in_smear]
    bidx = bidx[in_smear]
    zone = zone_codes(g, px, py)
    part_in, trail_f = particle_boost(g, pu, pv)

    # nucleated share of objects: richer in particles and their trails
    f_nuc = np.clip(0.33 * cellularity * trail_f, 0.01, 0.75)
    f_nuc = np.where(part_in, 0.75, f_nuc)
    u01 = rng.uniform(size=len(px))
    is_nuc = u01 < f_nuc
    is_plt = (~is_nuc) & (u01 > 0.97)
    return Candidates(px, py, zone, bidx, is_nuc, is_plt)


def draw_nucleated(rng: np.random.Generator, params: SceneParams, nuc_zone: np.ndarray) -> Nucleated:
    """Nucleated cell types from the composition (more smudge cells on the feathered edge), APL
    variants and diameters, for nucleated candidates lying in zones ``nuc_zone``."""
    types = list(params.composition)
    probs = np.array([params.composition[t] for t in types], np.float64)
    probs /= probs.sum()
    n_nuc = len(nuc_zone)
    type_idx = rng.choice(len(types), size=n_nuc, p=probs)
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
    return Nucleated(cell_types, variants, diam)


def settle(rng: np.random.Generator, cand: Candidates, diameter: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Which candidates stay: overlaps resolved outside the thick zone and particles (cells lie
    apart in a monolayer), then the oversampled draw thinned back to each block's coverage ``cov``."""
    block = NOISE_STEP
    radius = np.full(len(cand.x), RBC_RADIUS)
    radius[cand.is_nuc] = diameter / 2
    radius[cand.is_plt] = PLATELET_RADIUS
    allow_overlap = (cand.zone == ZONE_CODE["thick"]) | (cand.zone == ZONE_CODE["particle"])
    keep = resolve_overlaps(cand.x, cand.y, radius, allow_overlap, rng)
    # thin the oversampled draw back to each block's target coverage (after the overlap resolution,
    # which brought dense zones near the packing limit and left sparse ones oversampled)
    disc = math.pi * radius ** 2
    achieved = np.bincount(cand.block[keep], weights=disc[keep], minlength=cov.size) / (block * block)
    target = cov.ravel()
    ratio = np.where(achieved > 0, target / np.maximum(achieved, 1e-9), 1.0)
    keep &= rng.uniform(size=len(cand.x)) < np.minimum(1.0, ratio[cand.block])
    return keep


def make_cells(rng: np.random.Generator, seed: int, params: SceneParams, cand: Candidates, nuc: Nucleated,
               keep: np.ndarray) -> list[Cell]:
    """The kept nucleated candidates as :class:`Cell` objects: shape, orientation, stain density,
    maturity and Auer rods drawn for every nucleated candidate, kept or not."""
    n_nuc = len(nuc.types)
    cells: list[Cell] = []
    cell_seed = np.random.default_rng([seed, 2]).integers(0, 2 ** 62, size=n_nuc)
    auer_draw = rng.uniform(size=n_nuc)
    faggot_draw = rng.uniform(size=n_nuc)
    n_rods_draw = rng.integers(1, 4, size=n_nuc)
    aspects = rng.uniform(size=n_nuc)
    angles = rng.uniform(0, 2 * math.pi, n_nuc)
    dens = np.exp(rng.normal(0, 0.08, n_nuc))
    maturity = rng.uniform(size=n_nuc)
    for k, pos in enumerate(np.flatnonzero(cand.is_nuc)):
        if not keep[pos]:
            continue
        t = nuc.types[k]
        spec = spec_for(t, nuc.variants[k])
        auer = 0
        faggot = False
        if auer_draw[k] < params.auer_share.get(t, 0.0):
            faggot = faggot_draw[k] < params.faggot_share
            auer = int(rng.integers(6, 15)) if faggot else int(n_rods_draw[k])
        cells.append(Cell(
            id=len(cells), type=t, x=float(cand.x[pos]), y=float(cand.y[pos]), diameter=float(nuc.diameter[k]),
            aspect=float(spec.aspect[0] + aspects[k] * (spec.aspect[1] - spec.aspect[0])),
            angle=float(angles[k]), seed=int(cell_seed[k]), variant=nuc.variants[k], auer=auer, faggot=faggot,
            zone=ZONES[int(cand.zone[pos])], density=float(dens[k]), maturity=float(maturity[k])))
    return cells


def place_red_cells_and_platelets(rng: np.random.Generator, cand: Candidates, keep: np.ndarray
                                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(rbc_xy, rbc_sprite, plt_xy, plt_sprite)`` of the kept red cells (with rouleaux added in the
    thick zone) and platelets."""
    rbc_sel = keep & ~cand.is_nuc & ~cand.is_plt
    plt_sel = keep & cand.is_plt
    rbc_xy = np.stack([cand.x[rbc_sel], cand.y[rbc_sel]], axis=1)
    plt_xy = np.stack([cand.x[plt_sel], cand.y[plt_sel]], axis=1)
    # red-cell rouleaux in the thick zone: short stacks of coins
    thick_idx = np.flatnonzero(cand.zone[rbc_sel] == ZONE_CODE["thick"])
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
    return rbc_xy, rbc_sprite, plt_xy, plt_sprite


def _clashing_pairs(x, y, r, allow_overlap, tile: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Index pairs ``(i < j)`` of objects overlapping where overlap is not allowed, searched tile by
    tile (each tile with a halo of two maximum radii) so that memory stays bounded."""
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
    return found_i, found_j


def resolve_overlaps(x, y, r, allow_overlap, rng, tile: float = 500.0) -> np.ndarray:
    """Drop objects overlapping an earlier one, except where overlap is allowed (thick zone).

    Clashing pairs are searched tile by tile (each tile with a halo of two maximum radii), so memory
    stays bounded on whole slides with millions of objects; the greedy resolution is then global.
    """
    keep = np.ones(len(x), bool)
    if len(x) < 2:
        return keep
    found_i, found_j = _clashing_pairs(x, y, r, allow_overlap, tile)
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
