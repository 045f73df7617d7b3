"""Area selector against the synthetic ground truth, and its speed on whole slides.

Agreement (held-out synthetic cohort; seeds 901-907 were never used while tuning, which used the
tuning cohort ``--seed-offset -100``, seeds 801-807; seeds 1201-1207 (``--seed-offset 300``) and
1301-1307 (``400``) were held out once each and have been looked at since; ``--seed-offset 500``,
seeds 1401-1407, was held out for the widened search and its misses were looked at; ``600``, seeds
1501-1507, for the stain-following red-cell test; ``700`` (seeds 1601-1607) for the narrow blur margin
when too few areas pass, its misses were looked at, and it was used to develop the closure rebuilt each round;
``800`` (seeds 1701-1707) for that closure and the choice clear of soft blocks, and was used to develop
the moves from the pixels read; ``900`` (seeds 1801-1807) was held out for those moves, and their
misses there changed them (clear of soft blocks, room inside the block range); ``1000`` (seeds
1901-1907) was held out for the changed moves, and its narrow bands were looked at; ``1100`` (seeds
2001-2007) was held out once more for the same code, then used to develop the soft blocks weighed by
their coverage; ``1200`` (seeds 2101-2107) was held out for that change and its misses were looked
at; the small smears of ``1100`` and ``1200`` were used to develop the areas laid side by side, and
``1300`` (seeds 2201-2207) and ``1400`` (seeds 2301-2307) were held out for them, once each, and their
misses were looked at; ``1500`` (seeds 2401-2407) was held out once for that code, then used with
``1300`` to develop the floor for piled-up and sparse blocks, and ``1600`` (seeds 2501-2507) was held out
for it, once, and its misses were looked at, and it was used (with ``1500``) to develop the packing's
fallback margin; ``1700`` (seeds 2601-2607) was held out for that, and its misses were looked at;
``1800`` (seeds 2701-2707) and ``1900`` (seeds 2801-2807) were rendered with generator 3 (each pixel
blurred by its truth's sigma) and measured once each with the same selector, ``1800`` also with
generator 2, and their misses were looked at; ``2000`` (seeds 2901-2907) was held out for the last
resort before an inconclusive slide, once, and its misses were looked at; the next unseen cohort is
``--seed-offset 2100``, seeds 3001-3007):

    python benchmarks/bench_selector.py --cohort /tmp/selector-cohort

renders (once) the groups below and selects areas of 512x384 px at 0.5 µm/px (256x192 µm, the demo
bundle's geometry) on every slide:

- small smears at 0.125 µm/px (12000x9000 px: 1.5 x 1.1 mm, a smear of a few areas),
- smears at 0.25 µm/px (12000x9000 px: 3 x 2.25 mm),
- large smears (24000x18000 px at 0.25 µm/px: 6 x 4.5 mm),
- narrow monolayer bands (``synth --smear narrow``: the monolayer is a 250-450 µm band across a
  tilted smear),
- a held-out stain preset (``leishman``),
- two defect groups that must end inconclusive: entirely out of focus, no monolayer zone,

and, over every slide of the sharp groups, four orientation bins of the smear's axis.

Per group it prints:

- ``allow``: slides whose truth allows at least one area (>= 90 % monolayer, truth blur < 1 µm
  everywhere in it; :func:`usable_positions`),
- ``false inc.``: the share of those that ended ``inconclusive`` (target <= 5 %),
- ``mono+focus``: the share of chosen areas that lie >= 90 % in the monolayer and in focus (target
  >= 95 %), next to the share in the monolayer alone and the worst truth blur inside a chosen area,
- ``px good``: of the chosen areas' pixels, the share in the monolayer and in focus at once (mean over
  the areas / the worst area): an area that misses the line above by a blurred corner or a thin fringe
  still counts as a miss there, and this says how large the misses are,
- ``>=3 allow`` / ``mean areas``: slides whose truth allows at least three non-overlapping areas, and
  the mean number of areas chosen on them (target >= 3),
- seconds per slide; for each falsely inconclusive slide, its reason;

and, over the sharp groups, every area read at full resolution by the screen's verdict against the
truth (usable / blurred / thick / thin or glass): where the judge loses usable areas and which
unusable ones it lets through. ``--json OUT`` also keeps, per slide, every read with its verdict, its
truth and the screen's figures (``read_details``), to study the judge offline without reading again.

Overview against the truth: ``--overview SLIDE OUT.png``.

Search or judge: ``--exhaustive SLIDE [SLIDE ...] [--step-um 32]`` reads every area on a grid inside the
smear's outline, judges them all with the selector's own judge, and prints per slide how many usable
areas (by the truth) the judge's accepted ones hold side by side, against the areas the selector chose:
accepted areas clear of the chosen ones are areas the search missed; where there are none, only another
judge (what counts as thin, thick or blurred) finds more.

Speed (one process, one core): ``--timing SLIDE [SLIDE ...]`` selects 2560x1920-px areas at
0.125 µm/px on each slide and prints seconds and decoded megapixels; ``--map-cost 100000x80000@0.125``
times the part that grows with the slide (smear map, dense search, picks) on a synthetic overview.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SMALL = (12000, 9000)
EIGHT = "apl:2,aml:2,healthy:2,reactive:2"
GROUPS = {
    # name: (seed, diagnoses, size, mpp, synth options)
    "small smears, 0.125 µm/px": (901, EIGHT, SMALL, 0.125, {}),
    "smears, 0.25 µm/px": (902, EIGHT, SMALL, 0.25, {}),
    "large smears (6x4.5 mm)": (903, "apl:1,aml:1,healthy:1", (24000, 18000), 0.25, {}),
    "narrow monolayer bands": (904, EIGHT, SMALL, 0.25, {"smear": "narrow"}),
    "held-out stain (leishman)": (905, "apl:1,aml:1,healthy:1,reactive:1", SMALL, 0.25, {"stain": "leishman"}),
    "entirely out of focus": (906, "apl:1,aml:1,healthy:1,reactive:1", SMALL, 0.25, {"defect": "blurred"}),
    "no monolayer zone": (907, "apl:1,aml:1,healthy:1,reactive:1", SMALL, 0.25, {"defect": "no_monolayer"}),
}
DEFECT_GROUPS = {"entirely out of focus", "no monolayer zone"}
BLUR_LIMIT_UM = 1.0
MONOLAYER_SHARE = 0.9


def make_cohort(root: Path, seed_offset: int = 0) -> None:
    from wsi_apl.synth.cohort import parse_diagnoses, synth_cohort

    for k, (name, (seed, dx, size, mpp, opts)) in enumerate(GROUPS.items()):
        out = root / f"g{k}"
        if (out / "labels.csv").exists():
            continue
        print(f"rendering group '{name}' in {out}", flush=True)
        synth_cohort(out, parse_diagnoses(dx), seed=seed + seed_offset, mpp=mpp, size=size, **opts)


def truth_maps(truth_dir: Path, truth: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """A slide's truth maps: zone codes, blur (µm, float32) and the maps' µm/px. Loaded once per file
    (each read and each chosen area of a slide is scored against the same maps)."""
    path = truth_dir / truth["maps"]
    return _load_maps(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_maps(path: str, _mtime_ns: int) -> tuple[np.ndarray, np.ndarray, float]:
    maps = np.load(path)
    return maps["zones"], maps["blur"].astype(np.float32), float(maps["map_mpp"])


def _window(box, slide_mpp: float, map_mpp: float) -> tuple[slice, slice]:
    """The truth-map cells under a level-0 ``box``."""
    x0, y0, x1, y1 = box
    return (slice(int(y0 * slide_mpp / map_mpp), int(np.ceil(y1 * slide_mpp / map_mpp))),
            slice(int(x0 * slide_mpp / map_mpp), int(np.ceil(x1 * slide_mpp / map_mpp))))


def truth_stats(truth_dir: Path, truth: dict, box, slide_mpp: float) -> tuple[float, float, float]:
    """Of a level-0 ``box``: its monolayer share, its worst truth blur, and the share of it that is
    monolayer and in focus at once (how much of an area that misses the >= 90 % / < 1 µm line is bad)."""
    z, b, m = truth_maps(truth_dir, truth)
    sl = _window(box, slide_mpp, m)
    return float((z[sl] == 2).mean()), float(b[sl].max()), float(((z[sl] == 2) & (b[sl] < BLUR_LIMIT_UM)).mean())


#: The screen's verdicts, shortened, and the truth classes of a read area (:func:`read_tally`).
VERDICTS = ("accepted", "too thick", "too thin", "blurred", "other")
TRUTH_CLASSES = ("usable", "blurred", "thick", "thin or glass")


def read_tally(truth_dir: Path, truth: dict, screened: list, slide_mpp: float) -> dict[str, int]:
    """Every area the screen read, by its verdict and by what the truth says of it: ``usable``
    (>= 90 % monolayer, blur < 1 µm everywhere), else ``blurred`` (blur >= 1 µm somewhere), else
    ``thick`` or ``thin or glass`` (whichever covers more of it). Keys ``"verdict|truth"``."""
    z, b, m = truth_maps(truth_dir, truth)
    tally: dict[str, int] = {}
    for box, meas in screened:
        sl = _window(box, slide_mpp, m)
        zz, blur = z[sl], float(b[sl].max())
        if blur >= BLUR_LIMIT_UM:
            cls = "blurred"
        elif (zz == 2).mean() >= MONOLAYER_SHARE:
            cls = "usable"
        else:
            cls = "thick" if np.isin(zz, (1, 4)).mean() >= np.isin(zz, (0, 3)).mean() else "thin or glass"
        verdict = next((v for v in VERDICTS[:4] if meas["verdict"].startswith(v)), "other")
        tally[f"{verdict}|{cls}"] = tally.get(f"{verdict}|{cls}", 0) + 1
    return tally


#: The screen's figures of a read kept in ``--json`` (:func:`read_details`), for analysis offline.
READ_FIELDS = ("coverage", "coverage_min_block", "coverage_max_block", "focus_worst_block", "overlap", "cells",
               "soft_block_um", "near_blur", "refined", "lowres_od_ratio", "lowres_off_share", "score")


def read_details(truth_dir: Path, truth: dict, screened: list, slide_mpp: float) -> list[dict]:
    """Every area the screen read, in order: its level-0 box, the verdict, the truth (monolayer share,
    worst blur, share in monolayer and focus) and the screen's figures (:data:`READ_FIELDS`)."""
    out = []
    for box, meas in screened:
        mono, blur, good = truth_stats(truth_dir, truth, box, slide_mpp)
        out.append({"box": [round(float(v), 1) for v in box], "verdict": meas["verdict"],
                    "truth_mono": round(mono, 4), "truth_blur_um": round(blur, 3), "truth_good": round(good, 4),
                    **{k: meas[k] for k in READ_FIELDS if k in meas}})
    return out


