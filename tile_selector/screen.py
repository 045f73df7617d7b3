"""The full-resolution screen: candidates read in rounds, each judged, the search map closed around them.

See :mod:`tile_selector.select` (step 3) for where it sits in the selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .evidence import Limits, ReadEvidence
from .quality import area_measures, background_od
from .search import CandidateMap, Pick, pack
from .slide import Slide

if TYPE_CHECKING:  # the config is defined with the selection that uses it
    from .select import SelectorConfig

#: Reasons, in the words the user reads.
R_THICK = "too thick (cells pile up)"
R_THIN = "too thin (feathered edge, sparse cells)"
R_BLUR = "blurred"
R_FEW = "too few nucleated cells"
R_OUTSIDE = "partly outside the scanned image"
R_CLUMP = "red cells clumped"


@dataclass
class Screen:
    """What the screen read and found."""

    screened: list          # (level-0 box, measures incl. "verdict") of every area read, in order
    accepted: list          # the accepted ones among them, with a "score"
    judged: dict[str, int]  # rejected areas read, by reason
    focus_ref: float        # the slide's sharp areas: 90th percentile of the worst blocks' sharpness
    picks: list[Pick]       # every candidate taken from the map (read or not)
    search: dict            # positions, grid, reads, rounds, why it stopped, monolayer level


def screen_rounds(slide: Slide, cmap: CandidateMap, ov: np.ndarray, area_size: tuple[int, int], area_mpp: float,
                  cfg: SelectorConfig) -> Screen:
    """Read the best candidates at full resolution, round after round, until enough are accepted.

    Each round first takes up to ``refine_per_round`` positions that the pixels already read say
    would pass (a rejected area moved off the block that failed it: :mod:`tile_selector.evidence`),
    then fills the round with the best open, mutually non-overlapping positions of ``cmap`` (the
    first round also a few probes across the smear's OD range). It reads and judges them, re-learns
    the monolayer level from what was read, and closes the map around what it saw: fully around
    accepted areas (the final choice needs them apart), within a quarter area of the centre of
    rejected ones (a shifted area may pass), and wherever a block was found blurred. It stops when
    ``max_areas`` (or twice the target cells) are accepted, when no position is left to read, after
    ``idle_reads`` reads that found nothing new (once something was found), or at the read budget.
    Then, when fewer than ``pack_below`` accepted areas fit side by side, it reads the positions of a
    packing laid end to end over the ground already read (:meth:`CandidateMap.packed`), up to
    ``pack_reads`` reads, if that packing holds more areas. While no area has passed, the rounds stop
    ``last_reads`` short of the budget: if none passes by then, those reads go to the moves the pixels
    read say would pass with no room to spare (the last resort before an inconclusive slide).
    """
    screen_mpp = max(area_mpp, cfg.screen_mpp)
    sw, sh = int(round(area_size[0] * area_mpp / screen_mpp)), int(round(area_size[1] * area_mpp / screen_mpp))
    white = white_point(ov)
    first_level = cmap.level
    target_coverage = (cfg.min_coverage + cfg.max_coverage) / 2.0
    per_round = max(cfg.round_size, cfg.max_areas)
    screened: list[tuple[tuple, dict]] = []
    picks: list[Pick] = []
    accepted: list = []
    judged: dict[str, int] = {}
    focus_ref = 0.0
    plasma = None
    rounds, stopped = 0, "read budget reached"
    found, idle = 0, 0
    evidence = ReadEvidence(cmap.smooth, cmap.sx, cmap.sy, cmap.bh, cmap.bw, (sw, sh), screen_mpp)
    limits = Limits(cfg.min_coverage, cfg.max_coverage, cfg.min_block_coverage, cfg.max_block_coverage)

    def _read(batch: list[Pick], plasma: float | None) -> float:
        """Read and measure ``batch`` at full resolution; returns the plasma level (set by the first)."""
        plasma, reads = read_areas(slide, [p.box for p in batch], (sw, sh), screen_mpp, white, plasma)
        for p, (box, meas) in zip(batch, reads):
            evidence.add(box, meas.pop("_fg"))
            meas["lowres_score"] = round(p.score, 4)
            meas.update(p.low)
            screened.append((box, meas))
        picks.extend(batch)
        return plasma

    def budget() -> int:  # the last reads are kept for the last resort below while nothing passed
        return cfg.read_budget - (0 if accepted else cfg.last_reads)

    while len(screened) < budget():
        room = budget() - len(screened)
        refined = []
        if screened:
            # first the moves that the pixels already read say would pass, then the overview's best.
            # A move must be predicted inside the block range with room to spare (an area on its fringe
            # is more often off the monolayer) and keep clear_um from soft blocks, not only the judge's
            # margin: a move hugs the ground already read, and next to a blurred patch that is its edge
            states = [(b, "rejected" if m["verdict"] != "accepted" else "accepted" if inside(m, cfg) else "edge")
                      for b, m in screened]
            refined = cmap.refined(evidence, min(cfg.refine_per_round, room), limits, states,
                                   _blurred_blocks(screened, cfg, focus_ref), cfg.clear_um / slide.mpp_x,
                                   cfg.block_room)
        exclude = [p.box for p in refined]
        batch = cmap.take(min(per_round, room) - len(refined), exclude=exclude)
        if rounds == 0:
            batch += cmap.probes(exclude=[p.box for p in batch])[:max(0, room - len(batch))]
        if not batch and len(refined) < min(per_round, room) and cmap.widen():
            batch = cmap.take(min(per_round, room) - len(refined), exclude=exclude)
        batch = refined + batch
        if not batch:
            stopped = "no open position left"
            break
        rounds += 1
        plasma = _read(batch, plasma)
        accepted, judged, focus_ref = judge(screened, cfg, slide.mpp_x)
        # closed around every read by its verdict now (a verdict may change in a later round), and
        # around the soft blocks of areas rejected as blurred or thick (blur spreads the stain, so a
        # blurred monolayer looks thick); blocks of sparse areas have few clean edges and say little
        soft = _blurred_blocks([(b, m) for b, m in screened if m["verdict"] in (R_BLUR, R_THICK)], cfg, focus_ref)
        cmap.reclose([(b, m["verdict"] == "accepted") for b, m in screened], soft, cfg.blur_margin_um / slide.mpp_x)
        cmap.calibrate(screened, target_coverage, first_level, cfg.focus_floor)
        cells = sum(m["cells"] for _, m in accepted)
        if len(accepted) >= cfg.max_areas or (cfg.target_cells and cells >= 2 * cfg.target_cells):
            stopped = "enough areas accepted"
            break
        idle = idle + len(batch) if len(accepted) <= found else 0
        found = max(found, len(accepted))
        if accepted and idle >= cfg.idle_reads:
            stopped = f"no further area accepted in the last {idle} reads"
            break
    packed = 0
    while stopped != "enough areas accepted" and screened and packed < cfg.pack_reads:
        # Fewer areas fit side by side than wanted: the best areas, read one by one, may lie in the middle
        # of a small smear's monolayer with less than an area of room on either side. Lay areas end to
        # end over the ground already read (search.pack) and read the positions of that packing, when it
        # holds more areas than the accepted ones do; the choice packs the accepted areas the same way.
        # Its positions keep clear_um from soft blocks, as the moves do; when no such packing holds more,
        # only the judge's own margin: on a small smear the monolayer is rarely 100 µm clear of every soft
        # block read, and an exhaustive read (bench_selector --exhaustive) found two usable areas side by
        # side, where one was taken, on two of 16 small smears; held 100 µm clear, the packing found neither.
        have = len(pack([b for b, _ in accepted]))
        room = min(cfg.read_budget - len(screened), cfg.pack_reads - packed)
        if have >= cfg.pack_below or room <= 0:
            break
        kept = [b for b, _ in accepted]
        rejected = [b for b, m in screened if m["verdict"] != "accepted"]
        soft = _blurred_blocks(screened, cfg, focus_ref)
        for margin_um in (cfg.clear_um, cfg.blur_margin_um):
            n, new = cmap.packed(evidence, limits, kept, rejected, soft, margin_um / slide.mpp_x, cfg.block_room)
            if n > have and new and len(new) <= room:
                break
        else:
            break
        rounds += 1
        packed += len(new)
        plasma = _read(new, plasma)
        accepted, judged, focus_ref = judge(screened, cfg, slide.mpp_x)
    last = 0
    if not accepted and screened and not slide_out_of_focus(focus_ref, cfg):
        # The last resort, before calling the slide inconclusive: the moves that the pixels read say would
        # pass the judge's coverage limits with no room to spare, first with the judge's own margin around
        # soft blocks, then with the rescue's narrow one (the moves above keep clear_um and block_room: a
        # fringe or the edge of a blurred patch is more often unusable, but here nothing else passed). The
        # monolayer of a small smear or a narrow band may be a spot a few tens of µm across between a
        # blurred patch and the thick or thin zone. Each read is still judged on its own pixels (and one
        # within the judge's margin of a soft block only by the rescue below, with its warning).
        for margin_um in (cfg.blur_margin_um, cfg.rescue_margin_um):
            states = [(b, "rejected") for b, _ in screened]
            k = min(cfg.last_reads - last, cfg.read_budget - len(screened))
            new = cmap.refined(evidence, k, limits, states, _blurred_blocks(screened, cfg, focus_ref),
                               margin_um / slide.mpp_x, 0.0)
            if new:
                rounds += 1
                last += len(new)
                plasma = _read(new, plasma)
                accepted, judged, focus_ref = judge(screened, cfg, slide.mpp_x)
                if accepted:
                    break
    near = 0
    if len(accepted) < cfg.rescue_below and cfg.rescue_margin_um < cfg.blur_margin_um and screened:
        # Too few areas: the margin around blurred blocks (one focus block wide: a block that looks sharp
        # by its sharpest edges may hide blur where it meets a blurred one) costs most where the usable
        # part of the smear is small and lies next to an out-of-focus patch. The same reads are judged
        # again with a narrow margin; an area accepted only this way carries ``near_blur`` (a warning
        # on the slide page), and its own blocks must still be sharp. (Reading on with the narrow
        # margin was tried: on seen cohorts it added as many blurred areas as sharp ones.)
        before = {id(m) for _, m in accepted}
        accepted, judged, focus_ref = judge(screened, cfg, slide.mpp_x, cfg.rescue_margin_um)
        for _, m in accepted:
            if id(m) not in before:
                m["near_blur"] = True
                near += 1
    search = {"positions": cmap.positions, "grid_um": round(cmap.map_mpp, 3), "read": len(screened),
              "read_budget": cfg.read_budget, "rounds": rounds, "stopped": stopped,
              "level_first": round(first_level, 5), "level": round(cmap.level, 5), "widened": cmap.widened,
              "packed": packed, "last_resort": last, "near_blur": near}
    return Screen(screened, accepted, judged, focus_ref, picks, search)


def slide_out_of_focus(focus_ref: float, cfg: SelectorConfig) -> bool:
    """Even the sharpest areas read are below the absolute focus floor (the judge rejects every area)."""
    return focus_ref < cfg.focus_floor


def white_point(ov: np.ndarray) -> np.ndarray:
    """The glass's RGB on the overview (99.5th percentile per channel): the optical densities' reference."""
    return np.percentile(ov.reshape(-1, 3), 99.5, axis=0)


def read_areas(slide: Slide, boxes: list, size: tuple[int, int], screen_mpp: float, white: np.ndarray,
               plasma: float | None = None) -> tuple[float, list[tuple[tuple, dict]]]:
    """Read level-0 ``boxes`` at ``size`` px (``screen_mpp`` µm/px) and measure each as the judge needs
    (:func:`tile_selector.quality.area_measures`; its focus blocks in level-0 px, the share outside the
    image). ``plasma``: the OD of the plasma between cells; None sets it from these reads (their median
    background: most candidates show some). Returns the plasma level and (box, measures) pairs."""
    reads = [(box, slide.read_area(box, size)) for box in boxes]
    if plasma is None and reads:
        plasma = float(np.median([background_od(r.image, white) for _, r in reads]))
    out = []
    for box, read in reads:
        meas = area_measures(read.image, screen_mpp, white, background=plasma)
        sx_, sy_ = (box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1]  # screen px -> level-0 px
        meas["_blocks"] = [(box[0] + x0 * sx_, box[1] + y0 * sy_, box[0] + x1 * sx_, box[1] + y1 * sy_, *v)
                           for x0, y0, x1, y1, *v in meas["_blocks"]]
        meas["outside"] = round(read.outside_fraction, 4)
        out.append((box, meas))
    return plasma, out


def inside(m: dict, cfg: SelectorConfig) -> bool:
    """Whether every block of an area lies ``block_room`` inside the block coverage range: not on a
    thin or thick fringe of the monolayer (the choice takes such areas first)."""
    return (m["coverage_min_block"] >= cfg.min_block_coverage + cfg.block_room
            and m["coverage_max_block"] <= cfg.max_block_coverage - cfg.block_room)


def _blurred_blocks(screened: list, cfg: SelectorConfig, focus_ref: float) -> np.ndarray:
    """The level-0 boxes of the soft focus blocks of ``screened``: the evidence of blur that the judge's
    margin, the closure and the moves keep away from.

    A block below the slide's relative focus limit counts when its own coverage lies in the block
    coverage range. A piled-up or sparse block counts only below ``off_range_floor``, a little under
    the absolute focus floor: its cells overlap or its edges are few, so it falls short of the slide's
    sharpest (monolayer) areas without any blur. On the seen synthetic seeds 2001-2007, such blocks
    between the floor and the relative limit were blurred in 10 % (piled) and 19 % (sparse) of cases,
    blocks in the range in 89 %. On the sharp groups of seeds 2201-2207 and 2401-2407 (blurred: half
    the block at >= 1 µm of truth blur), piled-up blocks at 0.30-0.33, just under the floor, were
    blurred in 74 of 213 cases, sparse ones in 96 of 260, blocks in the range in 144 of 164; below
    0.28, 99 % of piled-up blocks were. A marrow particle, thick and dense, is such a block: counted
    as blur at 0.31 (slide 2401_002), it rejected the sharp monolayer beside it.
    """
    focus_min = max(cfg.focus_floor, cfg.focus_relative * focus_ref)

    def soft(b) -> bool:
        if b[4] >= focus_min:
            return False
        return b[4] < cfg.off_range_floor or cfg.min_block_coverage <= b[5] <= cfg.max_block_coverage

    return np.array([b[:4] for _, m in screened for b in m.get("_blocks", []) if soft(b)],
                    np.float64).reshape(-1, 4)


def search_text(search: dict) -> str:
    wide = (f" ({search['widened']:,} of them near the smear's edge, searched once those inside its border margin "
            "were used up)") if search.get("widened") else ""
    packed = (f", {search['packed']} of them to lay areas side by side" if search.get("packed") else "")
    packed += (f", {search['last_resort']} as a last resort with no room to spare" if search.get("last_resort")
               else "")
    return (f"searched {search['positions']:,} positions{wide} on a {search['grid_um']:g}-µm grid, read "
            f"{search['read']} at full resolution in {search['rounds']} round(s) (budget {search['read_budget']}; "
            f"{search['stopped']}{packed})")


def judge(screened: list, cfg: SelectorConfig, mpp0: float,
          margin_um: float | None = None) -> tuple[list, dict[str, int], float]:
    """Accept or reject screened candidates; focus is judged against the slide's sharpest areas.

    An area is also blurred when an out-of-focus block of any screened candidate comes within
    ``margin_um`` (default ``cfg.blur_margin_um``) of it: the candidates see its surroundings on
    another block grid, so a blurred patch at one edge of the area shows there even when the area's
    own blocks straddle it. ``mpp0``: the slide's level-0 µm/px.
    """
    margin_um = cfg.blur_margin_um if margin_um is None else margin_um
    focus_ref = float(np.percentile([m["focus_worst_block"] for _, m in screened], 90)) if screened else 0.0
    focus_min = max(cfg.focus_floor, cfg.focus_relative * focus_ref)
    blurred = _blurred_blocks(screened, cfg, focus_ref)
    # even the sharpest areas read are below the absolute floor: the slide is out of focus, and blur
    # spreads the stain so that coverage would call its areas thick
    slide_blurred = slide_out_of_focus(focus_ref, cfg)
    accepted, rejected = [], {}
    for box, m in screened:
        reason = None
        if m["outside"] > 0.0:
            reason = R_OUTSIDE
        elif slide_blurred:
            reason = R_BLUR
        elif m["coverage"] > cfg.max_coverage or m["coverage_max_block"] > cfg.max_block_coverage:
            reason = R_THICK
        elif m["coverage"] < cfg.min_coverage or m["coverage_min_block"] < cfg.min_block_coverage:
            reason = R_THIN
        elif m["focus_worst_block"] < focus_min or _touches(box, blurred, margin_um / mpp0):
            reason = R_BLUR
        elif m["overlap"] > 0.3:
            reason = R_CLUMP
        elif m["cells"] < cfg.min_cells_per_area:
            reason = R_FEW
        m["verdict"] = reason or "accepted"
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        # how far the nearest soft block lies (µm; None: none seen): the choice takes areas clear of
        # soft blocks first (select._choose)
        m["soft_block_um"] = _distance_um(box, blurred, mpp0)
        mid = 1.0 - min(1.0, abs(m["coverage"] - 0.45) / 0.3)
        rel_focus = min(1.0, m["focus_worst_block"] / max(focus_ref, 1e-6))
        m["score"] = round(m["cells"] * (0.5 + 0.5 * rel_focus) * (0.6 + 0.4 * mid) * (1.0 - m["overlap"]), 3)
        accepted.append((box, m))
    return accepted, rejected, focus_ref


def _touches(box, blocks: np.ndarray, m: float) -> bool:
    """Whether any of ``blocks`` (level-0 boxes) meets ``box`` grown by ``m`` level-0 px."""
    if not len(blocks):
        return False
    return bool(np.any((blocks[:, 0] < box[2] + m) & (blocks[:, 2] > box[0] - m)
                       & (blocks[:, 1] < box[3] + m) & (blocks[:, 3] > box[1] - m)))


def _distance_um(box, blocks: np.ndarray, mpp0: float) -> float | None:
    """Distance (µm) from ``box`` to the nearest of ``blocks`` (level-0 boxes; 0 when one meets it)."""
    if not len(blocks):
        return None
    dx = np.maximum(0.0, np.maximum(blocks[:, 0] - box[2], box[0] - blocks[:, 2]))
    dy = np.maximum(0.0, np.maximum(blocks[:, 1] - box[3], box[1] - blocks[:, 3]))
    return round(float(np.sqrt(dx * dx + dy * dy).min()) * mpp0, 1)
