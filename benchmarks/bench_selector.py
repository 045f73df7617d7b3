"""Area selector against the synthetic ground truth, and its speed on whole slides.

Agreement (held-out synthetic cohort; seeds 701-705 were not used while tuning, which used 601):

    python benchmarks/bench_selector.py --cohort /tmp/selector-cohort

renders (once) 24 sharp slides of every diagnosis and orientation, 8 slides in the held-out stain
preset ``leishman``, 8 with strong JPEG compression (quality 60), 6 slides entirely out of focus
and 6 without a monolayer zone (12000x9000 px at 0.25 µm/px: 3 x 2.25 mm), selects areas of 512x384 px at
0.5 µm/px (256x192 µm, the demo bundle's geometry) and prints, per group:

- the share of slides ending ``inconclusive`` (should be ~0 for sharp groups, 100 % for defects),
- the share of chosen areas lying in the monolayer zone (>= 90 % of the area) and in focus (truth
  blur < 1 µm everywhere in the area), the number of chosen areas overlapping a blurred patch
  (truth blur >= 1 µm anywhere in the area) and the worst truth blur inside a chosen area,
- for each slide whose status is unexpected, the share of the slide where the truth would have
  allowed a usable area (0 %: ``inconclusive`` was right after all).

Overview against the truth: ``--overview SLIDE OUT.png``.

Speed (one process, one core): ``--timing SLIDE [SLIDE ...]`` selects 2560x1920-px areas at
0.125 µm/px on each slide and prints seconds and decoded megapixels.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

GROUPS = {
    # name: (seed, diagnoses, synth options)
    "sharp": (701, "apl:6,aml:6,healthy:6,reactive:6", {}),
    "held-out stain (leishman)": (702, "apl:2,aml:2,healthy:2,reactive:2", {"stain": "leishman"}),
    "JPEG quality 60": (703, "apl:2,aml:2,healthy:2,reactive:2", {"jpeg_quality": 60}),
    "entirely out of focus": (704, "apl:2,aml:2,healthy:1,reactive:1", {"defect": "blurred"}),
    "no monolayer zone": (705, "apl:2,aml:2,healthy:1,reactive:1", {"defect": "no_monolayer"}),
}
DEFECT_GROUPS = {"entirely out of focus", "no monolayer zone"}
BLUR_LIMIT_UM = 1.0


def make_cohort(root: Path, size=(12000, 9000), mpp=0.25, seed_offset: int = 0) -> None:
    from wsi_apl.synth.cohort import parse_diagnoses, synth_cohort

    for k, (name, (seed, dx, opts)) in enumerate(GROUPS.items()):
        out = root / f"g{k}"
        if (out / "labels.csv").exists():
            continue
        print(f"rendering group '{name}' in {out}", flush=True)
        synth_cohort(out, parse_diagnoses(dx), seed=seed + seed_offset, mpp=mpp, size=size, **opts)


def truth_stats(truth_dir: Path, truth: dict, box, slide_mpp: float) -> tuple[float, float]:
    maps = np.load(truth_dir / truth["maps"])
    z, b, m = maps["zones"], maps["blur"].astype(np.float32), float(maps["map_mpp"])
    x0, y0, x1, y1 = box
    sl = (slice(int(y0 * slide_mpp / m), int(np.ceil(y1 * slide_mpp / m))),
          slice(int(x0 * slide_mpp / m), int(np.ceil(x1 * slide_mpp / m))))
    return float((z[sl] == 2).mean()), float(b[sl].max())


def usable_share(truth_dir: Path, truth: dict, area_um: tuple[float, float]) -> float:
    """Share of the slide where an area could start and lie >= 90 % in the monolayer, all in focus (truth)."""
    from scipy import ndimage

    maps = np.load(truth_dir / truth["maps"])
    z, b, m = maps["zones"], maps["blur"].astype(np.float32), float(maps["map_mpp"])
    size = (int(np.ceil(area_um[1] / m)), int(np.ceil(area_um[0] / m)))
    mono = ndimage.uniform_filter((z == 2).astype(np.float32), size, mode="constant")
    sharp = ndimage.minimum_filter((b < BLUR_LIMIT_UM).astype(np.float32), size, mode="constant")
    return float(((mono >= 0.9) & (sharp > 0.5)).mean())


def agreement(root: Path, area=(512, 384), area_mpp=0.5) -> dict:
    from tile_selector.select import SelectorConfig, select_areas
    from tile_selector.slide import open_slide

    report = {}
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
            rows.append({"slide": path.name, "status": sel.status, "reason": sel.reason, "seconds": dt,
                         "areas": len(sel.areas), "mono": [s[0] for s in stats], "blur": [s[1] for s in stats],
                         "theta": (truth.get("smear") or {}).get("theta_deg"),
                         "usable_share": usable_share(folder / "truth", truth, (area[0] * area_mpp, area[1] * area_mpp))})
        areas = [(m, b) for r in rows for m, b in zip(r["mono"], r["blur"])]
        good = sum(1 for m, b in areas if m >= 0.9 and b < BLUR_LIMIT_UM)
        report[name] = {
            "slides": len(rows),
            "inconclusive": sum(r["status"] == "inconclusive" for r in rows),
            "areas": len(areas),
            "areas_mono_and_in_focus": good,
            "areas_in_mono": sum(1 for m, _ in areas if m >= 0.9),
            "areas_overlapping_blur": sum(1 for _, b in areas if b >= BLUR_LIMIT_UM),
            "worst_blur_um": max((b for _, b in areas), default=0.0),
            "seconds_per_slide": float(np.mean([r["seconds"] for r in rows])) if rows else 0.0,
            "rows": rows,
        }
    return report


def print_agreement(report: dict) -> None:
    print(f"{'group':28s} {'slides':>6s} {'inconcl.':>9s} {'areas':>6s} {'mono+focus':>11s} {'mono':>6s} "
          f"{'on blur':>8s} {'max blur':>9s} {'s/slide':>8s}")
    for name, g in report.items():
        share = g["areas_mono_and_in_focus"] / g["areas"] if g["areas"] else float("nan")
        mono = g["areas_in_mono"] / g["areas"] if g["areas"] else float("nan")
        inc = g["inconclusive"] / g["slides"] if g["slides"] else float("nan")
        print(f"{name:28s} {g['slides']:6d} {inc:9.0%} {g['areas']:6d} {share:11.1%} {mono:6.1%} "
              f"{g['areas_overlapping_blur']:8d} {g['worst_blur_um']:7.2f}µm {g['seconds_per_slide']:8.2f}")
    for name, g in report.items():
        for r in g["rows"]:
            expected_inconclusive = name in DEFECT_GROUPS
            if (r["status"] == "inconclusive") != expected_inconclusive:
                print(f"  {name}: {r['slide']} {r['status']} {r['reason']} (truth: usable areas could start on "
                      f"{r['usable_share']:.2%} of the slide)")


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


def truth_overview(slide_path: str, out_png: str, area=(512, 384), area_mpp=0.5) -> None:
    """Side by side: the selector's overview (its own zones) and the same areas on the truth zones,
    with the truth's out-of-focus parts (blur >= 1 µm) hatched."""
    from PIL import Image, ImageDraw

    from tile_selector.overview import overview_image
    from tile_selector.select import SelectorConfig, select_areas
    from tile_selector.slide import open_slide

    path = Path(slide_path)
    truth = json.loads((path.parent / "truth" / f"{path.stem}.json").read_text())
    maps = np.load(path.parent / "truth" / truth["maps"])
    slide = open_slide(path)
    sel = select_areas(slide, area, area_mpp, SelectorConfig())
    left = overview_image(sel, slide.dimensions)
    h, w = sel.zone_map.shape
    z = np.asarray(Image.fromarray(maps["zones"]).resize((w, h), Image.Resampling.NEAREST))
    blur = np.asarray(Image.fromarray(maps["blur"].astype(np.float32)).resize((w, h), Image.Resampling.NEAREST))
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
    ap.add_argument("--seed-offset", type=int, default=0, help="-100 gives the tuning cohort (seeds 601-605)")
    ap.add_argument("--timing", nargs="*", default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--overview", nargs=2, metavar=("SLIDE", "OUT_PNG"), default=None,
                    help="draw the chosen areas on the selector's zones and on the truth zones")
    args = ap.parse_args()
    if args.overview:
        truth_overview(*args.overview)
        return
    if args.timing:
        timing(args.timing)
        return
    make_cohort(args.cohort, seed_offset=args.seed_offset)
    report = agreement(args.cohort)
    print_agreement(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
