"""The dense candidate search on a smear map: outline, integral-image boxes, greedy picks, the level."""

from __future__ import annotations

import math

import numpy as np

from tile_selector.search import CandidateMap, smear_outline


def _map(smooth: np.ndarray, smear: np.ndarray, level: float) -> dict:
    od = np.repeat(smooth[..., None] / 3.0, 3, axis=2)
    return {"smooth": smooth, "smear": smear, "od": od, "particles": np.zeros_like(smear), "level": level}


def _band_map(angle_deg: float = 35.0, width_px: int = 30):
    """A 300x240-px overview: a round smear; a tilted band of monolayer OD; thick on one side, thin on the other."""
    h, w = 240, 300
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    smear = (xx - 150) ** 2 / 140 ** 2 + (yy - 120) ** 2 / 110 ** 2 <= 1
    t = (xx - 150) * math.cos(math.radians(angle_deg)) + (yy - 120) * math.sin(math.radians(angle_deg))
    smooth = np.where(t < -width_px / 2, 1.2, np.where(t > width_px / 2, 0.08, 0.4)) * smear
    return smooth.astype(np.float32), smear, t


def test_outline_closes_the_glass_between_monolayer_cells():
    rng = np.random.default_rng(0)
    smear = np.zeros((120, 160), bool)
    smear[20:100, 20:140] = rng.random((80, 120)) < 0.55   # a dotted monolayer: glass between cells
    outline = smear_outline(smear, 4.0, 50)
    assert outline[25:95, 25:135].all(), "gaps between cells must not count as glass"
    assert not outline[:10].any() and not outline[:, :10].any(), "real glass around the smear stays glass"


def test_picks_lie_in_a_narrow_tilted_band_and_do_not_overlap():
    smooth, smear, t = _band_map()
    cm = CandidateMap(_map(smooth, smear, level=0.4), 4.0, 1.0, 1.0, 16.0, 12.0, border_um=8.0)
    picks = cm.take(5)
    assert len(picks) >= 2
    boxes = [p.box for p in picks]
    for k, a in enumerate(boxes):
        for b in boxes[k + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), "picks overlap"
    for x0, y0, x1, y1 in boxes:
        inside = smooth[int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))]
        assert (np.abs(inside - 0.4) < 1e-6).mean() > 0.8, "a pick leaves the monolayer band"


def test_calibration_moves_the_level_to_the_band():
    smooth, smear, _ = _band_map()
    cm = CandidateMap(_map(smooth, smear, level=0.12), 4.0, 1.0, 1.0, 16.0, 12.0, border_um=8.0)
    # full-resolution coverage grows with the overview OD (0.45 at the band's 0.4)
    screened = [((0, 0, 1, 1), {"lowres_od": od, "coverage": 0.45 * od / 0.4, "lowres_off_share": 0.0,
                                "focus_worst_block": 0.6}) for od in (0.08, 0.2, 0.3, 0.4)]
    assert cm.calibrate(screened, 0.45, first_level=0.12, focus_floor=0.33)
    assert abs(cm.level - 0.4) < 0.01
    # blurred areas (their stain spreads) and piled-up ones do not count
    cm2 = CandidateMap(_map(smooth, smear, level=0.12), 4.0, 1.0, 1.0, 16.0, 12.0, border_um=8.0)
    blurred = [(b, {**m, "focus_worst_block": 0.1}) for b, m in screened]
    assert not cm2.calibrate(blurred, 0.45, first_level=0.12, focus_floor=0.33)


def test_closing_around_what_was_read():
    smooth, smear, _ = _band_map()
    cm = CandidateMap(_map(smooth, smear, level=0.4), 4.0, 1.0, 1.0, 16.0, 12.0, border_um=8.0)
    first = cm.take(1)[0]
    cm.suppress(first.box, 0.0)
    again = cm.take(50)
    for p in again:
        a, b = p.box, first.box
        assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
    cm.suppress_blocks(np.array([[0, 0, 300, 240]], float))
    assert cm.take(1) == []


def test_blurred_blocks_close_positions_within_the_margin():
    """A block judged sharp may hide blur where it meets a blurred one: positions whose box comes
    within the margin of a blurred block close too, those farther away stay open."""
    smooth = np.full((60, 80), 0.4, np.float32)
    smear = np.ones((60, 80), bool)
    cm = CandidateMap(_map(smooth, smear, level=0.4), 1.0, 1.0, 1.0, 10.0, 8.0, border_um=0.0)
    block = np.array([[40.0, 20.0, 44.0, 24.0]])
    cm.suppress_blocks(block)
    assert cm.open[20, 45] and cm.open[20, 48], "a box that does not touch the block stays open"
    assert not cm.open[20, 40], "a box over the block closes"
    cm.suppress_blocks(block, margin=3.0)
    assert not cm.open[20, 45] and not cm.open[20, 46], "less than 3 px from the block"
    assert cm.open[20, 47], "3 px or farther stays open (as _touches judges it)"
    assert not cm.open[20, 28] and cm.open[20, 26], "the margin holds on the other side too"


