"""``wsi-apl evaluate``: detector, cell heads and slide-level call on labelled slides the models never saw."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from workers.area import load_cells, load_detector, load_models
from workers.bundle import load_bundle
from workers.classifier import classify
from workers.detector import detect

from .metrics import auroc, binary_summary, coco_metrics, match_detections
from .slide_eval import evaluate_rows, results_rows, scan_rows
from .train.cells import CellSet
from .train.data import SlideEntry, area_samples
from .train.steps import cell_size, collect_samples


def _score_images(det, cfg, device, samples, name) -> dict:
    images, per_image = [], []
    for s in samples:
        boxes, scores, _ = detect(det, s.image, cfg, device, score_threshold=0.05)
        images.append((boxes, scores, s.boxes))
        keep = scores >= cfg.score_threshold
        tp = match_detections(boxes[keep], scores[keep], s.boxes, 0.5)
        per_image.append({name: s.extra.get("image", s.slide), "truth": int(len(s.boxes)),
                          "detected": int(keep.sum()), "missed": int(len(s.boxes) - tp.sum()),
                          "spurious": int((~tp).sum())})
    m = coco_metrics(images)
    m["per_image"] = per_image
    m["missed"] = int(sum(p["missed"] for p in per_image))
    m["spurious"] = int(sum(p["spurious"] for p in per_image))
    m["score_threshold"] = cfg.score_threshold
    return m


def evaluate_detector(bundle_dir: Path, entries: list[SlideEntry], log: Callable[[str], None] = print) -> dict:
    """COCO AP/AR of the detector on the areas the selector picks in ``entries`` (filled up with areas of
    the truth's monolayer zone where it picks fewer than six), against the truth boxes."""
    bundle = load_bundle(bundle_dir)
    det, cfg, dev = load_detector(bundle)
    samples = []
    for e in entries:
        samples += area_samples(e, bundle.area_size, bundle.mpp, n_random=0)
        log(f"  {e.slide}: {len(samples)} areas so far")
    return _score_images(det, cfg, dev, samples, "slide")


def evaluate_detector_pictures(bundle_dir: Path, via: Path | None, voc: Path | None, images: Path | None,
                               classes: list[str] | None, image_mpp: float | None,
                               log: Callable[[str], None] = print) -> dict:
    """COCO AP/AR of the detector on annotated pictures (VIA project or VOC folder).

    Pictures are resampled to the bundle's resolution when both pixel sizes are known; a bundle
    without a pixel size reads them at their own pixels.
    """
    from .train.steps import picture_samples

    bundle = load_bundle(bundle_dir)
    det, cfg, dev = load_detector(bundle)
    work = _picture_mpp(bundle, image_mpp, "--mpp", log)
    samples = picture_samples(via, voc, images, classes, image_mpp, work, log)
    return _score_images(det, cfg, dev, samples, "image")


def detected_samples(samples: list, det, cfg, device) -> tuple[list, int]:
    """The samples with their *detected* cells instead of the truth boxes: each detection takes the
    type and Auer-rod label of the truth cell it matches (IoU >= 0.5); an unmatched detection is
    negative for every head (a spurious box is no myeloblast). Returns (samples, missed truth cells)."""
    import dataclasses

    from .metrics import match_indices

    out, missed = [], 0
    for s in samples:
        boxes, scores, _ = detect(det, s.image, cfg, device)
        j = match_indices(boxes, scores, s.boxes, 0.5)
        missed += int(len(s.boxes) - (j >= 0).sum())
        types = [s.types[k] if k >= 0 else "" for k in j]
        auer = np.array([bool(s.auer[k]) if k >= 0 else False for k in j], bool)
        out.append(dataclasses.replace(s, boxes=boxes, types=types, auer=auer))
    return out, missed


def evaluate_cells(bundle_dir: Path, entries: list[SlideEntry], *, detected: bool = False,
                   curves_dir: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Per-head AUROC / AUPRC with bootstrap CIs (resampling patients) and the confusion at each head's
    threshold. On the ground-truth boxes (the heads alone) or, ``detected``, on the detector's boxes
    matched to the truth (detector and heads together). ``curves_dir``: ROC / PR curves as PNG."""
    models = load_models(bundle_dir)
    b = models.bundle
    cfg = models.cell_cfg
    samples = sum(collect_samples(entries, _geom(b), log, n_random=0, cells=cell_size(_geom(b), cfg)), [])
    missed = None
    if detected:
        samples, missed = detected_samples(samples, models.detector, models.det_cfg, models.device)
        log(f"  detected cells: {sum(len(s.boxes) for s in samples)}, truth cells missed by the detector: {missed}")
    cs = CellSet.from_samples(samples, cfg.heads, b.mpp)
    out = _head_summaries(models.cells, cfg, models.device, cs, curves_dir, log)
    out.update({"slides": len(entries), "boxes": "detected" if detected else "truth"})
    if missed is not None:
        out["missed_by_detector"] = missed
    return out


def evaluate_labelled_cells(bundle_dir: Path, src, curves_dir: Path | None = None,
                            log: Callable[[str], None] = print) -> dict:
    """Per-head AUROC / AUPRC of the bundle's heads on labelled cells of pictures: a cells CSV or a VIA
    project (as for ``wsi-apl train cells``), the paper's layout and class-folder sets, alone or
    together (``src``: :class:`~wsi_apl.train.sources.CellSources`); heads without any label there
    are left out. Folder sets are read at their own stated pixel size; the others at ``--image-mpp``
    when given (else their own pixels, taken to be those the heads were trained on)."""
    from .train.sources import _join, picture_cells

    b = load_bundle(bundle_dir)
    model, cfg, dev = load_cells(b)
    work = _picture_mpp(b, src.image_mpp, "--image-mpp", log) if (src.cells_csv or src.via) else None
    cell_mpp = cfg.cell_mpp(b.mpp) if b.mpp_known else None
    if src.folders and cell_mpp is None:
        raise ValueError(f"{bundle_dir}: its heads work at the pictures' own pixels (no pixel size); folder sets "
                         "need a bundle with one")
    csv_work = cfg.cell_mpp(work) if work else None
    sets, notes, report = [], [], None
    if src.cells_csv or src.via:
        from .train.sources import CellSources

        one = CellSources(cells_csv=src.cells_csv, via=src.via, images=src.images, image_mpp=src.image_mpp)
        s1, _, _ = picture_cells(one, cfg.heads, csv_work, cfg.crop_um, log)
        if src.image_mpp is None and b.mpp_known:
            s1[0].mpp = cfg.cell_mpp(b.mpp)  # own pixels, taken to be those the heads were trained on
        sets += s1
    if src.paper is not None or src.folders:
        from .train.sources import CellSources

        rest = CellSources(paper=src.paper, folders=src.folders, image_mpp=src.image_mpp)
        from .train.sources import BY_PICTURE_CI

        s2, notes, report = picture_cells(rest, cfg.heads, cell_mpp, cfg.crop_um, log)
        notes = [BY_PICTURE_CI] if notes else []
        sets += s2
    if not sets:
        raise ValueError("no labelled cells to evaluate")
    mpps = {round(c.mpp, 6) for c in sets}
    if len(mpps) > 1:
        raise ValueError("the sources are read at different pixel sizes; give --image-mpp for --cells/--via")
    cs = _join(sets)
    out = _head_summaries(model, cfg, dev, cs, curves_dir, log)
    out.update({"pictures": len(cs.images), "boxes": "labelled", "source": src.describe()})
    if report is not None:
        out["read"] = report.to_json()
    if notes:
        out["notes"] = notes
        for n in notes:
            log(f"  note: {n}")
    return out


def _picture_mpp(bundle, image_mpp: float | None, option: str, log: Callable[[str], None]) -> float | None:
    """The resolution pictures are resampled to: the bundle's when both pixel sizes are known, else
    None (their own pixels, said aloud when the bundle has one)."""
    if bundle.mpp_known and image_mpp is None:
        log(f"  note: the bundle works at {bundle.mpp} µm/px and the pictures' pixel size is unknown: they are "
            f"read at their own pixels (give {option} to resample them)")
    return bundle.mpp if bundle.mpp_known and image_mpp else None


def _head_summaries(model, cfg, device, cs: CellSet, curves_dir: Path | None,
                    log: Callable[[str], None]) -> dict:
    """Classify ``cs`` and summarise each head that has labels: AUROC / AUPRC with patient-bootstrap
    CIs, the confusion at the head's threshold, curves as PNG when ``curves_dir``."""
    crops = cs.crops(cfg)
    p = classify(model, crops, device)
    heads = {}
    for j, h in enumerate(cfg.heads):
        y = cs.labels[:, j]
        ok = ~np.isnan(y)
        if not ok.any():
            log(f"  {h}: no labelled cells")
            continue
        s = binary_summary(y[ok].astype(bool), p[ok, j], cfg.threshold(h), groups=cs.patients[ok], n_boot=300)
        if curves_dir is not None:
            from .plots import curves_png

            Path(curves_dir).mkdir(parents=True, exist_ok=True)
            s["curves_png"] = str(curves_png(y[ok], p[ok, j], Path(curves_dir) / f"{h}.png", h))
        heads[h] = s
        log(f"  {h}: AUROC {s['auroc']:.3f} [{s['auroc_ci'][0]:.3f}, {s['auroc_ci'][1]:.3f}], "
            f"AUPRC {s['auprc']:.3f} ({s['positives']} positives of {s['n']}); at {s['threshold']:.2f}: "
            + ", ".join(f"{k.upper()} {v}" for k, v in s["confusion"].items()))
        within = _within_types(cs, cfg.heads, j, p[:, j])
        if within:
            s["auroc_within"] = within
            log(f"    {h} within each cell type (does the head see the finding, or the cell type?): "
                + ", ".join(f"{t} {v['auroc']:.3f} ({v['positives']} of {v['n']})" for t, v in within.items()))
    out = {"heads": heads, "cells": len(cs)}
    pair = _promyelocytes_vs_blasts(cs, cfg.heads, p)
    if pair:
        out["promyelocyte_vs_myeloblast"] = pair
        log("  promyelocytes against blasts (APL against AML turns on this pair): "
            + ", ".join(f"{h} head AUROC {v['auroc']:.3f} [{v['auroc_ci'][0]:.3f}, {v['auroc_ci'][1]:.3f}]"
                        for h, v in pair["heads"].items())
            + f" ({pair['promyelocytes']} promyelocytes, {pair['myeloblasts']} blasts)")
    return out


def _promyelocytes_vs_blasts(cs: CellSet, heads: tuple[str, ...], p: np.ndarray) -> dict:
    """Among the cells that are promyelocytes or blasts (one of the two only): how well each of the
    two heads tells them apart (positive: promyelocyte; the myeloblast head's score is turned round)."""
    from .metrics import bootstrap_ci

    if "promyelocyte" not in heads or "myeloblast" not in heads:
        return {}
    jp, jb = heads.index("promyelocyte"), heads.index("myeloblast")
    yp, yb = cs.labels[:, jp], cs.labels[:, jb]
    sel = ((yp == 1) & (yb == 0)) | ((yp == 0) & (yb == 1))
    if not ((yp[sel] == 1).any() and (yb[sel] == 1).any()):
        return {}
    y = (yp[sel] == 1).astype(bool)
    out = {"promyelocytes": int(y.sum()), "myeloblasts": int((~y).sum()), "heads": {}}
    for h, score in (("promyelocyte", p[sel, jp]), ("myeloblast", -p[sel, jb])):
        lo, hi = bootstrap_ci(auroc, y, score, 300, groups=cs.patients[sel])
        out["heads"][h] = {"auroc": float(auroc(y, score)), "auroc_ci": [lo, hi]}
    return out


def _within_types(cs: CellSet, heads: tuple[str, ...], j: int, p: np.ndarray) -> dict:
    """AUROC of finding head ``j`` (Auer rod, faggot cell) among the cells of one labelled type only
    (myeloblasts, promyelocytes): a head that ranks by cell type scores about 0.5 here."""
    from .train.cell_labels import TYPE_HEADS

    if heads[j] in TYPE_HEADS:
        return {}
    out = {}
    y = cs.labels[:, j]
    for k, t in enumerate(heads):
        if t not in TYPE_HEADS:
            continue
        sel = (cs.labels[:, k] == 1) & ~np.isnan(y)
        if sel.any() and 0 < y[sel].sum() < sel.sum():
            out[t] = {"auroc": float(auroc(y[sel], p[sel])), "positives": int(y[sel].sum()), "n": int(sel.sum())}
    return out


def _geom(b):
    from .train.steps import Geometry

    return Geometry(mpp=b.mpp, area=b.area_size)


def evaluate_enn(bundle_dir: Path, entries: list[SlideEntry], *, max_areas: int = 12, target_cells: int = 0,
                 results: Path | None = None, curves_dir: Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Score both tasks and the triage decision on labelled slides: scanned here, or read from the
    results folder of ``wsi-apl scan`` (``results``). See :mod:`wsi_apl.slide_eval`."""
    bundle = load_bundle(bundle_dir)
    bundle.require("detector", "cells", "slide_nets")
    if results is not None:
        rows = results_rows(results, entries, log=log)
    else:
        rows = scan_rows(bundle, entries, max_areas=max_areas, target_cells=target_cells, log=log)
    out = evaluate_rows(rows, bundle, curves_dir=curves_dir)
    out["bundle"] = bundle.label
    return out


PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def propose(images_dir: Path, bundle_dir: Path, out: Path, image_mpp: float | None = None,
            score_threshold: float | None = None, log: Callable[[str], None] = print) -> dict:
    """The detector's cells on every picture of ``images_dir``, written as a VIA 2 project to correct.

    Boxes are in the pictures' own pixels (resampled for the detector when both pixel sizes are
    known and back again); each region carries ``label`` "cell" and the detector's ``score``.
    """
    from .annotations import ImageAnnotation, write_via
    from .train.data import read_picture

    bundle = load_bundle(bundle_dir)
    det, cfg, dev = load_detector(bundle)
    pictures = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in PICTURE_SUFFIXES)
    if not pictures:
        raise FileNotFoundError(f"{images_dir}: no pictures ({', '.join(PICTURE_SUFFIXES)}) to propose cells on")
    thr = cfg.score_threshold if score_threshold is None else score_threshold
    items, scores = [], []
    total = 0
    for p in pictures:
        img, f = read_picture(p, image_mpp, bundle.mpp if bundle.mpp_known else None)
        boxes, sc, _ = detect(det, img, cfg, dev, score_threshold=thr)
        boxes = boxes / np.float32(f)
        items.append(ImageAnnotation(p, boxes, ["cell"] * len(boxes), [{} for _ in range(len(boxes))], p.stem, {}))
        scores.append(sc)
        total += len(boxes)
        log(f"  {p.name}: {len(boxes)} cells")
    write_via(out, items, scores)
    return {"images": len(items), "cells": total, "out": str(out), "score_threshold": thr}
