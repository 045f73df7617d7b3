"""Choose representative, in-focus monolayer areas of a bone-marrow smear, as a cytologist would.

1. *Smear map* from a low-resolution overview (about 4 µm/px): glass vs smear from optical density,
   a monolayer level (the median smoothed OD over the smear), thick zone (well above it), thin
   feathered edge (well below), marrow particles (dense, nucleus-rich blobs).
2. *Candidates* (:mod:`tile_selector.search`): every position of an area of the bundle's size on
   the map's own grid (about 4 µm), scored with integral images: inside the smear's outline (the
   glass between monolayer cells is not "glass"), close to the monolayer level, uniform, rich in
   nucleated cells, off the particles. The cost grows with the overview's pixels.
3. *Full-resolution screen in rounds* (:mod:`tile_selector.screen`): the best non-overlapping
   positions are read (focus, cellularity, coverage, overlap; :mod:`tile_selector.quality`). Focus
   is judged against the slide's own sharpest areas and an absolute floor, so it is comparable
   across stains. After each round the monolayer level is re-learned from the coverage of what was
   read (a narrow band far from the smear's median OD is found this way), the map is closed again
   around what was read (by each read's current verdict) and around blurred blocks, and the next
   round tries further positions: first the moves of rejected (or fringe) areas that the pixels
   already read say would pass (:mod:`tile_selector.evidence`), then the overview's best. It goes on until enough
   areas are accepted, nothing new was found in the last reads, or the read budget is spent. When
   the positions inside the border margin are used up (a small smear, a narrow band), the search
   widens once to positions at least 90 % inside the outline itself; the screen judges them on
   their own pixels. When fewer than three accepted areas fit side by side (the best ones, read one
   by one, may sit in the middle of a small smear's monolayer), areas are laid end to end over the
   ground already read (:func:`tile_selector.search.pack`) and that packing's positions are read,
   if it holds more. When no area passed at all, a last resort reads up to ``last_reads`` (kept from
   the budget) moves the pixels read say would pass with no room to spare, first with the judge's own
   margin around soft blocks, then with the rescue's narrow one. When fewer than three areas pass,
   the reads are judged again with a narrow margin around blurred blocks; an area accepted only so
   is marked ``near_blur``, chosen last, and named in a QC warning.
4. *Selection*: best combined score first (areas clear of every soft block before those within
   ``clear_um`` of one, then areas whose every block lies ``block_room`` inside the coverage range
   before those on a fringe, ``near_blur`` ones last), no overlap, spread over the smear, until the target
   nucleated-cell count or the maximum number of areas is reached; when that falls short and more
   first-tier areas fit side by side, those are taken first. Every rejected candidate is
   counted by reason. No usable area: ``inconclusive`` with the reason in words, which says how
   many positions were searched and how many areas were read.

Plain pictures (camera frames) are one area: no smear map, only the quality scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .quality import area_measures, field_equivalent_cells, optical_density
from .screen import R_BLUR, R_FEW, R_THICK, R_THIN, Screen, inside, screen_rounds, search_text
from .search import CandidateMap, pack
from .slide import Slide

OVERVIEW_MPP = 4.0
#: Reasons of the selection itself, in the words the user reads (the screen's own: tile_selector.screen).
R_BORDER = "at the smear border or on glass"
R_NOT_NEEDED = "not needed (enough better areas)"
R_NOT_SCREENED = "not examined (screening limit reached)"
R_OVERLAP = "overlaps or crowds a chosen area"

NOT_A_SMEAR = "not a bone-marrow smear"
#: Below this density of separate red-cell discs (75th percentile over the screened areas) the slide
#: is not a smear: measured about 1000-4500 per mm² on synthetic monolayers, at most ~370 on real H&E
#: tissue sections.
MIN_RED_CELLS_PER_MM2 = 600.0


@dataclass
class Area:
    """One selected area. ``box`` is in level-0 pixels; ``size`` is its pixel size at ``mpp``."""

    index: int
    box: tuple[int, int, int, int]
    mpp: float
    size: tuple[int, int]
    scores: dict[str, float]
    why: str = ""

    def to_json(self) -> dict:
        return {"rank": self.index + 1, "box": list(self.box), "mpp": self.mpp, "size": list(self.size),
                "scores": self.scores, "why": self.why}


@dataclass
class Selection:
    status: str                       # ok | inconclusive
    reason: str
    areas: list[Area]
    rejected: dict[str, int]
    candidates: int
    qc: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    slide: dict = field(default_factory=dict)  # the slide's public facts (select_file; PUBLIC_FACTS)
    overview: np.ndarray | None = None     # RGB uint8
    overview_mpp: float = 0.0
    zone_map: np.ndarray | None = None     # uint8 codes on the overview grid (see ZONE_CODES)
    screened: list = field(default_factory=list)  # (box, measures with "verdict") of every screened candidate

    @property
    def estimated_cells(self) -> int:
        return int(sum(a.scores.get("cells", 0) for a in self.areas))

    @property
    def mean_focus(self) -> float:
        return float(np.mean([a.scores["focus"] for a in self.areas])) if self.areas else 0.0

    def to_json(self) -> dict:
        return {"status": self.status, "reason": self.reason, "areas": [a.to_json() for a in self.areas],
                "rejected": dict(self.rejected), "candidates": self.candidates, "qc": self.qc,
                "warnings": list(self.warnings), "estimated_cells": self.estimated_cells,
                "mean_focus": round(self.mean_focus, 4), "timings_s": self.timings}


ZONE_CODES = {"glass": 0, "thick": 1, "monolayer": 2, "thin": 3, "particle": 4}


@dataclass
class SelectorConfig:
    max_areas: int = 12
    target_cells: int = 500            # 0: no early stop
    read_budget: int = 96              # full-resolution reads at most, over all rounds
    round_size: int = 12               # candidates read per round (at least max_areas)
    idle_reads: int = 24               # stop after this many reads without a new accepted area (once one is)
    screen_mpp: float = 0.5            # focus / cellularity measured at least this coarse (µm/px)
    min_cells_per_area: int = 3
    max_coverage: float = 0.65         # share of the area covered by cells; above: cells pile up
    min_coverage: float = 0.33         # below: feathered edge, cells too sparse
    min_block_coverage: float = 0.22   # the same in every ~64-µm block of the area
    max_block_coverage: float = 0.6
    border_um: float = 16.0            # areas stay this far inside the smear's edge
    focus_floor: float = 0.33          # absolute edge sharpness (µm⁻¹) of the worst 40-µm block (~1.2 µm blur)
    off_range_floor: float = 0.30      # the same for a piled-up or sparse block as evidence of blur (screen)
    focus_relative: float = 0.72       # of the slide's sharp areas (90th percentile of the worst blocks)
    blur_margin_um: float = 40.0       # a blurred block this close also rejects (one focus block: a block
    #                                    judged sharp by its sharpest edges may hide blur where it meets one)
    rescue_below: int = 3              # fewer areas accepted than this: judge the reads again with ...
    rescue_margin_um: float = 10.0     # ... this margin around blurred blocks (the areas carry a warning)
    clear_um: float = 100.0            # areas this far from every soft (blurred) block are chosen first
    refine_per_round: int = 4          # reads per round placed from the reads' own pixels (evidence)
    block_room: float = 0.05           # areas whose every block lies this far inside the block coverage
    #                                    range are chosen before those at its edge (a fringe of the monolayer)
    pack_below: int = 3                # fewer accepted areas side by side than this: read a packing ...
    pack_reads: int = 12               # ... of at most this many reads in all (screen; search.pack)
    last_reads: int = 8                # of the read budget, kept for a last resort while no area passed (screen)


def _area_px0(slide: Slide, size: tuple[int, int], mpp: float) -> tuple[float, float]:
    return size[0] * mpp / slide.mpp_x, size[1] * mpp / slide.mpp_y


def _smear_map(ov: np.ndarray, ov_mpp: float) -> dict:
    """Smear mask, smoothed OD, monolayer level, zones and particles of an overview image."""
    od = optical_density(ov)
    od_sum = od.sum(axis=2)
    smooth = ndimage.gaussian_filter(od_sum, max(1.0, 10.0 / ov_mpp))
    smear = smooth > 0.05
    smear = ndimage.binary_opening(smear, iterations=2)
    smear = ndimage.binary_fill_holes(smear)
    info: dict = {"od": od, "od_sum": od_sum, "smooth": smooth, "smear": smear}
    if smear.sum() < 10:
        info.update(level=0.0, zones=np.zeros(od_sum.shape, np.uint8), particles=np.zeros(od_sum.shape, bool))
        return info
    level = float(np.median(smooth[smear]))
    # particles: compact, very dense, nucleus-rich (red channel) blobs larger than ~40 µm
    nuc = ndimage.gaussian_filter(od[..., 0], max(1.0, 6.0 / ov_mpp))
    nuc_level = float(np.median(nuc[smear]))
    particles = smear & (nuc > 3.5 * max(nuc_level, 1e-3)) & (smooth > 2.0 * level)
    particles = ndimage.binary_opening(particles, iterations=1)
    lab, n = ndimage.label(particles)
    if n:
        sizes = np.bincount(lab.ravel())[1:] * ov_mpp * ov_mpp
        big = np.flatnonzero(sizes >= math.pi * 20.0 ** 2) + 1
        particles = np.isin(lab, big)
    info.update(level=level, particles=particles)
    info["zones"] = _zones(info, level)
    return info


def _zones(sm: dict, level: float) -> np.ndarray:
    """Zone codes on the overview grid at a monolayer ``level`` (the overview picture's tints)."""
    smear, smooth = sm["smear"], sm["smooth"]
    zones = np.zeros(smooth.shape, np.uint8)
    zones[smear] = ZONE_CODES["monolayer"]
    zones[smear & (smooth > 2.0 * level)] = ZONE_CODES["thick"]
    zones[smear & (smooth < 0.5 * level)] = ZONE_CODES["thin"]
    zones[sm["particles"]] = ZONE_CODES["particle"]
    return zones


def _not_brightfield(ov: np.ndarray) -> bool:
    grey = ov.astype(np.float32).mean(axis=2)
    return float(np.percentile(grey, 50)) < 90 and float(np.percentile(grey, 99)) < 200


def select_areas(slide: Slide, area_size: tuple[int, int] = (2560, 1920), area_mpp: float | None = None,
                 config: SelectorConfig | None = None) -> Selection:
    """Select areas of ``area_size`` pixels at ``area_mpp`` µm/px (default: the slide's own mpp)."""
    cfg = config or SelectorConfig()
    t0 = time.perf_counter()
    area_mpp = float(area_mpp or slide.mpp)
    if slide.is_plain:
        return _select_plain(slide, area_mpp, cfg, t0)

    aw0, ah0 = _area_px0(slide, area_size, area_mpp)
    ov, ov_mpp = slide.read_overview(OVERVIEW_MPP)
    t_overview = time.perf_counter() - t0
    timings = {"overview": round(t_overview, 3)}
    sel_base = dict(overview=ov, overview_mpp=ov_mpp, timings=timings)
    if _not_brightfield(ov):
        return Selection("inconclusive", f"{NOT_A_SMEAR}: dark background (a fluorescence scan?), "
                         "not a bright-field Romanowsky stain", [], {}, 0, **sel_base)
    sm = _smear_map(ov, ov_mpp)
    sel_base["zone_map"] = sm["zones"]
    smear = sm["smear"]
    if smear.mean() < 0.005:
        return Selection("inconclusive", f"{NOT_A_SMEAR}: no smear found on the glass (empty or label-only scan)",
                         [], {}, 0, **sel_base)

    # -- every position of an area on the smear map, then the full-resolution screen in rounds ------
    W0, H0 = slide.dimensions
    sx, sy = ov.shape[1] / W0, ov.shape[0] / H0  # overview px per level-0 px
    cmap = CandidateMap(sm, ov_mpp, sx, sy, aw0, ah0, cfg.border_um)
    lattice = cmap.lattice_reasons()
    if cmap.positions == 0 or not (cmap.in_smear > 0).any():
        return Selection("inconclusive", f"{NOT_A_SMEAR}: the smear is smaller than one area "
                         f"({area_size[0]}x{area_size[1]} px at {area_mpp} µm/px)", [], {}, 0, **sel_base)
    timings["candidates"] = round(time.perf_counter() - t0 - t_overview, 3)
    screen = screen_rounds(slide, cmap, ov, area_size, area_mpp, cfg)
    sm["zones"] = _zones(sm, cmap.level)
    sel_base["zone_map"] = sm["zones"]
    timings["screen"] = round(time.perf_counter() - t0 - t_overview - timings["candidates"], 3)
    timings["screened"] = len(screen.screened)
    chosen, rejected = _choose(screen, lattice, cfg)
    areas = [_area(k, box, m, area_size, area_mpp, screen.focus_ref) for k, (box, m) in enumerate(chosen)]
    qc = _qc(sm, ov_mpp, areas, area_size, area_mpp)
    warnings = list(qc.pop("warnings"))
    near = [a.index + 1 for a in areas if a.scores.get("near_blur")]
    if near:
        many = len(near) > 1
        warnings.append(f"area{'s' if many else ''} {', '.join(map(str, near))} lie{'' if many else 's'} within "
                        f"{cfg.blur_margin_um:g} µm of an out-of-focus patch (taken because too few areas were found "
                        f"farther away): check {'their' if many else 'its'} focus")
    timings["total"] = round(time.perf_counter() - t0, 3)
    n_candidates = len(lattice) + len(screen.picks)
    sel = Selection("ok", "", areas, rejected, n_candidates, qc, warnings, timings, **{
        k: v for k, v in sel_base.items() if k != "timings"})
    sel.screened = screen.screened
    _verdict(sel, screen, cfg)
    return sel


def _choose(screen: Screen, lattice: list[str], cfg: SelectorConfig) -> tuple[list, dict[str, int]]:
    """Greedy choice among the accepted areas: best first, no overlap, spread over the smear; and every
    candidate not chosen counted by reason."""
    rejected: dict[str, int] = {}
    words = {"border": R_BORDER, "thick": R_THICK, "thin": R_THIN}
    for code in lattice:
        rejected[words[code]] = rejected.get(words[code], 0) + 1
    for k, v in screen.judged.items():
        rejected[k] = rejected.get(k, 0) + v
    pool = sorted(screen.accepted, key=lambda a: -a[1]["score"])
    chosen = _greedy(pool, cfg)
    if len(chosen) < cfg.max_areas and not (cfg.target_cells and _cells(chosen) >= cfg.target_cells):
        # the best first may sit in the middle of a small smear's monolayer and crowd out two others:
        # when the first-tier areas laid side by side (search.pack) are more, they are taken instead
        top = [a for a in pool if all(_tier(a[1], cfg))]
        packed = [top[k] for k in pack([b for b, _ in top])]
        if len(packed) > sum(1 for c in chosen if all(_tier(c[1], cfg))):
            chosen = _greedy(pool, cfg, first=packed)
    pool = [a for a in pool if not any(a is c for c in chosen)]
    for box, _m in pool:
        key = R_OVERLAP if any(_overlaps(box, c[0]) for c in chosen) else R_NOT_NEEDED
        rejected[key] = rejected.get(key, 0) + 1
    n_unscreened = len(screen.picks) - len(screen.screened)
    if n_unscreened:
        key = R_NOT_NEEDED if chosen else R_NOT_SCREENED
        rejected[key] = rejected.get(key, 0) + n_unscreened
    return chosen, rejected


def _tier(m: dict, cfg: SelectorConfig) -> tuple[bool, bool, bool]:
    """The choice's order before the score: areas next to an out-of-focus patch (screen: near_blur) only
    after every other one, areas clear of every soft block before those closer than clear_um, and areas
    inside the block coverage range before those on a fringe of it (screen.inside)."""
    soft = m.get("soft_block_um")
    return not m.get("near_blur"), soft is None or soft >= cfg.clear_um, inside(m, cfg)


def _cells(chosen: list) -> int:
    return sum(m["cells"] for _, m in chosen)


def _greedy(pool: list, cfg: SelectorConfig, first: list = ()) -> list:
    """From ``pool``: best first by tier and score, no overlap, spread over the smear (a crowded area
    counts less), until the target cells or the maximum number of areas; ``first`` (mutually apart)
    are taken before, best score first."""
    chosen: list = []
    for a in sorted(first, key=lambda a: -a[1]["score"]):
        if len(chosen) >= cfg.max_areas or (cfg.target_cells and _cells(chosen) >= cfg.target_cells):
            break
        chosen.append(a)
    pool = [a for a in pool if not any(a is c for c in chosen)]
    while pool and len(chosen) < cfg.max_areas and not (cfg.target_cells and _cells(chosen) >= cfg.target_cells):
        best_k, best_s = None, (False, False, False, -1.0)
        for k, (box, m) in enumerate(pool):
            if any(_overlaps(box, c[0]) for c in chosen):
                continue
            crowd = sum(1 for c in chosen if _near(box, c[0], 1.5))
            s = (*_tier(m, cfg), m["score"] * (0.75 ** crowd))
            if s > best_s:
                best_k, best_s = k, s
        if best_k is None:
            break
        chosen.append(pool.pop(best_k))
    return chosen


def _area(k: int, box, m: dict, area_size: tuple[int, int], area_mpp: float, focus_ref: float) -> Area:
    why = (f"in focus (edge sharpness {m['focus_worst_block']:.2f} vs slide best {focus_ref:.2f}), "
           f"~{m['cells']} nucleated cells, coverage {m['coverage']:.0%}"
           + ("; next to an out-of-focus patch" if m.get("near_blur") else ""))
    return Area(k, tuple(int(round(v)) for v in box), area_mpp, tuple(area_size),
                {kk: v for kk, v in m.items() if kk[0] != "_"}, why)


def _verdict(sel: Selection, screen: Screen, cfg: SelectorConfig) -> None:
    """Inconclusive when the slide is no smear (few separate red cells) or no area passed."""
    # judged where cells lie apart when the search read such areas: piled-up and bare areas show few
    # separate discs on any smear
    screened = screen.screened
    apart = [m for _, m in screened if cfg.min_coverage <= m["coverage"] <= cfg.max_coverage]
    densities = [m["red_cells_per_mm2"] for m in (apart if len(apart) >= 3 else [m for _, m in screened])]
    red_cells = float(np.percentile(densities, 75)) if densities else 0.0
    sel.qc["red_cells_per_mm2"] = round(red_cells, 1)
    if screened and red_cells < MIN_RED_CELLS_PER_MM2:
        sel.status, sel.areas = "inconclusive", []
        sel.reason = (f"{NOT_A_SMEAR}: no separate red cells ({red_cells:.0f} per mm², a smear shows thousands): "
                      "a tissue section or not a Romanowsky-stained smear")
    elif not sel.areas:
        sel.status = "inconclusive"
        sel.reason = ("no in-focus monolayer area: " + search_text(screen.search) + "; "
                      + _reason_text(sel.candidates, sel.rejected))
    sel.qc["search"] = screen.search


def _reason_text(n: int, rejected: dict[str, int]) -> str:
    parts = [f"{n} candidates"] + [f"{v} {k}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1])]
    return ", ".join(parts)


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _near(a, b, factor: float) -> bool:
    w, h = a[2] - a[0], a[3] - a[1]
    return abs((a[0] + a[2]) - (b[0] + b[2])) / 2 < factor * w and abs((a[1] + a[3]) - (b[1] + b[3])) / 2 < factor * h


def _qc(sm: dict, ov_mpp: float, areas: list[Area], area_size, area_mpp) -> dict:
    smear = sm["smear"]
    smear_px = max(1, int(smear.sum()))
    particle_share = float(sm["particles"].sum() / smear_px)
    lab, n_particles = ndimage.label(sm["particles"])
    area_um2 = area_size[0] * area_size[1] * area_mpp * area_mpp
    per_field = [field_equivalent_cells(a.scores["cells"], area_um2) for a in areas]
    qc = {
        "smear_area_mm2": round(smear_px * ov_mpp * ov_mpp * 1e-6, 3),
        "particles": int(n_particles),
        "particle_share": round(particle_share, 4),
        "cells_per_100x_field": round(float(np.mean(per_field)), 1) if per_field else 0.0,
        "warnings": [],
    }
    if per_field and qc["cells_per_100x_field"] < 10:
        qc["warnings"].append(f"the smear looks hemodiluted: about {qc['cells_per_100x_field']:.0f} nucleated cells "
                              "per 100x field in the chosen areas (ICSH: at least 10)")
    if n_particles == 0:
        qc["warnings"].append("no marrow particles seen on the smear (aspirate may be diluted with blood)")
    return qc


def _select_plain(slide: Slide, area_mpp: float, cfg: SelectorConfig, t0: float) -> Selection:
    """A camera frame is one area: the whole picture, resampled to ``area_mpp``."""
    W0, H0 = slide.dimensions
    size = (max(1, int(round(W0 * slide.mpp_x / area_mpp))), max(1, int(round(H0 * slide.mpp_y / area_mpp))))
    read = slide.read_area((0, 0, W0, H0), size)
    screen_mpp = max(area_mpp, cfg.screen_mpp)
    img = read.image
    if screen_mpp > area_mpp:
        img = np.asarray(_resize(img, (max(1, int(round(size[0] * area_mpp / screen_mpp))),
                                       max(1, int(round(size[1] * area_mpp / screen_mpp))))))
    m = area_measures(img, screen_mpp)
    rejected: dict[str, int] = {}
    reason = ""
    if _not_brightfield(read.image):
        reason = f"{NOT_A_SMEAR}: dark background (a fluorescence picture?)"
    elif m["focus_worst_block"] < cfg.focus_floor:
        rejected[R_BLUR] = 1
    elif m["coverage"] > 0.85:
        reason = f"{NOT_A_SMEAR}: continuous tissue without separate cells (a tissue section?)"
    elif m["cells"] < cfg.min_cells_per_area:
        rejected[R_FEW] = 1
    timings = {"total": round(time.perf_counter() - t0, 3)}
    area = Area(0, (0, 0, W0, H0), area_mpp, size, {k: v for k, v in m.items() if k[0] != "_"},
                "the whole picture (a camera frame)")
    if reason or rejected:
        return Selection("inconclusive", reason or ("picture not usable: " + _reason_text(1, rejected)), [],
                         rejected, 1, {}, [], timings)
    qc = {"cells_per_100x_field": round(field_equivalent_cells(m["cells"], size[0] * size[1] * area_mpp ** 2), 1)}
    return Selection("ok", "", [area], rejected, 1, qc, [], timings)


def _resize(img: np.ndarray, size: tuple[int, int]):
    from PIL import Image

    return Image.fromarray(img).resize(size, Image.Resampling.LANCZOS)



def select_file(path, area_size: tuple[int, int], area_mpp: float, config: SelectorConfig | None = None,
                reader: str = "auto", slide_mpp: float | None = None) -> Selection:
    """Open ``path`` (one cached handle per process) and select its areas."""
    from .errors import SlideError
    from .slide import open_slide_cached

    slide = open_slide_cached(path, reader=reader, mpp=slide_mpp)
    sel = select_areas(slide, area_size, area_mpp, config)
    try:
        sel.slide = slide.public_facts()
    except (SlideError, OSError):  # facts are optional: the selection's status already says what happened
        sel.slide = {}
    return sel
