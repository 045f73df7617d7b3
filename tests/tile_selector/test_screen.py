"""The full-resolution screen's judge: the margin around blurred blocks, and the narrow margin used
when too few areas pass."""

from __future__ import annotations

from tile_selector.screen import R_BLUR, judge
from tile_selector.select import SelectorConfig


def _read(x0: float, focus: float, blocks: list) -> tuple:
    """A 256x192-µm area read at level-0 1 µm/px, in the monolayer, whose worst block has ``focus``;
    ``blocks``: (x0, x1, sharpness[, coverage]) of its focus blocks (coverage: the area's own, 0.45)."""
    box = (x0, 0.0, x0 + 256.0, 192.0)
    return box, {"outside": 0.0, "coverage": 0.45, "coverage_min_block": 0.35, "coverage_max_block": 0.55,
                 "focus_worst_block": focus, "overlap": 0.05, "cells": 40,
                 "_blocks": [(x0 + a, 0.0, x0 + b, 40.0, v, *(c or (0.45,))) for a, b, v, *c in blocks]}


def _reads() -> list:
    # a blurred area whose soft block ends at x = 240; a sharp area starting 25 µm beyond it; a sharp
    # area far away (sets the slide's focus reference)
    return [_read(0.0, 0.2, [(200.0, 240.0, 0.2)]), _read(265.0, 0.7, [(0.0, 40.0, 0.7)]),
            _read(2000.0, 0.7, [(0.0, 40.0, 0.7)])]


def test_a_sharp_area_within_the_margin_of_a_blurred_block_is_rejected_by_default():
    accepted, rejected, _ = judge(_reads(), SelectorConfig(), 1.0)
    assert [b[0] for b, _ in accepted] == [2000.0]
    assert rejected == {R_BLUR: 2}


def test_a_narrow_margin_accepts_it_when_asked_and_an_area_touching_the_block_stays_out():
    reads = _reads() + [_read(245.0, 0.7, [(0.0, 40.0, 0.7)])]  # 5 µm from the blurred block
    accepted, rejected, _ = judge(reads, SelectorConfig(), 1.0, margin_um=10.0)
    assert sorted(b[0] for b, _ in accepted) == [265.0, 2000.0]
    assert rejected == {R_BLUR: 2}
    assert reads[3][1]["verdict"] == R_BLUR and reads[1][1]["verdict"] == "accepted"


def test_the_choice_takes_areas_clear_of_soft_blocks_before_closer_ones_with_a_higher_score():
    """Areas accepted near a soft block are more often partly blurred than those far from any (on
    synthetic seeds 1601-1605, 15 of 18 accepted areas outside the monolayer or focus lay within 100 µm
    of one, against 38 of 153 usable ones): the choice takes the clear ones first."""
    from tile_selector.screen import Screen
    from tile_selector.select import _choose

    reads = _reads() + [_read(600.0, 0.7, [(0.0, 40.0, 0.7)]), _read(900.0, 0.7, [(0.0, 40.0, 0.7)])]
    accepted, judged, ref = judge(reads, SelectorConfig(), 1.0, margin_um=10.0)
    soft = {b[0]: m["soft_block_um"] for b, m in accepted}
    assert soft == {265.0: 25.0, 600.0: 360.0, 900.0: 660.0, 2000.0: 1760.0}, "µm to the nearest soft block"
    for _, m in accepted:
        m["score"] = 100.0 if m["soft_block_um"] < 100 else 50.0
    screen = Screen(reads, accepted, judged, ref, list(reads), {})
    chosen, rejected = _choose(screen, [], SelectorConfig(max_areas=3, target_cells=0))
    assert sorted(b[0] for b, _ in chosen) == [600.0, 900.0, 2000.0], "the closer one, though it scores higher, waits"
    assert rejected.get("not needed (enough better areas)") == 1
    chosen, _ = _choose(screen, [], SelectorConfig(max_areas=3, target_cells=0, clear_um=0.0))
    assert 265.0 in [b[0] for b, _ in chosen], "without the rule the best score goes first"