def usable_positions(truth_dir: Path, truth: dict, area_um: tuple[float, float]) -> tuple[np.ndarray, tuple[int, int]]:
    """Top-left positions (truth-map grid) where an area lies >= 90 % in the monolayer, all in focus."""
    z, b, m = truth_maps(truth_dir, truth)
    h, w = int(np.ceil(area_um[1] / m)), int(np.ceil(area_um[0] / m))
    if z.shape[0] < h or z.shape[1] < w:
        return np.zeros((0, 0), bool), (h, w)

    def box_sum(a):
        s = np.pad(a.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        return s[h:, w:] - s[:-h, w:] - s[h:, :-w] + s[:-h, :-w]

    mono = box_sum(z == 2) / (h * w)
    blurred = box_sum(b >= BLUR_LIMIT_UM)
    return (mono >= MONOLAYER_SHARE) & (blurred < 0.5), (h, w)


def truth_capacity(usable: np.ndarray, hw: tuple[int, int], cap: int = 3) -> int:
    """How many non-overlapping usable areas the truth allows (greedy, row by row), up to ``cap``."""
    free = usable.copy()
    h, w = hw
    n = 0
    while n < cap and free.any():
        j, i = np.unravel_index(int(np.argmax(free)), free.shape)
        n += 1
        free[max(0, j - h + 1):j + h, max(0, i - w + 1):i + w] = False
    return n


def agreement(root: Path, area=(512, 384), area_mpp=0.5) -> dict:
    from tile_selector.select import SelectorConfig, select_areas
    from tile_selector.slide import open_slide

    report = {}
    area_um = (area[0] * area_mpp, area[1] * area_mpp)
    for k, name in enumerate(GROUPS):
        folder = root / f"g{k}"
        rows = []
        for path in sorted(folder.glob("*.tiff")):
            truth = json.loads((folder / "truth" / f"{path.stem}.json").read_text())
            slide = open_slide(path)
            t0 = time.perf_counter()
            sel = select_areas(slide, area, area_mpp, SelectorConfig())
            dt = time.perf_counter() - t0
            stats = [truth_stats(folder / "truth", truth, a.box, slide.mpp) for a in sel.areas]
            usable, hw = usable_positions(folder / "truth", truth, area_um)
            rows.append({"slide": path.name, "status": sel.status, "reason": sel.reason, "seconds": dt,
                         "areas": len(sel.areas), "boxes": [list(a.box) for a in sel.areas],
                         "mono": [s[0] for s in stats], "blur": [s[1] for s in stats],
                         "good": [s[2] for s in stats],
                         "theta": (truth.get("smear") or {}).get("theta_deg"),
                         "usable_positions": int(usable.sum()), "capacity": truth_capacity(usable, hw),
                         "reads": read_tally(folder / "truth", truth, sel.screened, slide.mpp),
                         "read_details": read_details(folder / "truth", truth, sel.screened, slide.mpp)})
        report[name] = summarise(rows)
    sharp = [r for name in GROUPS if name not in DEFECT_GROUPS for r in report[name]["rows"]]
    for lo in (0, 45, 90, 135):
        rows = [r for r in sharp if r["theta"] is not None and lo <= r["theta"] % 180 < lo + 45]
        report[f"orientation {lo}-{lo + 45}°"] = summarise(rows)
    return report


def summarise(rows: list[dict]) -> dict:
    areas = [(m, b) for r in rows for m, b in zip(r["mono"], r["blur"])]
    good = [g for r in rows for g in r.get("good", [])]
    allow = [r for r in rows if r["capacity"] >= 1]
    three = [r for r in rows if r["capacity"] >= 3]
    return {
        "slides": len(rows),
        "inconclusive": sum(r["status"] == "inconclusive" for r in rows),
        "allow": len(allow),
        "falsely_inconclusive": sum(r["status"] == "inconclusive" for r in allow),
        "areas": len(areas),
        "areas_mono_and_in_focus": sum(1 for m, b in areas if m >= MONOLAYER_SHARE and b < BLUR_LIMIT_UM),
        "areas_in_mono": sum(1 for m, _ in areas if m >= MONOLAYER_SHARE),
        "worst_blur_um": max((b for _, b in areas), default=0.0),
        # the share of a chosen area's pixels in monolayer and focus: mean, and in the worst area
        "good_pixels_mean": float(np.mean(good)) if good else float("nan"),
        "good_pixels_worst": min(good, default=float("nan")),
        "allow_three": len(three),
        "mean_areas_where_three": float(np.mean([r["areas"] for r in three])) if three else float("nan"),
        "seconds_per_slide": float(np.mean([r["seconds"] for r in rows])) if rows else 0.0,
        "reads": {k: sum(r.get("reads", {}).get(k, 0) for r in rows)
                  for k in sorted({k for r in rows for k in r.get("reads", {})})},
        "rows": rows,
    }


def print_agreement(report: dict) -> None:
    print(f"{'group':28s} {'slides':>6s} {'allow':>6s} {'false inc.':>10s} {'inc.':>5s} {'areas':>6s} "
          f"{'mono+focus':>11s} {'mono':>6s} {'max blur':>9s} {'px good':>13s} {'>=3 allow':>9s} {'mean areas':>10s} "
          f"{'s/slide':>8s}")
    for name, g in report.items():
        share = g["areas_mono_and_in_focus"] / g["areas"] if g["areas"] else float("nan")
        mono = g["areas_in_mono"] / g["areas"] if g["areas"] else float("nan")
        false_inc = g["falsely_inconclusive"] / g["allow"] if g["allow"] else float("nan")
        print(f"{name:28s} {g['slides']:6d} {g['allow']:6d} {false_inc:10.0%} {g['inconclusive']:5d} {g['areas']:6d} "
              f"{share:11.1%} {mono:6.1%} {g['worst_blur_um']:7.2f}µm "
              f"{g.get('good_pixels_mean', float('nan')):6.1%}/{g.get('good_pixels_worst', float('nan')):5.0%} "
              f"{g['allow_three']:9d} "
              f"{g['mean_areas_where_three']:10.1f} {g['seconds_per_slide']:8.2f}")
    reads: dict[str, int] = {}
    for name, g in report.items():
        if name not in DEFECT_GROUPS and not name.startswith("orientation"):
            for k, v in g.get("reads", {}).items():
                reads[k] = reads.get(k, 0) + v
    if reads:
        print("\nEvery area read at full resolution on the sharp groups: the screen's verdict (rows) against the "
              "truth (columns)")
        print(f"{'':12s}" + "".join(f"{c:>15s}" for c in TRUTH_CLASSES))
        for v in VERDICTS:
            print(f"{v:12s}" + "".join(f"{reads.get(f'{v}|{c}', 0):15d}" for c in TRUTH_CLASSES))
        print()
    for name, g in report.items():
        if name.startswith("orientation"):
            continue
        for r in g["rows"]:
            if name in DEFECT_GROUPS and r["status"] != "inconclusive":
                print(f"  {name}: {r['slide']} chose {r['areas']} areas on a slide that should be inconclusive")
            elif name not in DEFECT_GROUPS and r["status"] == "inconclusive" and r["capacity"] >= 1:
                print(f"  {name}: {r['slide']} falsely inconclusive (truth: {r['usable_positions']} usable positions "
                      f"on a 4-µm grid): {r['reason']}")


def timing(paths: list[str]) -> None:
    from tile_selector.select import SelectorConfig, select_areas
    from tile_selector.slide import open_slide

    for p in paths:
        slide = open_slide(p)
        t0 = time.perf_counter()
        sel = select_areas(slide, (2560, 1920), 0.125, SelectorConfig())
        dt = time.perf_counter() - t0
        w, h = slide.dimensions
        print(f"{Path(p).name}: {w}x{h} px, {dt:.2f} s, {slide.pixels_read / 1e6:.1f} MP decoded, "
              f"{sel.status}, {len(sel.areas)} areas, {sel.candidates} candidates, timings {sel.timings}")


def map_cost(size: tuple[int, int], mpp: float, area=(2560, 1920), area_mpp=0.125, rounds: int = 8) -> None:
    """Seconds of the overview-side work of a slide of ``size`` px at ``mpp``: smear map, dense
    search and ``rounds`` rounds of picks, on a synthetic 4-µm/px overview (an elliptic smear of
    dotted cells). The full-resolution reads are bounded by the read budget, whatever the size."""
    from tile_selector.evidence import Limits, ReadEvidence
    from tile_selector.search import CandidateMap
    from tile_selector.select import OVERVIEW_MPP, SelectorConfig, _smear_map

    w, h = (int(round(v * mpp / OVERVIEW_MPP)) for v in size)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    smear = ((xx - w / 2) / (0.42 * w)) ** 2 + ((yy - h / 2) / (0.4 * h)) ** 2 <= 1
    dots = (rng.random((h, w)) < 0.45) & smear
    ov = np.full((h, w, 3), 240, np.uint8)
    ov[dots] = (170, 120, 170)
    del yy, xx
    t0 = time.perf_counter()
    sm = _smear_map(ov, OVERVIEW_MPP)
    t1 = time.perf_counter()
    sx = w / size[0]
    aw0, ah0 = area[0] * area_mpp / mpp, area[1] * area_mpp / mpp
    cm = CandidateMap(sm, OVERVIEW_MPP, sx, sx, aw0, ah0, SelectorConfig().border_um)
    reasons = cm.lattice_reasons()
    t2 = time.perf_counter()
    # each round: the moves the reads' pixels allow (tile_selector.evidence), then the overview's
    # best; every pick painted as a read (random covered pixels at the screen's 0.5 µm/px) and rejected
    cfg = SelectorConfig()
    sw, sh = (int(round(v * area_mpp / max(area_mpp, cfg.screen_mpp))) for v in area)
    ev = ReadEvidence(cm.smooth, cm.sx, cm.sy, cm.bh, cm.bw, (sw, sh), max(area_mpp, cfg.screen_mpp))
    limits = Limits(cfg.min_coverage, cfg.max_coverage, cfg.min_block_coverage, cfg.max_block_coverage)
    reads: list = []
    picked, refined, t_evidence = 0, 0, 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        moves = (cm.refined(ev, cfg.refine_per_round, limits, reads, np.zeros((0, 4)), 0.0, cfg.block_room)
                 if reads else [])
        t_evidence += time.perf_counter() - t
        refined += len(moves)
        for p in moves + cm.take(12 - len(moves), exclude=[m.box for m in moves]):
            fg = rng.random((sh, sw)) < 0.47  # the middle of the coverage range: every move predicts a pass
            t = time.perf_counter()
            ev.add(p.box, fg)
            t_evidence += time.perf_counter() - t
            reads.append((p.box, "rejected"))
            cm.suppress(p.box, 0.25)
            picked += 1
    t3 = time.perf_counter()
    print(f"{size[0]}x{size[1]} px at {mpp} µm/px: overview {w}x{h} px, map grid {cm.map_mpp:g} µm, "
          f"{cm.positions:,} positions, {len(reasons)} lattice places; smear map {t1 - t0:.2f} s, "
          f"search maps {t2 - t1:.2f} s, {rounds} rounds ({picked} picks, {refined} of them moves from the "
          f"reads' pixels) {t3 - t2:.2f} s, of which the reads' evidence {t_evidence:.2f} s")


def exhaustive(paths: list[str], step_um: float = 32.0, area=(512, 384), area_mpp=0.5) -> None:
    """Every area on a ``step_um`` grid inside the smear's outline, read and judged by the selector's own
    judge, against the areas the selector chose: whether the search or the judge loses the areas.

    Per slide: the areas chosen (how many usable by the truth), the areas read here, how many the judge
    accepts, how many of those lie side by side (:func:`tile_selector.search.pack`; usable by the truth),
    and how many accepted ones lie clear of the chosen areas. A search that misses what its judge would
    accept shows as accepted areas clear of the chosen ones; where there are none, only another judge
    (what counts as thin, thick or blurred) can find more.
    """
    from tile_selector.screen import judge, read_areas, white_point
    from tile_selector.search import pack, smear_outline
    from tile_selector.select import SelectorConfig, _overlaps, _smear_map, select_areas
    from tile_selector.slide import open_slide

    cfg = SelectorConfig()
    screen_mpp = max(area_mpp, cfg.screen_mpp)
    size = tuple(int(round(v * area_mpp / screen_mpp)) for v in area)
    more = 0
    for p in paths:
        path = Path(p)
        truth = json.loads((path.parent / "truth" / f"{path.stem}.json").read_text())
        slide = open_slide(path)
        sel = select_areas(slide, area, area_mpp, cfg)
        ov, ov_mpp = sel.overview, sel.overview_mpp  # the overview the selection read
        sm = _smear_map(ov, ov_mpp)
        (w0, h0), s = slide.dimensions, ov.shape[1] / slide.dimensions[0]  # overview px per level-0 px
        aw0, ah0 = area[0] * area_mpp / slide.mpp_x, area[1] * area_mpp / slide.mpp_y
        outline = smear_outline(sm["smear"], ov_mpp, 0.5 * aw0 * ah0 * s * s)
        step = step_um / slide.mpp_x
        grid = [(x, y) for y in np.arange(0.0, h0 - ah0, step) for x in np.arange(0.0, w0 - aw0, step)]
        boxes = [(x, y, x + aw0, y + ah0) for x, y in grid
                 if outline[int(y * s):int((y + ah0) * s) + 1, int(x * s):int((x + aw0) * s) + 1].mean() >= 0.9]
        white = white_point(ov)
        # the plasma level from 12 areas spread over the smear (the screen's first round spreads likewise)
        plasma, _ = read_areas(slide, boxes[::max(1, len(boxes) // 12)][:12], size, screen_mpp, white)
        screened = []
        for k in range(0, len(boxes), 12):
            _, reads = read_areas(slide, boxes[k:k + 12], size, screen_mpp, white, plasma)
            for box, m in reads:
                m.pop("_fg")
                screened.append((box, m))
        accepted, _, _ = judge(screened, cfg, slide.mpp_x)

        def usable(box) -> bool:
            mono, blur, _ = truth_stats(path.parent / "truth", truth, box, slide.mpp)
            return mono >= MONOLAYER_SHARE and blur < BLUR_LIMIT_UM

        chosen = [a.box for a in sel.areas]
        good = [b for b, _ in accepted if usable(b)]
        clear = [b for b, _ in accepted if not any(_overlaps(b, c) for c in chosen)]
        clear_good = [b for b in clear if usable(b)]
        n_sel = sum(usable(b) for b in chosen)
        n_pack = len(pack(good))
        more += max(0, n_pack - n_sel)
        print(f"{path.name}: chose {len(chosen)} ({n_sel} usable); read {len(screened)} on a {step_um:g}-µm grid, "
              f"judge accepts {len(accepted)} ({len(good)} usable), {len(pack([b for b, _ in accepted]))} side by side "
              f"({n_pack} usable); clear of the chosen: {len(clear)} ({len(pack(clear_good))} usable side by side)",
              flush=True)
    print(f"usable areas side by side that the exhaustive read finds beyond the selector's: {more} "
          f"over {len(paths)} slides")


def truth_overview(slide_path: str, out_png: str, area=(512, 384), area_mpp=0.5) -> None:
    """Side by side: the selector's overview (its own zones) and the same areas on the truth zones,
    with the truth's out-of-focus parts (blur >= 1 µm) hatched."""
    from PIL import Image, ImageDraw

    from tile_selector.overview import overview_image
    from tile_selector.select import SelectorConfig, select_areas
    from tile_selector.slide import open_slide

    path = Path(slide_path)
    truth = json.loads((path.parent / "truth" / f"{path.stem}.json").read_text())
    zones, blur_map, _ = truth_maps(path.parent / "truth", truth)
    slide = open_slide(path)
    sel = select_areas(slide, area, area_mpp, SelectorConfig())
    left = overview_image(sel, slide.dimensions)
    h, w = sel.zone_map.shape
    z = np.asarray(Image.fromarray(zones).resize((w, h), Image.Resampling.NEAREST))
    blur = np.asarray(Image.fromarray(blur_map).resize((w, h), Image.Resampling.NEAREST))
    sel.zone_map = z
    right = overview_image(sel, slide.dimensions)
    hatch = np.asarray(Image.fromarray(((blur >= BLUR_LIMIT_UM) * 255).astype(np.uint8)).resize(right.size))
    r = np.asarray(right).copy()
    yy, xx = np.mgrid[0:r.shape[0], 0:r.shape[1]]
    r[(hatch > 0) & (((xx + yy) // 4) % 3 == 0)] = (40, 40, 40)
    right = Image.fromarray(r)
    ImageDraw.Draw(left).text((4, left.size[1] - 14), "selector's own zone estimate", fill=(0, 0, 0))
    ImageDraw.Draw(right).text((4, right.size[1] - 14), "ground truth zones; hatched: blur >= 1 um",
                               fill=(0, 0, 0))
    both = Image.new("RGB", (left.size[0] + right.size[0] + 8, max(left.size[1], right.size[1])), (255, 255, 255))
    both.paste(left, (0, 0))
    both.paste(right, (left.size[0] + 8, 0))
    both.save(out_png)
    print(f"{out_png}: {len(sel.areas)} areas of {path.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, default=Path("/tmp/selector-cohort"))
    ap.add_argument("--seed-offset", type=int, default=0, help="-100 gives the tuning cohort (seeds 801-807)")
    ap.add_argument("--render-only", action="store_true", help="render the cohort and stop")
    ap.add_argument("--timing", nargs="*", default=None)
    ap.add_argument("--map-cost", default=None, metavar="WxH@MPP",
                    help="time the overview-side work for a slide of that size, e.g. 100000x80000@0.125")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--exhaustive", nargs="+", metavar="SLIDE", default=None,
                    help="read every area on a grid and judge it: does the search or the judge lose areas?")
    ap.add_argument("--step-um", type=float, default=32.0, help="the grid of --exhaustive (µm)")
    ap.add_argument("--overview", nargs=2, metavar=("SLIDE", "OUT_PNG"), default=None,
                    help="draw the chosen areas on the selector's zones and on the truth zones")
    args = ap.parse_args()
    if args.overview:
        truth_overview(*args.overview)
        return
    if args.exhaustive:
        exhaustive(args.exhaustive, args.step_um)
        return
    if args.map_cost:
        dims, mpp = args.map_cost.split("@")
        map_cost(tuple(int(v) for v in dims.split("x")), float(mpp))
        return
    if args.timing:
        timing(args.timing)
        return
    make_cohort(args.cohort, seed_offset=args.seed_offset)
    if args.render_only:
        return
    report = agreement(args.cohort)
    print_agreement(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
