"""What the full-resolution reads showed, kept on the search map's grid, to place further reads.

The overview sees the smear at about 4 µm per pixel: it tells where the monolayer lies roughly, not
where an area of it clears a thick zone by one cell. On a small smear or a narrow band the windows
that pass may be a few tens of µm across; reads placed from the overview alone land on either side
and are rejected, one block too thick or too thin. Each read, though, shows which of its pixels
carry cells. Kept on the map's grid (the share of covered pixels per map cell), these pixels give
the coverage of any shifted area that lies mostly on read ground, block by block as the screen
judges it (:func:`tile_selector.quality.area_measures`): a rejected area can be moved off the block
that failed it, and the move is read only when the evidence says it would pass.

The evidence predicts coverage only. Focus is handled by closing the positions near every soft
block read (the judge rejects those whatever their coverage); the screen still judges every
refined area on its own pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quality import COVERAGE_BLOCK_UM
from .search import _box_sums, _sat

#: Least share of a refined area that reads must have covered: a move, not a new guess.
MIN_KNOWN = 0.5
#: OD bins of the fit that predicts the coverage of the cells not read (:meth:`ReadEvidence.filled`).
FIT_BINS = 24
#: How far inside the judge's coverage limits a refined area's predicted coverage must lie: the map
#: grid quantises the evidence, and another block grid sees a block's cells slightly differently.
MARGIN = 0.03


@dataclass(frozen=True)
class Limits:
    """The judge's coverage limits: whole area and each ~64-µm block."""

    min_coverage: float
    max_coverage: float
    min_block: float
    max_block: float


