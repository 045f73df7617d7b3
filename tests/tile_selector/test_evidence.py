"""The reads' own pixels on the search map: painted, filled from the overview, and the moves they allow."""

from __future__ import annotations

import numpy as np

from tile_selector.evidence import Limits, ReadEvidence
from tile_selector.quality import block_means
from tile_selector.search import CandidateMap

CELL = 8                 # level-0 px per map cell (sx = sy = 1/8)
AREA = (512, 384)        # level-0 px = screen px at 0.5 µm/px: 4 x 3 blocks of 64 µm
LIMITS = Limits(0.33, 0.65, 0.22, 0.6)


def _field(thin_until_px: int = 160, seed: int = 0) -> np.ndarray:
    """A 1536x2048-px covered-pixel mask: sparse cells (5 %) left of ``thin_until_px``, 40 % beyond."""
    rng = np.random.default_rng(seed)
    p = np.where(np.arange(2048) < thin_until_px, 0.05, 0.40)
    return rng.random((1536, 2048)) < p[None, :]


def _cmap(od: np.ndarray) -> CandidateMap:
    smear = np.ones(od.shape, bool)
    sm = {"smooth": od.astype(np.float32), "smear": smear, "od": np.repeat(od[..., None] / 3.0, 3, axis=2),
          "particles": np.zeros_like(smear), "level": float(np.median(od))}
    return CandidateMap(sm, 4.0, 1.0 / CELL, 1.0 / CELL, AREA[0], AREA[1], border_um=0.0)


def _evidence(cm: CandidateMap) -> ReadEvidence:
    return ReadEvidence(cm.smooth, cm.sx, cm.sy, cm.bh, cm.bw, AREA, 0.5)