def test_widening_opens_positions_near_the_edge_of_a_small_smear_once_and_keeps_what_was_read_closed():
    """A smear hardly larger than one area: no position lies fully inside its outline eroded by the
    border margin, so the strict search has nothing to read; widened, positions at least 90 %
    inside the outline itself open (the full-resolution screen then judges their pixels), except
    where a read already closed the map, and only once."""
    h, w = 80, 100
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    smear = (xx - 50) ** 2 / 30 ** 2 + (yy - 40) ** 2 / 23 ** 2 <= 1
    smooth = (0.4 * smear).astype(np.float32)
    cm = CandidateMap(_map(smooth, smear, level=0.4), 4.0, 1.0, 1.0, 40.0, 30.0, border_um=16.0)
    assert cm.take(3) == [], "no position inside the eroded outline"
    read = cm.box_of(25, 30)  # the centre, read and rejected: closed within a quarter area
    cm.suppress(read, 0.25)
    opened = cm.widen()
    assert opened > 0 and cm.widened == opened
    picks = cm.take(3)
    assert picks
    for p in picks:
        j, i = cm.index_of(p.box)
        assert not cm.closed[j, i], "a position closed by a read reopened"
        x0, y0, x1, y1 = (int(round(v)) for v in p.box)
        assert cm.outline[y0:y1, x0:x1].mean() >= 0.9, "a widened position lies at least 90 % inside the outline"
    assert cm.closed[25, 30] and not cm.open[25, 30]
    assert cm.widen() == 0, "the search widens once"


def test_reclosing_reopens_the_neighbours_of_an_area_no_longer_accepted():
    """A verdict may change in a later round (a blurred block is found next to an area, the slide's
    focus reference rises). The map is closed again from the reads' current verdicts: fully around an
    accepted area, within a quarter area of a rejected one's centre, so an area rejected after being
    accepted no longer keeps the positions that merely overlap it closed."""
    smooth = np.full((60, 80), 0.4, np.float32)
    smear = np.ones((60, 80), bool)
    cm = CandidateMap(_map(smooth, smear, level=0.4), 1.0, 1.0, 1.0, 10.0, 8.0, border_um=0.0)
    read = cm.box_of(20, 30)
    no_blocks = np.zeros((0, 4))
    cm.reclose([(read, True)], no_blocks, 0.0)
    assert not cm.open[20, 36] and not cm.open[14, 30], "positions overlapping an accepted area are closed"
    assert cm.open[20, 40] and cm.open[28, 30], "positions beside it are open"
    cm.reclose([(read, False)], no_blocks, 0.0)
    assert cm.open[20, 36] and cm.open[14, 30] and cm.open[20, 26], \
        "rejected now: only a quarter area around its centre stays closed"
    assert not cm.open[20, 30] and not cm.open[21, 31], "the read itself is not read again"
    cm.reclose([(read, False)], np.array([[30.0, 20.0, 34.0, 24.0]]), 0.0)
    assert not cm.open[20, 26] and cm.open[20, 36], "a blurred block closes what overlaps it"


def test_pack_lays_areas_end_to_end_where_the_best_first_leaves_room_for_one_neighbour():
    """A band 3.2 areas long. An area in the middle (the best one, say) leaves less than an area on
    one side; swept along the band, three fit side by side, and an accepted box is kept on a tie."""
    from tile_selector.search import pack

    w, h = 10.0, 8.0
    starts = np.arange(0.0, 22.0 + 1e-9, 1.0)           # every position of the band, 32 wide
    boxes = [(x, 0.0, x + w, h) for x in starts]
    middle = boxes.index((6.0, 0.0, 16.0, h))
    greedy = [middle]
    for k, b in enumerate(boxes):
        if all(not (b[0] < boxes[g][2] and boxes[g][0] < b[2]) for g in greedy):
            greedy.append(k)
    assert len(greedy) == 2, "the middle one first: room for one more"
    kept = pack(boxes)
    assert len(kept) == 3
    for a in kept:
        for b in kept:
            if a != b:
                assert not (boxes[a][0] < boxes[b][2] and boxes[b][0] < boxes[a][2]), "packed boxes overlap"
    # the band along y instead of x, and tilted: still three
    assert len(pack([(0.0, y, w, y + h) for y in np.arange(0.0, 17.0, 1.0)])) == 3
    assert len(pack([(x, x, x + w, x + h) for x in np.arange(0.0, 17.0, 1.0)])) == 3
    # a preferred (already accepted) box wins a tie of equal counts
    two = [(0.0, 0.0, w, h), (10.0, 0.0, 20.0, h), (0.0, 0.0, w, h)]
    assert sorted(pack(two, prefer=[0, 0, 1])) == [1, 2]
    assert pack([]) == []