class ReadEvidence:
    """Covered-pixel shares of every read, on the grid of the map whose smoothed optical density is
    ``od`` (it also predicts the cells no read covered).

    ``sx, sy``: map cells per level-0 pixel; ``bh, bw``: an area's size in map cells (its position
    (j, i) covers rows j..j+bh, columns i..i+bw); ``area_px``: the area's size in screen pixels
    (width, height) at ``screen_mpp`` µm/px, which sets the judge's block grid.
    """

    def __init__(self, od: np.ndarray, sx: float, sy: float, bh: int, bw: int,
                 area_px: tuple[int, int], screen_mpp: float):
        self.sx, self.sy, self.bh, self.bw = sx, sy, bh, bw
        self.od = od  # the overview's smoothed optical density on the map grid
        self.cover = np.zeros(od.shape, np.float32)  # covered share of the cell's pixels (where known)
        self.known = np.zeros(od.shape, bool)
        self.version = 0  # reads painted so far; the filled map below belongs to one version
        self._filled: tuple[int, np.ndarray] | None = None
        gx = max(1, int(round(area_px[0] * screen_mpp / COVERAGE_BLOCK_UM)))
        gy = max(1, int(round(area_px[1] * screen_mpp / COVERAGE_BLOCK_UM)))
        # the judge's blocks in map cells, relative to an area's top-left cell (as quality.block_means)
        self.xs = [k * bw // gx for k in range(gx + 1)]
        self.ys = [k * bh // gy for k in range(gy + 1)]

    @property
    def empty(self) -> bool:
        return not self.known.any()

    def add(self, box, fg: np.ndarray) -> None:
        """Paint the covered-pixel mask ``fg`` of a read of level-0 ``box`` into the cells it covers
        entirely (cells cut by its edge stay as they were)."""
        x0, y0, x1, y1 = box
        h, w = fg.shape
        c0, c1 = int(np.ceil(x0 * self.sx - 1e-6)), int(np.floor(x1 * self.sx + 1e-6))
        r0, r1 = int(np.ceil(y0 * self.sy - 1e-6)), int(np.floor(y1 * self.sy + 1e-6))
        c0, r0 = max(c0, 0), max(r0, 0)
        c1, r1 = min(c1, self.cover.shape[1]), min(r1, self.cover.shape[0])
        if c1 <= c0 or r1 <= r0:
            return
        # the screen pixels under each cell: boundaries of the cells, in screen pixels
        bx = np.round((np.arange(c0, c1 + 1) / self.sx - x0) * w / (x1 - x0)).astype(int).clip(0, w)
        by = np.round((np.arange(r0, r1 + 1) / self.sy - y0) * h / (y1 - y0)).astype(int).clip(0, h)
        keep_x, keep_y = np.diff(bx) > 0, np.diff(by) > 0
        sums = np.add.reduceat(np.add.reduceat(fg.astype(np.float32), by[:-1][keep_y], axis=0),
                               bx[:-1][keep_x], axis=1)
        counts = np.outer(np.diff(by)[keep_y], np.diff(bx)[keep_x]).astype(np.float32)
        rows = np.arange(r0, r1)[keep_y]
        cols = np.arange(c0, c1)[keep_x]
        self.cover[np.ix_(rows, cols)] = sums / counts
        self.known[np.ix_(rows, cols)] = True
        self.version += 1

    def filled(self) -> np.ndarray:
        """The covered share of every cell: read where known, elsewhere predicted from the overview's
        optical density by this slide's own reads (mean coverage per OD bin of the known cells, made
        non-decreasing: coverage grows with OD until cells pile up)."""
        if self._filled is not None and self._filled[0] == self.version:
            return self._filled[1]
        od, cover = self.od[self.known], self.cover[self.known]
        edges = np.unique(np.quantile(od, np.linspace(0.0, 1.0, FIT_BINS + 1)))
        if len(edges) < 3:
            guess = np.full(self.od.shape, float(cover.mean()), np.float32)
        else:
            which = np.clip(np.searchsorted(edges, od, side="right") - 1, 0, len(edges) - 2)
            counts = np.bincount(which, minlength=len(edges) - 1)
            sums = np.bincount(which, cover, minlength=len(edges) - 1)
            has = counts > 0
            centres = np.bincount(which, od, minlength=len(edges) - 1)[has] / counts[has]
            means = np.maximum.accumulate(sums[has] / counts[has])
            guess = np.interp(self.od, centres, means).astype(np.float32)
        out = np.where(self.known, self.cover, guess).astype(np.float32)
        self._filled = (self.version, out)
        return out

    def predict(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """For every (j, i) row of ``positions``: the share of the area that reads covered, its
        coverage and the lowest and highest coverage of its blocks (the judge's grid), from
        :meth:`filled`."""
        return self._predict(positions, _sat(self.known), _sat(self.filled()))

    def _predict(self, positions: np.ndarray, sk: np.ndarray, sf: np.ndarray) -> dict[str, np.ndarray]:
        j, i = positions[:, 0], positions[:, 1]
        known = _sums(sk, j, i, 0, self.bh, 0, self.bw)
        covered = _sums(sf, j, i, 0, self.bh, 0, self.bw)
        lo = np.full(len(j), np.inf)
        hi = np.full(len(j), -np.inf)
        for a in range(len(self.ys) - 1):
            for b in range(len(self.xs) - 1):
                cells = (self.ys[a + 1] - self.ys[a]) * (self.xs[b + 1] - self.xs[b])
                mean = _sums(sf, j, i, self.ys[a], self.ys[a + 1], self.xs[b], self.xs[b + 1]) / cells
                lo, hi = np.minimum(lo, mean), np.maximum(hi, mean)
        cells = float(self.bh * self.bw)
        return {"known": known / cells, "coverage": covered / cells, "block_min": lo, "block_max": hi}

    def candidates(self, closed: np.ndarray, limits: Limits, room: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Positions not ``closed``, at least :data:`MIN_KNOWN` read, that would pass the judge's
        coverage limits with ``room`` plus a :data:`MARGIN` to spare, and their ranks: the known
        share, times how far inside the limits they lie."""
        if self.empty:
            return np.zeros((0, 2), int), np.zeros(0)
        sk = _sat(self.known)  # the same table serves the known share of every position and the moves
        known_share = _box_sums(sk, self.bh, self.bw) / float(self.bh * self.bw)
        pos = np.argwhere((known_share >= MIN_KNOWN) & ~closed)
        if not len(pos):
            return pos, np.zeros(0)
        p = self._predict(pos, sk, _sat(self.filled()))
        cov, lo, hi = p["coverage"], p["block_min"], p["block_max"]
        spare = np.minimum.reduce([cov - limits.min_coverage, limits.max_coverage - cov,
                                   lo - limits.min_block, limits.max_block - hi])
        ok = spare >= MARGIN + room
        rank = p["known"][ok] * (0.5 + 0.5 * np.minimum(1.0, spare[ok] / 0.1))
        return pos[ok], rank


def _sums(s: np.ndarray, j: np.ndarray, i: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Sums of the rows r0..r1, columns c0..c1 (relative) of the boxes at (j, i), from table ``s``."""
    return s[j + r1, i + c1] - s[j + r0, i + c1] - s[j + r1, i + c0] + s[j + r0, i + c0]
