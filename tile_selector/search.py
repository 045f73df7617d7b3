"""Dense candidate search on the smear map: every position of an area, scored with integral images.

A coarse lattice of half-overlapping areas needs room around the monolayer; a narrow or tilted band
of monolayer near the feathered edge falls between its positions. Here every position on the map's
own grid (about 4 µm, coarser only for very large overviews) is a candidate: box means of the
smear outline, the smoothed optical density and the nucleus signal come from summed-area tables,
so the cost grows with the overview's pixels, not with a per-candidate loop.

*Smear outline.* The gaps between cells of a monolayer are glass, so "on glass / at the border" is
judged from the smear's outline (the OD mask closed over inter-cell gaps, holes filled, eroded by the
border margin), never from the glass share of the pixels inside a candidate.

*Monolayer level.* Which optical density means "cells lie apart" is learned per slide: the first
guess is the smear's median OD, then :meth:`CandidateMap.calibrate` fits the full-resolution
coverage of the areas already read against their overview OD (coverage grows linearly with the OD
while cells do not pile up) and aims at the middle of the accepted coverage range. A smear whose
monolayer is a narrow band, far from the median OD, is found this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # the evidence module builds on this one
    from .evidence import Limits, ReadEvidence

#: Above this many overview pixels the maps are averaged into coarser cells (cost and memory bound).
MAX_MAP_PIXELS = 4_000_000
#: Inter-cell gaps the outline closes over (µm): wider than the glass between monolayer cells.
OUTLINE_CLOSING_UM = 24.0
#: Box share of pixels whose OD is this far from the monolayer level counts as non-uniform.
UNIFORM_LOW, UNIFORM_HIGH = 0.5, 2.0
#: OD ratios to the monolayer level that score alike (the level maps to the middle of the coverage range).
FLAT_TOP = (0.8, 1.15)
#: When the search widens (:meth:`CandidateMap.widen`): the share of an area that must lie inside the
#: smear's outline (the truth's own "usable" allows a tenth outside the monolayer).
WIDE_INSIDE = 0.9


def _sat(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a leading zero row and column (float64: exact for 0/1 masks)."""
    return np.pad(a.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)


def _box_sums(s: np.ndarray, bh: int, bw: int) -> np.ndarray:
    """Sum over every bh x bw box from the summed-area table ``s`` (:func:`_sat`); entry (j, i) is
    the box whose top-left pixel is (j, i)."""
    return s[bh:, bw:] - s[:-bh, bw:] - s[bh:, :-bw] + s[:-bh, :-bw]


def _box_means(a: np.ndarray, bh: int, bw: int) -> np.ndarray:
    """Mean of ``a`` over every bh x bw box; entry (j, i) is the box whose top-left pixel is (j, i)."""
    return (_box_sums(_sat(a), bh, bw) / float(bh * bw)).astype(np.float32)