def test_the_choice_takes_areas_inside_the_block_coverage_range_before_those_at_its_edge():
    """An accepted area whose thinnest (or densest) ~64-µm block lies within ``block_room`` of the
    limit is more often on a fringe of the monolayer (on the seen synthetic seeds 1701-1707, the
    areas chosen outside the truth's monolayer had a thinnest block of 0.23-0.26, against a median of
    0.35 for the usable ones): among areas otherwise alike, the choice takes those inside first."""
    from tile_selector.screen import Screen
    from tile_selector.select import _choose

    reads = [_read(x, 0.7, [(0.0, 40.0, 0.7)]) for x in (0.0, 600.0, 1200.0, 1800.0)]
    for _, m in reads:
        m["coverage_max_block"] = 0.5
    reads[0][1]["coverage_min_block"] = 0.24   # at the thin edge of the range (0.22)
    reads[1][1]["coverage_max_block"] = 0.58   # at the thick edge (0.6)
    accepted, judged, ref = judge(reads, SelectorConfig(), 1.0)
    assert len(accepted) == 4
    for _, m in accepted:
        m["score"] = 100.0 if m["coverage_min_block"] < 0.27 or m["coverage_max_block"] > 0.55 else 50.0
    screen = Screen(reads, accepted, judged, ref, list(reads), {})
    chosen, _ = _choose(screen, [], SelectorConfig(max_areas=2, target_cells=0))
    assert sorted(b[0] for b, _ in chosen) == [1200.0, 1800.0], "the edge ones, though they score higher, wait"
    chosen, _ = _choose(screen, [], SelectorConfig(max_areas=3, target_cells=0))
    assert len(chosen) == 3, "an edge area is still taken when more areas are wanted"
    chosen, _ = _choose(screen, [], SelectorConfig(max_areas=2, target_cells=0, block_room=0.0))
    assert sorted(b[0] for b, _ in chosen) == [0.0, 600.0], "without the rule the best score goes first"


def test_a_piled_up_block_soft_only_against_the_slides_sharpest_areas_is_no_evidence_of_blur():
    """Piled-up cells overlap and show fewer clean edges than the monolayer, so a thick area's block
    falls short of the slide's relative focus limit (0.72 x its sharpest areas) without any blur. Such
    a block does not reject its neighbour; a monolayer block as soft does, and so does a piled-up one
    below ``off_range_floor`` (0.30, a little under the absolute focus floor of 0.33). Between the two,
    a monolayer block is blur and a pile (a marrow particle, say) is not."""
    def reads(focus: float, cov: float) -> list:
        thick = _read(0.0, focus, [(200.0, 240.0, focus, cov)])
        thick[1]["coverage"], thick[1]["coverage_max_block"] = 0.7, 0.8
        # a sharp monolayer area 25 µm beyond the block, and sharp ones far away (focus reference 0.7)
        return [thick] + [_read(x, 0.7, [(0.0, 40.0, 0.7)]) for x in (265.0, 2000.0, 3000.0)]

    cfg = SelectorConfig()
    assert 0.72 * 0.7 > 0.4 > cfg.focus_floor
    accepted, _, _ = judge(reads(0.4, 0.85), cfg, 1.0)
    assert sorted(b[0] for b, _ in accepted) == [265.0, 2000.0, 3000.0], "the piled-up block is explained by the pile"
    accepted, _, _ = judge(reads(0.4, 0.45), cfg, 1.0)
    assert sorted(b[0] for b, _ in accepted) == [2000.0, 3000.0], "a monolayer block as soft is blur"
    accepted, _, _ = judge(reads(0.25, 0.85), cfg, 1.0)
    assert sorted(b[0] for b, _ in accepted) == [2000.0, 3000.0], "well below the floor a pile is blurred too"
    assert cfg.off_range_floor < 0.31 < cfg.focus_floor
    accepted, _, _ = judge(reads(0.31, 0.85), cfg, 1.0)
    assert sorted(b[0] for b, _ in accepted) == [265.0, 2000.0, 3000.0], "a pile just under the floor: no evidence"
    accepted, _, _ = judge(reads(0.31, 0.45), cfg, 1.0)
    assert sorted(b[0] for b, _ in accepted) == [2000.0, 3000.0], "a monolayer block as soft is blur"
    accepted, _, _ = judge(reads(0.4, 0.1), cfg, 1.0)
    assert sorted(b[0] for b, _ in accepted) == [265.0, 2000.0, 3000.0], "a sparse block: few edges, no evidence"


def test_the_choice_lays_first_tier_areas_side_by_side_when_the_best_first_leaves_fewer():
    """Three accepted areas side by side and a better one overlapping two of them: best first takes
    the better one and one more; laid side by side (search.pack) the three fit, and they are taken
    while the slide is short of its target cells. With the target met by the best first, it stays."""
    from tile_selector.screen import Screen
    from tile_selector.select import _choose

    reads = [_read(x, 0.7, [(0.0, 40.0, 0.7)]) for x in (0.0, 256.0, 512.0, 400.0)]
    for _, m in reads:
        m["coverage_max_block"] = 0.5  # inside the block range: first tier
    accepted, judged, ref = judge(reads, SelectorConfig(), 1.0)
    assert len(accepted) == 4
    for b, m in accepted:
        m["score"] = 100.0 if b[0] == 400.0 else 50.0
    screen = Screen(reads, accepted, judged, ref, list(reads), {})
    chosen, rejected = _choose(screen, [], SelectorConfig(max_areas=6, target_cells=500))
    assert sorted(b[0] for b, _ in chosen) == [0.0, 256.0, 512.0]
    assert rejected.get("overlaps or crowds a chosen area") == 1
    chosen, _ = _choose(screen, [], SelectorConfig(max_areas=6, target_cells=60))
    assert [b[0] for b, _ in chosen][:1] == [400.0], "the best first when its cells reach the target"