def _read(fg: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    return fg[y0:y1, x0:x1]


def test_two_painted_reads_give_the_blocks_of_the_area_between_them_as_the_screen_would_judge_them():
    fg = _field()
    cm = _cmap(np.full((192, 256), 0.4, np.float32))
    ev = _evidence(cm)
    for box in ((0, 0, 512, 384), (512, 0, 1024, 384)):
        ev.add(box, _read(fg, box))
    p = ev.predict(np.array([[0, 32], [0, 4], [6, 20]]))  # areas at x = 256, 32 and 160 px
    for n, (y, x) in enumerate(((0, 256), (0, 32), (48, 160))):
        window = fg[y:y + 384, x:x + 512]
        blocks = block_means(window, 0.5, 64.0)  # what quality.area_measures judges
        assert p["known"][n] == (1.0 if y == 0 else 336 / 384)
        tol = 1e-6 if y == 0 else 0.03  # the unread rows below the reads: filled from the overview
        assert abs(p["coverage"][n] - window.mean()) < tol
        assert abs(p["block_min"][n] - blocks.min()) < tol and abs(p["block_max"][n] - blocks.max()) < tol
    assert p["block_min"][1] < 0.22 < p["block_min"][0], "the sparse strip fails the area at 32 px, not at 256 px"


def test_cells_not_read_are_predicted_from_the_overview_by_the_slides_own_reads():
    """Coverage grows with the overview OD (here: OD = 2 x coverage); the fit learnt on one read
    predicts the coverage of cells no read covered, and never falls as the OD rises."""
    rng = np.random.default_rng(1)
    cover = np.clip(np.linspace(0.05, 0.8, 256)[None, :] + rng.normal(0, 0.01, (192, 256)), 0, 1)
    fg = np.repeat(np.repeat(cover, CELL, 0), CELL, 1) > rng.random((1536, 2048))
    cm = _cmap(2.0 * cover)
    ev = _evidence(cm)
    assert ev.empty
    ev.add((0, 0, 1536, 384), _read(fg, (0, 0, 1536, 384)))  # columns 0..191 read, 192..255 not
    filled = ev.filled()
    assert np.abs(filled[:48, :192] - ev.cover[:48, :192]).max() == 0, "read cells keep what was read"
    unread = filled[100:, 20:180]
    assert np.abs(unread - cover[100:, 20:180]).mean() < 0.04
    order = np.argsort(cm.smooth[100:, :192].ravel())
    assert np.all(np.diff(filled[100:, :192].ravel()[order]) >= -1e-6), "the fit is non-decreasing in OD"
    ev.add((0, 0, 1536, 384), np.ones((384, 1536), bool))  # read again over the same cells, covered now
    assert ev.filled()[:48, :192].min() == 1.0, "a read over cells read before replaces what they showed"


def test_a_rejected_area_is_moved_off_the_block_that_failed_it():
    """A read rejected because its left blocks are sparse (feathered edge): the refinement proposes
    the area moved right, clear of the sparse strip, within the read ground; not a position within
    an eighth of an area of the read, not one overlapping an accepted area, nor one near a soft block."""
    fg = _field(thin_until_px=160)
    od = np.where(np.arange(256) < 20, 0.1, 0.8)[None, :].repeat(192, 0).astype(np.float32)
    cm = _cmap(od)
    ev = _evidence(cm)
    read = (0, 0, 512, 384)
    ev.add(read, _read(fg, read))
    picks = cm.refined(ev, 3, LIMITS, [(read, "rejected")], np.zeros((0, 4)), 0.0)
    assert picks and all(p.low.get("refined") for p in picks)
    for p in picks:
        x0 = p.box[0]
        assert 160 <= x0 <= 256, f"moved to {x0}: off the sparse strip, at least half on read ground"
        assert not (abs(x0 - read[0]) < 64 and abs(p.box[1] - read[1]) < 48), "within an eighth of the read"
        blocks = block_means(fg[int(p.box[1]):int(p.box[3]), int(x0):int(p.box[2])], 0.5, 64.0)
        assert blocks.min() >= 0.22 and 0.33 <= fg[int(p.box[1]):int(p.box[3]), int(x0):int(p.box[2])].mean()
    boxes = [p.box for p in picks]
    assert all(not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]) for k, a in enumerate(boxes)
               for b in boxes[k + 1:]), "refined picks of one round do not overlap"
    # an accepted area overlapping every such move closes them; so does a soft block next to them
    assert not cm.refined(ev, 3, LIMITS, [(read, "rejected"), ((200, 0, 712, 384), "accepted")], np.zeros((0, 4)), 0.0)
    soft = np.array([[300.0, 0.0, 340.0, 1536.0]])
    assert not cm.refined(ev, 3, LIMITS, [(read, "rejected")], soft, 0.0)
    # the sparse strip read as it is: no move passes when the whole read is sparse
    ev2 = _evidence(cm)
    ev2.add(read, np.zeros((384, 512), bool))
    assert not cm.refined(ev2, 3, LIMITS, [(read, "rejected")], np.zeros((0, 4)), 0.0)


def test_an_accepted_area_at_the_edge_of_the_block_range_is_moved_inward_only_where_it_gains_room():
    """An accepted area whose left blocks are barely dense enough (24 % covered against the 22 %
    limit, a fringe): a move overlapping it is proposed when the pixels read say it clears the
    fringe with ``room`` to spare in every block; an accepted area well inside the range keeps its overlap closed."""
    fg = np.where(np.arange(2048)[None, :] < 128, np.random.default_rng(4).random((1536, 2048)) < 0.24,
                  np.random.default_rng(5).random((1536, 2048)) < 0.45)
    cm = _cmap(np.full((192, 256), 0.4, np.float32))
    ev = _evidence(cm)
    read = (0, 0, 512, 384)
    ev.add(read, _read(fg, read))
    assert block_means(_read(fg, read), 0.5, 64.0).min() < 0.27
    none = np.zeros((0, 4))
    moves = cm.refined(ev, 2, LIMITS, [(read, "edge")], none, 0.0, room=0.05)
    assert moves, "a move inward is proposed"
    for p in moves:
        window = fg[int(p.box[1]):int(p.box[3]), int(p.box[0]):int(p.box[2])]
        assert p.box[0] > 0 and block_means(window, 0.5, 64.0).min() >= 0.27, "moved right, clear of the fringe"
    assert not cm.refined(ev, 2, LIMITS, [(read, "accepted")], none, 0.0, room=0.05), \
        "an accepted area inside the range: nothing overlapping it is read"
    assert not cm.refined(ev, 2, LIMITS, [(read, "edge")], none, 0.0, room=0.5), \
        "no move gains that much room"