def _block_reduce(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def smear_outline(smear: np.ndarray, ov_mpp: float, min_area_px: float) -> np.ndarray:
    """The smear's outline as a filled mask: inter-cell glass closed, holes filled, specks dropped."""
    # separable square filters: O(pixels) whatever the radius (an overview may hold 30 Mpx)
    size = 2 * max(1, int(round(OUTLINE_CLOSING_UM / 2.0 / ov_mpp))) + 1
    m = smear.astype(np.uint8)
    closed = ndimage.minimum_filter(ndimage.maximum_filter(m, size, mode="constant"), size, mode="nearest")
    filled = ndimage.binary_fill_holes(closed.astype(bool) | smear)
    lab, n = ndimage.label(filled)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        filled = np.isin(lab, np.flatnonzero(sizes >= min_area_px))
    return filled


#: Directions (degrees) along which :func:`pack` sweeps: a band of monolayer runs along one of them
#: closely enough for areas to be laid end to end.
PACK_DIRECTIONS = (0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0)


def pack(boxes, prefer=None) -> list[int]:
    """Indices of a large set of mutually non-overlapping ``boxes`` (equal-sized, level-0).

    Greedy choice by where a box lies, not by its score: boxes are swept along each of
    :data:`PACK_DIRECTIONS` and each one is kept unless it overlaps one kept before (for intervals of
    one length this is the largest set; a band of monolayer is nearly one-dimensional). The sweep that
    keeps most boxes wins; ties go to the one keeping more ``prefer`` (e.g. areas already read and
    accepted), then to the first direction. Choosing the best area first instead may put it in the
    middle of a band with room for three, leaving less than an area on either side.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(b):
        return []
    pref = np.zeros(len(b)) if prefer is None else np.asarray(prefer, np.float64)
    cx, cy = (b[:, 0] + b[:, 2]) / 2.0, (b[:, 1] + b[:, 3]) / 2.0
    best: tuple[tuple[int, float], list[int]] = ((-1, -1.0), [])
    for deg in PACK_DIRECTIONS:
        t = cx * math.cos(math.radians(deg)) + cy * math.sin(math.radians(deg))
        order = np.lexsort((-pref, np.round(t, 6)))  # along the sweep; a preferred box first on a tie
        free = np.ones(len(b), bool)
        kept: list[int] = []
        while True:  # one vectorised pass per box kept (a few), not a Python loop over every box
            ahead = free[order]
            r = int(np.argmax(ahead))
            if not ahead[r]:
                break
            k = int(order[r])
            kept.append(k)
            free &= ~((b[:, 0] < b[k, 2]) & (b[k, 0] < b[:, 2]) & (b[:, 1] < b[k, 3]) & (b[k, 1] < b[:, 3]))
        key = (len(kept), float(pref[kept].sum()))
        if key > best[0]:
            best = (key, kept)
    return best[1]


@dataclass
class Pick:
    """One candidate taken from the map: its level-0 box and its overview figures."""

    score: float
    box: tuple[float, float, float, float]
    low: dict


class CandidateMap:
    """Every area position on the smear map, with the overview figures of its box.

    ``sx, sy``: overview pixels per level-0 pixel; ``aw0, ah0``: the area in level-0 pixels.
    """

    def __init__(self, sm: dict, ov_mpp: float, sx: float, sy: float, aw0: float, ah0: float, border_um: float):
        h, w = sm["smooth"].shape
        self.f = max(1, int(math.ceil(math.sqrt(h * w / MAX_MAP_PIXELS))))
        self.map_mpp = ov_mpp * self.f
        self.sx, self.sy, self.aw0, self.ah0 = sx / self.f, sy / self.f, aw0, ah0
        self.bw = max(1, int(math.ceil(aw0 * self.sx - 1e-6)))
        self.bh = max(1, int(math.ceil(ah0 * self.sy - 1e-6)))
        outline = smear_outline(sm["smear"], ov_mpp, 0.5 * (aw0 * sx) * (ah0 * sy))
        self.outline = outline
        erode = 2 * max(1, int(round(border_um / ov_mpp))) + 1
        inner = ndimage.minimum_filter(outline.astype(np.uint8), erode, mode="constant").astype(bool)
        # maps on the (possibly coarser) grid; inner must hold in every overview pixel of a cell
        self.smooth = _block_reduce(sm["smooth"].astype(np.float32), self.f)
        self.inner = _block_reduce(inner.astype(np.float32), self.f) >= 1.0
        self.smear = _block_reduce(sm["smear"].astype(np.float32), self.f)
        self._outline = _block_reduce(outline.astype(np.float32), self.f) >= 1.0
        H, W = self.smooth.shape
        if H < self.bh or W < self.bw:  # the whole slide is smaller than one area
            self.shape = (0, 0)
            return
        self.in_smear = _box_means(self.smear, self.bh, self.bw)
        self.inside = _box_means(self.inner.astype(np.float32), self.bh, self.bw) >= 0.9999
        self.od = _box_means(self.smooth, self.bh, self.bw)
        self.nuc = _box_means(_block_reduce(sm["od"][..., 0].astype(np.float32), self.f), self.bh, self.bw)
        self.part = _box_means(_block_reduce(sm["particles"].astype(np.float32), self.f), self.bh, self.bw)
        self.shape = self.od.shape
        self.level = float(sm["level"])
        self.off_share = self._off_share(self.level)
        self.allowed = self.inside & (self.part < 0.5)  # where an area may lie (grows once: widen)
        self.closed = np.zeros(self.shape, bool)  # closed by what was read
        self.widened = 0

    # -- geometry --------------------------------------------------------------------------------
    @property
    def open(self) -> np.ndarray:
        """Positions still to be taken: allowed and not closed by what was read."""
        return self.allowed & ~self.closed

    @property
    def positions(self) -> int:
        return int(self.shape[0] * self.shape[1])

    def box_of(self, j: int, i: int) -> tuple[float, float, float, float]:
        x0, y0 = i / self.sx, j / self.sy
        return (x0, y0, x0 + self.aw0, y0 + self.ah0)

    def index_of(self, box) -> tuple[int, int]:
        return int(round(box[1] * self.sy)), int(round(box[0] * self.sx))

    def suppress(self, box, share: float = 0.0, mask: np.ndarray | None = None) -> None:
        """Close the positions whose box overlaps ``box`` (0: at all; 0.5: centre within half a box),
        in ``mask`` (default: the map's own closure)."""
        if not self.positions:
            return
        if share <= 0:
            near = self._overlapping(*self.index_of(box))
        else:
            j, i = self.index_of(box)
            rx, ry = max(1, int(round(self.bw * share))), max(1, int(round(self.bh * share)))
            near = (slice(max(0, j - ry + 1), max(0, j + ry)), slice(max(0, i - rx + 1), max(0, i + rx)))
        (self.closed if mask is None else mask)[near] = True

    def suppress_blocks(self, blocks: np.ndarray, margin: float = 0.0, mask: np.ndarray | None = None) -> None:
        """Close every position whose box comes within ``margin`` level-0 px of one of ``blocks``
        (level-0 boxes, e.g. blurred), in ``mask`` (default: the map's own closure)."""
        mask = self.closed if mask is None else mask
        grown = np.asarray(blocks, np.float64).reshape(-1, 4) + np.array([-margin, -margin, margin, margin])
        for x0, y0, x1, y1 in grown:
            i0 = max(0, int(math.floor(x0 * self.sx)) - self.bw + 1)
            i1 = max(0, int(math.ceil(x1 * self.sx)))
            j0 = max(0, int(math.floor(y0 * self.sy)) - self.bh + 1)
            j1 = max(0, int(math.ceil(y1 * self.sy)))
            mask[j0:j1, i0:i1] = True

    def reclose(self, reads: list, blocks: np.ndarray, margin: float) -> None:
        """Close the map again from scratch around what was read: fully around the ``reads`` that are
        accepted now, within a quarter area of the centre of the others, and within ``margin`` level-0 px
        of ``blocks`` (blurred). ``reads``: (level-0 box, accepted) pairs.

        Rebuilt, not added to, because a verdict may change after a later round (the slide's focus
        reference rises, a blurred block is found next to an area): the full closure around an area
        that is no longer accepted would otherwise keep its neighbours closed for good.
        """
        if not self.positions:
            return
        self._closure([(box, 0.0 if accepted else 0.25) for box, accepted in reads], blocks, margin, self.closed)

    def _closure(self, reads: list, blocks: np.ndarray, margin: float, mask: np.ndarray | None = None) -> np.ndarray:
        """``mask`` (default: a new one) set to the positions closed around ``reads`` ((level-0 box,
        share) pairs, as :meth:`suppress`) and within ``margin`` level-0 px of ``blocks``."""
        mask = np.zeros(self.shape, bool) if mask is None else mask
        mask[:] = False
        for box, share in reads:
            self.suppress(box, share, mask)
        self.suppress_blocks(blocks, margin, mask)
        return mask

    def widen(self) -> int:
        """Open the positions between the border margin and the smear's edge (at least
        :data:`WIDE_INSIDE` of the area inside the outline itself), except where a read already
        closed the map; returns how many were opened.

        For when the positions inside the margin are used up: on a small smear or a narrow band
        they may be few, while the full-resolution screen still judges every area it reads (a thin
        or glassy block rejects it), so an area near the edge is accepted only on its own pixels.
        """
        if not self.positions or self.widened:
            return 0
        loose = _box_means(self._outline.astype(np.float32), self.bh, self.bw) >= WIDE_INSIDE
        new = loose & ~self.allowed & (self.part < 0.5)
        self.allowed |= new  # closed ones among them open if the closure around a read is lifted (reclose)
        self.widened = int((new & ~self.closed).sum())
        return self.widened

    # -- the monolayer level -----------------------------------------------------------------
    def _off_share(self, level: float) -> np.ndarray:
        off = (self.smooth < UNIFORM_LOW * level) | (self.smooth > UNIFORM_HIGH * level)
        return _box_means(off.astype(np.float32), self.bh, self.bw)

    def set_level(self, level: float) -> None:
        if level > 0 and abs(math.log(level / max(self.level, 1e-9))) > 0.02:
            self.level = float(level)
            self.off_share = self._off_share(self.level)

    def calibrate(self, screened: list, target_coverage: float, first_level: float, focus_floor: float) -> bool:
        """Fit full-resolution coverage against overview OD on the areas read so far; move the level.

        Only sharp, uniform areas whose coverage lies in the linear range (cells not piled up, not
        bare glass) count: blur spreads the stain and makes an area look more covered than it is.
        The level stays within a factor 4 of the first guess. Returns whether it changed.
        """
        pairs = [(m["lowres_od"], m["coverage"]) for _, m in screened
                 if m.get("lowres_od", 0) > 0 and 0.12 <= m["coverage"] <= 0.6 and m.get("lowres_off_share", 1) < 0.3
                 and m["focus_worst_block"] >= focus_floor]
        if len(pairs) < 3:
            return False
        k = float(np.median([c / od for od, c in pairs]))
        level = min(4.0 * first_level, max(first_level / 4.0, target_coverage / max(k, 1e-9)))
        before = self.level
        self.set_level(level)
        return self.level != before

    # -- scores and picks ------------------------------------------------------------------------
    def scores(self) -> np.ndarray:
        r = self.od / max(self.level, 1e-9)
        # flat top: every OD the calibration maps into the middle of the accepted coverage range is
        # as good as the level itself; outside, the score falls off on a log scale
        lo, hi = FLAT_TOP
        lr = np.log(np.clip(r, 1e-3, None))
        dist = np.where(lr < math.log(lo), lr - math.log(lo), np.where(lr > math.log(hi), lr - math.log(hi), 0.0))
        closeness = np.exp(-dist ** 2 / (2 * 0.25 ** 2))
        uniform = np.clip(1.0 - self.off_share, 0.0, 1.0) ** 2
        richness = self.nuc / np.maximum(self.od, 1e-6) + 0.1
        s = closeness * uniform * richness * (1.0 - self.part)
        return np.where(self.open & (r > 0.25) & (r < 4.0), s, -1.0).astype(np.float32)

    def take(self, k: int, exclude=()) -> list[Pick]:
        """The ``k`` best open positions, greedily, none overlapping another or a box of ``exclude``.

        The map stays as it is: the caller closes it around what it read (:meth:`reclose`)."""
        if not self.positions or k <= 0:
            return []
        s = self.scores()
        for box in exclude:
            s[self._overlapping(*self.index_of(box))] = -1.0
        picks: list[Pick] = []
        while len(picks) < k:
            flat = int(np.argmax(s))
            j, i = divmod(flat, s.shape[1])
            if s[j, i] <= 0:
                break
            picks.append(self._pick(j, i, float(s[j, i])))
            s[self._overlapping(j, i)] = -1.0
        return picks

    def refined(self, evidence: ReadEvidence, k: int, limits: Limits, reads: list, blocks: np.ndarray,
                margin: float, room: float = 0.0) -> list[Pick]:
        """Up to ``k`` positions, none overlapping another, where the reads' own pixels say an area
        would pass the judge's coverage limits with ``room`` to spare in every block
        (:mod:`tile_selector.evidence`): a rejected area moved off the block that failed it, or an
        accepted one at the edge of the block range moved inward. Best evidence first.

        ``reads``: (level-0 box, state) pairs, state ``"rejected"``, ``"accepted"`` or ``"edge"``
        (accepted, with a block within the room of a limit). Not the overview's closure: a move may
        lie within a quarter area of a rejected or edge read (that is the point), but not within an
        eighth (read already, in effect), nor overlap an accepted area, nor come within ``margin``
        level-0 px of ``blocks`` (every soft block read).
        """
        if not self.positions or k <= 0 or evidence.empty:
            return []
        closed = self._closure([(box, 0.0 if state == "accepted" else 0.125) for box, state in reads], blocks, margin)
        pos, rank = evidence.candidates(closed, limits, room)
        picks: list[Pick] = []
        for n in np.argsort(-rank, kind="stable"):
            j, i = int(pos[n, 0]), int(pos[n, 1])
            if closed[j, i]:
                continue
            p = self._pick(j, i, float(rank[n]))
            p.low["refined"] = True
            picks.append(p)
            if len(picks) >= k:
                break
            closed[self._overlapping(j, i)] = True
        return picks

    def packed(self, evidence: ReadEvidence, limits: Limits, accepted: list, rejected: list, blocks: np.ndarray,
               margin: float, room: float = 0.0) -> tuple[int, list[Pick]]:
        """Areas laid side by side on the ground already read: the ``accepted`` boxes and the positions
        where the reads' pixels say an area would pass (as :meth:`refined`: ``room`` inside the block
        range, not within an eighth area of a ``rejected`` box, clear of ``blocks`` by ``margin``
        level-0 px), as many mutually non-overlapping as :func:`pack` finds, accepted boxes first on a
        tie. Returns how many the packing holds and its positions that are not accepted boxes (to be
        read). A position may overlap an accepted box: the packing may move areas, not only add them.
        """
        if not self.positions or evidence.empty:
            return len(pack(accepted)), []
        closed = self._closure([(box, 0.125) for box in rejected], blocks, margin)
        pos, rank = evidence.candidates(closed, limits, room)
        boxes = [tuple(b) for b in accepted] + [self.box_of(int(j), int(i)) for j, i in pos]
        kept = pack(boxes, [1.0] * len(accepted) + [0.0] * len(pos))
        picks = []
        for k in sorted(kept):
            if k >= len(accepted):
                j, i = (int(v) for v in pos[k - len(accepted)])
                p = self._pick(j, i, float(rank[k - len(accepted)]))
                p.low["packed"] = True
                picks.append(p)
        return len(kept), picks

    def probes(self, exclude=(), quantiles=(0.15, 0.4, 0.65, 0.9)) -> list[Pick]:
        """Uniform open positions spread over the smear's OD range, to learn its monolayer level.

        None overlaps another or a box of ``exclude``."""
        if not self.positions:
            return []
        ok = self.open & (self.off_share < 0.5)
        for box in exclude:
            self._close(ok, box)
        if not ok.any():
            return []
        ods = self.od[ok]
        targets = [float(np.quantile(ods, q)) for q in quantiles]
        picks = []
        for q, target in zip(quantiles, targets):
            cost = np.abs(np.log(np.maximum(self.od, 1e-6) / max(target, 1e-6))) + self.off_share
            cost = np.where(ok, cost, np.inf)
            flat = int(np.argmin(cost))
            j, i = divmod(flat, cost.shape[1])
            if not np.isfinite(cost[j, i]):
                break
            p = self._pick(j, i, 0.0)
            p.low["probe"] = round(q, 2)
            picks.append(p)
            self._close(ok, p.box)
        return picks

    def _overlapping(self, j: int, i: int) -> tuple[slice, slice]:
        """The positions whose box overlaps the box at position (j, i)."""
        return (slice(max(0, j - self.bh + 1), max(0, j + self.bh)),
                slice(max(0, i - self.bw + 1), max(0, i + self.bw)))

    def _close(self, mask: np.ndarray, box) -> None:
        mask[self._overlapping(*self.index_of(box))] = False

    def _pick(self, j: int, i: int, score: float) -> Pick:
        r = float(self.od[j, i]) / max(self.level, 1e-9)
        return Pick(score, self.box_of(j, i), {
            "lowres_od": round(float(self.od[j, i]), 5), "lowres_od_ratio": round(r, 4),
            "lowres_off_share": round(float(self.off_share[j, i]), 4),
            "lowres_particle": round(float(self.part[j, i]), 4)})

    # -- reasons on the coarse lattice -------------------------------------------------------------
    def lattice_reasons(self) -> list[str]:
        """Why positions of a half-overlapping lattice over the smear fail on the overview alone.

        One reason per failing lattice position ("border": at the smear border or on glass;
        "thick" or "thin": far from the current level); passing positions are represented by the
        dense picks. Counted in area-sized places, which a reader can picture, not in map pixels.
        """
        reasons: list[str] = []
        if not self.positions:
            return reasons
        sj, si = max(1, self.bh // 2), max(1, self.bw // 2)
        for j in range(0, self.shape[0], sj):
            for i in range(0, self.shape[1], si):
                if self.in_smear[j, i] <= 0.0:
                    continue
                r = float(self.od[j, i]) / max(self.level, 1e-9)
                if not self.inside[j, i]:
                    reasons.append("border")
                elif r > UNIFORM_HIGH:
                    reasons.append("thick")
                elif r < UNIFORM_LOW:
                    reasons.append("thin")
        return reasons
