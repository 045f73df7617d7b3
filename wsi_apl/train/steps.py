"""The training steps behind ``wsi-apl train detector|cells|enn|all``, each adding its part to a bundle."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tile_selector.select import SelectorConfig
from workers.area import cell_read, load_models
from workers.bundle import ModelBundle, create_bundle, load_bundle, save_part
from workers.classifier import HEADS, CellConfig
from workers.detector import DetectorConfig

from ..features import feature_names
from ..pipeline import SlideAnalysis
from .augment import DEFAULT_STAIN_AUG
from .cells import CellSet, cross_validate, search_heads, train_cells
from .data import SlideEntry, area_samples, image_samples, median_box_size, read_cohort
from .detector import best_score_threshold, train_detector
from .enn import train_enn
from .splits import split_by_patient


@dataclass
class Geometry:
    """Where and how a bundle looks: working mpp and area size in pixels."""

    mpp: float | None = 0.5            # None: pictures without a pixel size, used at their own pixels
    area: tuple[int, int] = (640, 480)


def _synthetic(entries: list[SlideEntry]) -> bool:
    return any(e.truth_path is not None and "wsi-apl synth" in e.truth().get("generator", "") for e in entries[:1])


def open_or_create(out: Path, geometry: Geometry, synthetic: bool, name: str | None = None) -> ModelBundle:
    if (out / "bundle.json").exists():
        b = load_bundle(out, verify=False)
        same_mpp = (b.meta.get("mpp") is None and geometry.mpp is None) or (
            b.mpp_known and geometry.mpp is not None and abs(b.mpp - geometry.mpp) < 1e-9)
        if same_mpp and tuple(b.area_size) == tuple(geometry.area):
            if synthetic and not b.synthetic:
                b = create_bundle(out, name=b.name, mpp=b.meta.get("mpp"), area_size=b.area_size, heads=b.heads, synthetic=True)
            return b
    return create_bundle(out, name=name or out.name, mpp=geometry.mpp, area_size=geometry.area, heads=list(HEADS),
                         synthetic=synthetic,
                         description="trained on synthetic slides by wsi-apl" if synthetic else "")


def cell_size(geometry: Geometry, cfg: CellConfig | None = None) -> tuple[int, int] | None:
    """The pixel size areas are read at for the crops of ``cfg`` (default: the small backbone's), or
    None when the crops come from the detector's pixels."""
    if geometry.mpp is None:
        return None
    return cell_read(cfg or CellConfig(), geometry.mpp, geometry.area)


def collect_samples(entries: list[SlideEntry], geometry: Geometry, log: Callable[[str], None],
                    n_selected: int = 6, n_random: int = 2, seed: int = 0,
                    cells: tuple[int, int] | None = None) -> list:
    """The areas of ``entries`` with their truth; ``cells``: also read at this size for the cell crops
    (:func:`cell_size`)."""
    out = []
    t0 = time.time()
    for i, e in enumerate(entries):
        out.append(area_samples(e, geometry.area, geometry.mpp, n_selected=n_selected, n_random=n_random, seed=seed,
                                cell_size=cells))
        log(f"  read {i + 1}/{len(entries)} slides ({sum(len(s) for s in out)} areas, {time.time() - t0:.0f} s)")
    return out


def anchor_diameters(samples: list, pixels: bool) -> tuple[float, ...]:
    """Anchor sizes per pyramid level: cell diameters in µm, or (``pixels``: pictures without a pixel
    size) half, one, two and four times the median annotated box size in pixels."""
    if not pixels:
        return DetectorConfig.cell_diameters_um
    d = median_box_size(samples, 24.0)
    return tuple(round(d * f, 1) for f in (0.5, 1.0, 2.0, 4.0))


def step_detector(bundle: ModelBundle, train_s: list, val_s: list, *, backbone: str = "mobilenet_v3",
                  epochs: int = 60, budget_s: float | None = None, seed: int = 0, init: ModelBundle | None = None,
                  backbone_weights: Path | None = None, trials: int = 0, test_s: list | None = None,
                  source: str = "", log: Callable[[str], None] = print) -> dict:
    """Train (or search, ``trials``) the detector and save it into ``bundle`` with its test metrics."""
    from .detector import backbone_state_from_file, evaluate_detector, search_detector

    pixels = not bundle.mpp_known
    if init is not None:
        init_cfg = DetectorConfig.from_json(init.part("detector")["config"])
        if init_cfg.mpp_known == pixels:
            have = f"{init_cfg.mpp} µm/px" if init_cfg.mpp_known else "its pictures' own pixels (no pixel size)"
            want = "pictures without a pixel size" if pixels else "a pixel size (--mpp)"
            raise ValueError(f"{init.path}: its detector works at {have}, this training has {want}: "
                             "train both rounds with --mpp or both without")
        if init_cfg.backbone != backbone:
            log(f"  --init bundle has a {init_cfg.backbone} detector: using that backbone")
        cfg = DetectorConfig.from_json(init_cfg.to_json())
        cfg.mpp, cfg.mpp_known = (1.0, False) if pixels else (bundle.mpp, True)
    else:
        cfg = DetectorConfig(backbone=backbone, mpp=1.0 if pixels else bundle.mpp, mpp_known=not pixels,
                             cell_diameters_um=anchor_diameters(train_s, pixels))
    init_state = init.load_tensors("detector") if init is not None else None
    bb_state, bb_note = None, "none (from scratch)"
    if backbone_weights is not None and init is None:
        bb_state, bb_note = backbone_state_from_file(cfg, backbone_weights)
        log(f"  starting weights {bb_note}")
    unit = "px" if pixels else "µm"
    log(f"Training the cell detector ({cfg.backbone}, {len(train_s)} training areas, {len(val_s)} validation, "
        f"{len(test_s or [])} test; anchors {', '.join(f'{d:g}' for d in cfg.cell_diameters_um)} {unit})")
    kw = dict(epochs=epochs, time_budget_s=budget_s, seed=seed, init_state=init_state, backbone_state=bb_state, log=log)
    if trials and trials > 1:
        model, info = search_detector(train_s, val_s, cfg, trials=trials, **kw)
    else:
        model, info = train_detector(train_s, val_s, cfg, **kw)
    if val_s:
        cfg.score_threshold = best_score_threshold(model, cfg, val_s)
    metrics = {"validation": info["best"], "epochs": len(info["history"]), "seconds": info["seconds"],
               "train_areas": info["train_areas"], "val_areas": info["val_areas"], "budget": info.get("budget")}
    if "params" in info:
        metrics["search"] = {"best": info["params"], "trials": info["search"]}
    if test_s:
        t = evaluate_detector(model, cfg, test_s)
        metrics["test"] = {k: t[k] for k in ("AP50", "AP", "AR50", "AR", "images")}
        log(f"  test ({len(test_s)} areas never used in training): AP@0.5 {t['AP50']:.3f}, AP {t['AP']:.3f}, "
            f"AR@0.5 {t['AR50']:.3f}")
    save_part(bundle, "detector", model.state_dict(), config=cfg.to_json(), metrics=metrics,
              provenance={"init": str(init.path) if init else "scratch", "backbone_weights": bb_note,
                          "seed": seed, "source": source, "trials": trials})
    log(f"  detector: validation AP@0.5 {info['best']['AP50']:.3f} (epoch {info['best']['epoch']}), "
        f"score threshold {cfg.score_threshold:.2f}")
    return metrics


def step_cells(bundle: ModelBundle, train_s: list, val_s: list, *, heads: tuple[str, ...] = HEADS, epochs: int = 40,
               budget_s: float | None = None, seed: int = 0, log: Callable[[str], None] = print, **kw) -> dict:
    """The cell heads from training/validation areas with ground truth (see :func:`step_cells_from`)."""
    heads = tuple(heads)
    return step_cells_from(bundle, CellSet.from_samples(train_s, heads, bundle.mpp),
                           CellSet.from_samples(val_s, heads, bundle.mpp),
                           heads=heads, epochs=epochs, budget_s=budget_s, seed=seed, log=log, **kw)


def step_cells_from(bundle: ModelBundle, tr: CellSet, va: CellSet, *, heads: tuple[str, ...] = HEADS,
                    backbone: str = "small",
                    backbone_weights: Path | None = None, trials: int = 0, folds: int = 0, epochs: int = 40,
                    budget_s: float | None = None, seed: int = 0, source: str = "truth",
                    stain_aug: str = DEFAULT_STAIN_AUG, stain_norm: str = "none", notes: list[str] | None = None,
                    config: CellConfig | None = None, ema: float = 0.0, patience: int = 6,
                    log: Callable[[str], None] = print) -> dict:
    """Train the cell heads and store them in the bundle.

    ``folds``: first a patient-grouped cross-validation (out-of-fold AUROC per head, stored in the
    metrics); ``trials``: an Optuna search of head depth, dropout and learning rate on the validation
    split; ``backbone_weights``: transfer learning from weights on disk (recorded in the bundle);
    ``stain_aug`` / ``stain_norm``: colour augmentation and normalisation (stored with the heads);
    ``notes``: caveats of the sources (a split by picture), stored with the metrics; ``config``: the
    heads' configuration to start from (crop size and pixels, backbone width), else the backbone's;
    ``ema``: weight averaging (see :func:`~wsi_apl.train.cells.train_cells`); ``patience``: epochs
    without a better validation AUROC before training stops.
    """
    if config is not None:  # crop size and resolution, backbone width... of the caller's choosing
        cfg = CellConfig.from_json({**config.to_json(), "heads": list(heads), "stain_norm": stain_norm,
                                    "stain_target": {}, "thresholds": {}})
    else:
        cfg = CellConfig(backbone=backbone, heads=tuple(heads), stain_norm=stain_norm)
    if tr.labels.shape[1] != len(cfg.heads):
        raise ValueError(f"the cells carry {tr.labels.shape[1]} label columns for {len(cfg.heads)} heads")
    if bundle.mpp_known and abs(tr.mpp / cfg.cell_mpp(bundle.mpp) - 1.0) > 0.01:
        raise ValueError(f"the training cells are at {tr.mpp:g} µm/px, but a scan cuts this backbone's crops from "
                         f"{cfg.cell_mpp(bundle.mpp):g} µm/px (read them with cell_size(geometry, cfg))")
    for j, h in enumerate(cfg.heads):
        if np.nansum(tr.labels[:, j]) == 0:
            log(f"  warning: no training cell is labelled positive for {h}: that head learns nothing; label some, "
                "or leave it out (--heads)")
    log(f"Training the cell classifier ({backbone} backbone, {len(tr)} training cells, {len(va)} validation cells; "
        "positives " + ", ".join(f"{h} {int(np.nansum(tr.labels[:, j]))}" for j, h in enumerate(cfg.heads)) + ")")
    kw = {"backbone_weights": backbone_weights, "stain_aug": stain_aug, "ema": ema, "patience": patience}
    metrics: dict = {"notes": list(notes or [])} if notes else {}
    if folds and folds > 1:
        log(f"  {folds}-fold cross-validation by patient")
        cv = cross_validate(CellSet.join(tr, va), cfg, folds=folds, epochs=epochs, time_budget_s=budget_s, seed=seed,
                            log=log, **kw)
        metrics["cross_validation"] = cv
        log("  cross-validated (out-of-fold) AUROC " + ", ".join(f"{h} {v:.3f}" for h, v in cv["oof_auroc"].items()))
    if trials and trials > 1:
        model, info, cfg = search_heads(tr, va, cfg, trials=trials, epochs=epochs, time_budget_s=budget_s,
                                        seed=seed, log=log, **kw)
        metrics["search"] = info["search"]
    else:
        model, info = train_cells(tr, va, cfg, epochs=epochs, time_budget_s=budget_s, seed=seed, log=log,
                                  **kw)
    metrics.update({"validation_auroc": info["val_auroc"], "best_epoch": info["best_epoch"], "seconds": info["seconds"],
                    "train_cells": info["train_cells"], "val_cells": info["val_cells"], "positives": info["positives"],
                    "threshold_source": info["threshold_source"], "balance": info["balance"],
                    "stain_aug": stain_aug, "stain_norm": cfg.stain_norm, "budget": info.get("budget")})
    by_source = validation_by_source(model, cfg, va)
    if by_source:
        metrics["validation_by_source"] = by_source
        for name, aucs in by_source.items():
            log(f"  validation AUROC on {name}: " + ", ".join(f"{h} {v:.3f}" for h, v in aucs.items()))
    note = "none (from scratch)"
    if backbone_weights is not None:
        note = Path(backbone_weights).name
    if list(cfg.heads) != bundle.heads:
        bundle = create_bundle(bundle.path, name=bundle.name, mpp=bundle.meta.get("mpp"), area_size=bundle.area_size,
                               heads=list(cfg.heads), synthetic=bundle.synthetic,
                               description=bundle.meta.get("description", ""))
        if bundle.has("slide_nets"):
            log(f"  note: the bundle's heads are now {', '.join(cfg.heads)}; its slide-level nets were trained on "
                "other heads: retrain them (wsi-apl train enn)")
    save_part(bundle, "cells", model.state_dict(), config=cfg.to_json(), metrics=metrics,
              provenance={"backbone_weights": note, "seed": seed, "source": source, "trials": trials, "folds": folds,
                          "epochs": epochs, "stain_aug": stain_aug, "ema": ema, "patience": patience})
    log("  cells: validation AUROC " + ", ".join(f"{h} {v:.3f}" for h, v in info["val_auroc"].items())
        + "; thresholds " + ", ".join(f"{h} {v:.2f}" for h, v in cfg.thresholds.items()))
    return metrics


def validation_by_source(model, cfg: CellConfig, va: CellSet) -> dict:
    """AUROC per head on each source's validation cells, where the cells come from several sources."""
    from workers.classifier import classify

    from ..metrics import auroc

    names = list(dict.fromkeys(va.source_names()))
    if len(names) < 2:
        return {}
    p = classify(model, va.crops(cfg), "cpu")
    out = {}
    for name in names:
        m = va.source_names() == name
        out[name] = {}
        for j, h in enumerate(cfg.heads):
            y = va.labels[m, j]
            ok = ~np.isnan(y)
            if ok.any() and 0 < y[ok].sum() < ok.sum():
                out[name][h] = float(auroc(y[ok], p[m][ok, j]))
    return out


def slide_feature_table(bundle: ModelBundle, entries: list[SlideEntry], *, max_areas: int = 12,
                        target_cells: int = 500, log: Callable[[str], None] = print) -> tuple[np.ndarray, list]:
    """Features of each slide computed the way a scan computes them (selector, detector, heads)."""
    models = load_models(bundle)
    names = feature_names(bundle.heads)
    X = np.full((len(entries), len(names)), np.nan)
    extra = []
    t0 = time.time()
    for i, e in enumerate(entries):
        out = SlideAnalysis(bundle, None, selector=SelectorConfig(max_areas, target_cells), models=models,
                            slide_mpp=e.mpp)(e.path)
        res, feats, sel = out.result, out.features, out.selection
        if feats is not None:
            X[i] = feats["features"]
        extra.append({"slide": e.slide, "cells": res.cells, "areas": res.areas, "selection": sel.status,
                      "reason": sel.reason, "blast_percent": feats.get("blast_percent") if feats else None,
                      "mean_focus": res.mean_focus})
        why = f" - {sel.reason}" if sel.reason and not res.areas else ""
        log(f"  features {i + 1}/{len(entries)}: {e.slide} ({e.diagnosis}) {res.cells} cells in {res.areas} areas"
            f"{why} ({time.time() - t0:.0f} s)")
    return X, extra


def qc_reference(extra: list[dict], min_cells: int) -> dict:
    """The QC of the slides the slide-level nets were trained on, as a scan reports it: counted cells and
    mean focus per slide (sorted, so no value points back to a slide) and the share a scan would call
    inconclusive for QC (no usable area, or fewer than ``min_cells`` counted cells). ``wsi-apl verify``
    compares a lab's results with these figures (drift)."""
    qc_fail = [x["selection"] != "ok" or (x["cells"] or 0) < min_cells for x in extra]
    return {"slides": len(extra), "cells": sorted(int(x["cells"] or 0) for x in extra),
            "mean_focus": sorted(round(float(x["mean_focus"]), 4) for x in extra if x.get("mean_focus") is not None),
            "qc_inconclusive": int(sum(qc_fail)), "min_cells": int(min_cells)}


def step_enn(bundle: ModelBundle, entries: list[SlideEntry], *, target_sensitivity: float = 0.95,
             min_cells: int = 200, max_areas: int = 12, target_cells: int = 500, seed: int = 0, trials: int = 0,
             log: Callable[[str], None] = print) -> dict:
    log(f"Computing slide features with the bundle's detector and heads on {len(entries)} slides")
    X, extra = slide_feature_table(bundle, entries, max_areas=max_areas, target_cells=target_cells, log=log)
    log("Training the slide-level nets (APL vs AML, APL vs healthy/reactive)")
    tensors, config, decision, metrics = train_enn(
        X, [e.diagnosis for e in entries], [e.patient for e in entries], feature_names(bundle.heads),
        target_sensitivity=target_sensitivity, min_cells=min_cells, seed=seed, trials=trials,
        blasts=np.array([x["blast_percent"] if x["blast_percent"] is not None else np.nan for x in extra]), log=log)
    metrics.setdefault("reference", {}).update(qc_reference(extra, min_cells))
    save_part(bundle, "slide_nets", tensors, config=config, metrics=metrics, decision=decision,
              provenance={"slides": [e.slide for e in entries], "seed": seed})
    return metrics


def train_all(cohort: Path, out: Path, *, geometry: Geometry | None = None, detector_epochs: int = 30,
              cells_epochs: int = 30, detector_budget_s: float | None = None, cells_budget_s: float | None = None,
              seed: int = 0, min_cells: int = 200, name: str | None = None,
              max_areas: int = 12, target_cells: int = 500, cell_share: float = 0.4,
              log: Callable[[str], None] = print) -> ModelBundle:
    """The whole chain from a labelled cohort: detector and heads on one part of the patients, the
    slide-level nets on the others (so the nets learn from features of slides the cell models never saw).

    Each model trains for a fixed number of epochs (fewer when validation stops improving); the budgets
    are upper bounds only (see :mod:`.budget`)."""
    geometry = geometry or Geometry()
    torch.manual_seed(seed)
    entries = read_cohort(cohort)
    with_truth = [e for e in entries if e.truth_path is not None]
    if not with_truth:
        raise ValueError(f"{cohort}: no ground truth in truth/ (the cell models need labelled cells)")
    cell_part, enn_part = split_by_patient(entries, (cell_share, 1.0 - cell_share), seed=seed)
    cell_train, cell_val = split_by_patient(cell_part, (0.75, 0.25), seed=seed + 1)
    if not cell_val:
        cell_train, cell_val = cell_part[:-1], cell_part[-1:]
    log(f"Cohort {cohort}: {len(entries)} slides; cell models: {len(cell_train)} training + {len(cell_val)} "
        f"validation slides; slide-level nets: {len(enn_part)} other slides (patients never seen by the cell models)")
    bundle = open_or_create(out, geometry, _synthetic(entries), name)
    log("Reading training areas")
    fine = cell_size(geometry)
    train_s = sum(collect_samples(cell_train, geometry, log, seed=seed, cells=fine), [])
    val_s = sum(collect_samples(cell_val, geometry, log, n_random=0, seed=seed, cells=fine), [])
    step_detector(bundle, train_s, val_s, epochs=detector_epochs, budget_s=detector_budget_s, seed=seed, log=log)
    bundle = load_bundle(out)
    step_cells(bundle, train_s, val_s, epochs=cells_epochs, budget_s=cells_budget_s, seed=seed, log=log)
    bundle = load_bundle(out)
    step_enn(bundle, enn_part, min_cells=min_cells, max_areas=max_areas, target_cells=target_cells, seed=seed, log=log)
    return load_bundle(out)


def picture_samples(via: Path | None, voc: Path | None, images: Path | None, classes: list[str] | None,
                    image_mpp: float | None, work_mpp: float | None, log: Callable[[str], None] = print) -> list:
    """Annotated pictures of a VIA project or a VOC folder as samples, boxes kept for ``classes`` only."""
    from ..annotations import filter_classes, read_via, read_voc

    every = read_via(via, images) if via is not None else read_voc(voc, images)
    n_all = sum(len(it.boxes) for it in every)
    items = filter_classes(every, classes)
    n = sum(len(it.boxes) for it in items)
    if n == 0:
        found = sorted({lab for it in every for lab in it.labels})
        raise ValueError(f"{via or voc}: no boxes left for --classes {','.join(classes or [])} "
                         f"(labels found: {', '.join(found) or 'none'})")
    log(f"  {len(items)} pictures, {n} boxes" + (f" of {n_all} (classes {','.join(classes)})" if classes else ""))
    return image_samples(items, image_mpp, work_mpp)


def picture_geometry(samples: list, mpp: float | None) -> Geometry:
    """The bundle geometry of pictures: their most common size, at ``mpp`` (None: their own pixels)."""
    sizes: dict[tuple[int, int], int] = {}
    for s in samples:
        key = (int(s.image.shape[1]), int(s.image.shape[0]))
        sizes[key] = sizes.get(key, 0) + 1
    return Geometry(mpp=mpp, area=max(sizes, key=sizes.get) if sizes else (640, 480))
