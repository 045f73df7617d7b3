"""``wsi-apl demo``: the main job end to end on synthetic data, with the embedded LocalCluster.

1. a training cohort (APL, AML, healthy, reactive) with ground truth;
2. a small bundle: detector and cell heads on some patients, slide-level nets on the others;
3. a held-out cohort (other seed, other patients) scanned like a night's batch;
4. the accuracy the models reached on the held-out cohort, and where the triage list is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from .status import DECISION_SUPPORT


def run_demo(out: Path, quick: bool = False, log: Callable[[str], None] = print) -> int:
    from .evaluate import evaluate_cells, evaluate_detector
    from .ledger import Ledger
    from .scan import ScanOptions, scan
    from .slide_eval import summarise_slide_results
    from .synth.cohort import parse_diagnoses, synth_cohort
    from .train.data import read_cohort
    from .train.steps import Geometry, train_all

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = (12000, 9000)  # 3 x 2.25 mm: enough monolayer for several areas on most smears
    mpp = 0.25
    n_train = 3 if quick else 5
    n_test = 1 if quick else 3
    log("wsi-apl demo — synthetic slides, demo models: not for diagnosis. " + DECISION_SUPPORT)
    log(f"[1/4] Training cohort: {4 * n_train} synthetic smears ({size[0]}x{size[1]} px at {mpp} µm/px)")
    cohort = out / "training_cohort"
    if not (cohort / "labels.csv").exists():
        synth_cohort(cohort, parse_diagnoses(f"apl:{n_train},aml:{n_train},healthy:{n_train},reactive:{n_train}"),
                     seed=11, mpp=mpp, size=size, log=lambda s: log("  " + s))
    log("[2/4] Training the bundle (detector, cell heads, slide-level nets)")
    bundle_dir = out / "bundle"
    bundle = train_all(cohort, bundle_dir, geometry=Geometry(0.5, (512, 384)),
                       detector_epochs=4 if quick else 14, cells_epochs=3 if quick else 12,
                       min_cells=60 if quick else 100, name="demo-synthetic", max_areas=8, target_cells=400,
                       log=lambda s: log("  " + s))
    t_train = time.time()
    log(f"[3/4] Held-out cohort: {4 * n_test} slides of other patients (seed 22)")
    slides = out / "slides"
    if not (slides / "labels.csv").exists():
        synth_cohort(slides, parse_diagnoses(f"apl:{n_test},aml:{n_test},healthy:{n_test},reactive:{n_test}"),
                     seed=22, mpp=mpp, size=size, log=lambda s: log("  " + s))
    test_entries = read_cohort(slides)
    det = evaluate_detector(bundle_dir, test_entries, log=lambda s: None)
    cells = evaluate_cells(bundle_dir, test_entries, log=lambda s: None)
    log(f"[4/4] Scanning {slides} with the embedded Dask LocalCluster")
    results = out / "results"
    summary = scan(ScanOptions(slides=slides, out=results, bundle=bundle_dir, max_areas=8, target_cells=400,
                               allow_synthetic=True),
                   log=lambda s: log("  " + s))
    led = Ledger(results)
    try:
        rows = {r["name"]: r for r in led.rows()}
    finally:
        led.close()
    scored = [(e.diagnosis, e.patient, (rows.get(e.path.name) or {}).get("result") or {"status": "failed"})
              for e in test_entries]
    slide_summary = summarise_slide_results(scored, bundle.part("slide_nets").get("decision", {}))
    report = {"detector": {k: det[k] for k in ("AP50", "AP", "AR50", "AR", "images")},
              "cells": {h: {"auroc": v["auroc"], "auroc_ci": v["auroc_ci"], "auroc_within": v.get("auroc_within", {})}
                        for h, v in cells["heads"].items()},
              "slides": slide_summary, "scan": summary, "seconds": round(time.time() - t0, 1),
              "training_seconds": round(t_train - t0, 1), "bundle": bundle.label}
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=float))
    log("")
    log("Accuracy reached on the held-out synthetic cohort (synthetic slides, not patients):")
    log(f"  cell detector: AP@0.5 {det['AP50']:.3f}, AP@0.5:0.95 {det['AP']:.3f} on {det['images']} areas")
    for h, v in cells["heads"].items():
        log(f"  {h} head: AUROC {v['auroc']:.3f} (95% CI {v['auroc_ci'][0]:.3f}-{v['auroc_ci'][1]:.3f})"
            + ("; within " + ", ".join(f"{t}s {w['auroc']:.3f}" for t, w in v["auroc_within"].items())
               if v.get("auroc_within") else ""))
    tri = slide_summary["triage"]
    log(f"  slide call: {tri['apl_flagged']}/{tri['apl_total']} APL slides flagged "
        f"({tri['apl_inconclusive']} inconclusive), {tri['non_apl_flagged']}/{tri['non_apl_total']} non-APL flagged")
    log(f"Triage list: {summary['triage']}")
    log(f"Cell store:  {summary['store']}")
    log(f"Report:      {out / 'demo_report.json'}")
    log(f"Demo finished in {time.time() - t0:.0f} s. {DECISION_SUPPORT}")
    return 0
