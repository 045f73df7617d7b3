"""Slide-level evaluation: both nets, the triage decision, an oracle, subgroups, CI coverage, areas.

The rows come from scanning labelled slides in this process (the way a scan computes them: the
selector's areas, the detector's cells, the heads' probabilities) or from the results folder of a
``wsi-apl scan`` (its zarr groups). With ground truth (a synthetic cohort's ``truth/``):

- the *oracle*: the same kind of net, cross-validated by patient on the true ratios of the cells in
  the same chosen areas: the ceiling the cell models leave on the table;
- the *coverage* of the promyelocyte ratio's 95 % CI: how often it contains the true ratio (of the
  chosen areas, and of the whole slide);
- per subgroup: sensitivity for the microgranular APL variant, specificity for reactive marrows;
- *areas per slide*: the AUROC when only 1, 3, 6 or 12 of the stored areas are used (random
  subsets, several draws), the benefit of many areas over the paper's single picture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .enn import TASKS, SlideNets
from .features import feature_names, slide_features
from .metrics import auroc, binary_summary
from .pipeline import thresholds_of
from .status import Status

#: Eckardt et al. 2022 (BMC Cancer), one hand-picked image per patient, real patients.
PAPER = {"apl_vs_aml": {"auroc": 0.8575, "auprc": 0.8599}, "apl_vs_healthy": {"auroc": 0.9585, "auprc": 0.9671},
         "note": "Eckardt et al. 2022, real patients, one image each. Real patients vs synthetic slides: "
                 "not comparable."}
AREA_COUNTS = (1, 3, 6, 12)


@dataclass
class SlideRow:
    slide: str
    patient: str
    diagnosis: str
    result: dict                 # SlideResult JSON
    cols: dict | None            # the slide's cell columns (None: no cells stored)
    areas: list                  # level-0 boxes of the chosen areas
    truth: dict | None = None    # the synthetic ground truth, when there is one


def scan_rows(bundle, entries, *, max_areas: int = 12, target_cells: int = 0,
              log: Callable[[str], None] = print) -> list[SlideRow]:
    """Analyse each labelled slide in this process, as a scan would."""
    from tile_selector.select import SelectorConfig
    from workers.area import load_models

    from .pipeline import SlideAnalysis

    models = load_models(bundle)
    nets = SlideNets.from_bundle(bundle)
    rows = []
    for i, e in enumerate(entries):
        out = SlideAnalysis(bundle, nets, selector=SelectorConfig(max_areas, target_cells), models=models,
                            slide_mpp=e.mpp)(e.path)
        res = out.result
        rows.append(SlideRow(e.slide, e.patient, e.diagnosis, res.to_json(), out.cells,
                             [list(a.box) for a in out.selection.areas], _truth(e)))
        log(f"  {i + 1}/{len(entries)} {e.slide} ({e.diagnosis}): {res.status}"
            + (f", suspicion {res.suspicion:.2f}" if res.suspicion is not None else "")
            + f", {res.cells} cells in {res.areas} areas" + (f" ({res.reason})" if res.reason else ""))
    return rows


def results_rows(results: Path, entries, log: Callable[[str], None] = print) -> list[SlideRow]:
    """The rows of a ``wsi-apl scan`` results folder, matched to the labels by file name."""
    from .ledger import Ledger
    from .store import read_slide_group

    led = Ledger(results)
    try:
        by_name = {r["name"]: r for r in led.rows()}
    finally:
        led.close()
    rows, missing = [], []
    for e in entries:
        r = by_name.get(Path(e.path).name)
        if r is None:
            missing.append(Path(e.path).name)
            continue
        cols, areas = None, []
        if r["group"]:
            cols, attrs = read_slide_group(results, r["group"])
            areas = [a["box"] for a in attrs.get("areas", [])]
        result = r["result"] or {"status": r["status"], "reason": r["error"] or ""}
        rows.append(SlideRow(e.slide, e.patient, e.diagnosis, result, cols, areas, _truth(e)))
    if missing:
        log(f"  {len(missing)} labelled slide(s) are not in {results} (scan them first): "
            + ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""))
    return rows


def _truth(entry) -> dict | None:
    try:
        return entry.truth() if entry.truth_path is not None else None
    except (FileNotFoundError, ValueError):
        return None


def truth_shares(truth: dict, areas: list, heads: list[str]) -> tuple[dict, dict, int]:
    """True shares per head among the truth cells centred in ``areas`` and among all of the slide's."""
    cells = truth.get("cells", [])

    def share(sel):
        n = len(sel)
        out = {}
        for h in heads:
            if h == "auer_rod":
                k = sum(bool(c.get("auer_rod")) for c in sel)
            elif h == "faggot_cell":
                k = sum(bool(c.get("faggot")) for c in sel)
            else:
                k = sum(c.get("type") == h for c in sel)
            out[h] = k / n if n else float("nan")
        return out

    inside = []
    for c in cells:
        x, y = (c["box"][0] + c["box"][2]) / 2, (c["box"][1] + c["box"][3]) / 2
        if any(a[0] <= x < a[2] and a[1] <= y < a[3] for a in areas):
            inside.append(c)
    return share(inside), share(cells), len(inside)


def _oof_oracle(Xo: np.ndarray, dx: np.ndarray, pats: np.ndarray, seed: int = 0) -> dict:
    """Patient-grouped cross-validated nets on the true features: out-of-fold scores per task."""
    from .train.enn import _logits, fit_net, grouped_folds

    out = {}
    ok = np.all(np.isfinite(Xo), axis=1)
    for task, (pos, neg) in TASKS.items():
        m = ok & np.isin(dx, pos + neg)
        y = np.isin(dx[m], pos)
        k = int(min(3, len(set(pats[m][y])), len(set(pats[m][~y]))))
        if k < 2:
            continue
        Z = Xo[m]
        mu, sd = Z.mean(0), np.where(Z.std(0) > 1e-9, Z.std(0), 1.0)
        Z = (Z - mu) / sd
        z = np.full(len(Z), np.nan)
        for f, test in enumerate(grouped_folds(dx[m], pats[m], k, seed)):
            train = np.setdiff1d(np.arange(len(Z)), test)
            if len(np.unique(y[train])) < 2:
                continue
            z[test] = _logits(fit_net(Z[train], y[train].astype(np.float32), 0, seed=seed + f), Z[test])
        good = np.isfinite(z)
        out[task] = binary_summary(y[good], z[good], None, groups=pats[m][good], n_boot=500)
        out[task]["folds"] = k
    return out


def _area_subsets(rows: list[SlideRow], bundle, nets: SlideNets, counts=AREA_COUNTS, draws: int = 5,
                  seed: int = 0) -> list[dict]:
    """AUROC of both nets when each slide keeps only ``k`` of its stored areas (random, ``draws`` times)."""
    heads = bundle.heads
    thr = thresholds_of(bundle)
    rng = np.random.default_rng(seed)
    dx = np.array([r.diagnosis for r in rows])
    table = []
    for k in counts:
        aucs = {t: [] for t in TASKS}
        used = []
        for _ in range(draws):
            X = np.full((len(rows), len(feature_names(heads))), np.nan)
            for i, r in enumerate(rows):
                if r.cols is None or not len(r.cols.get("area", [])):
                    continue
                uniq = np.unique(r.cols["area"])
                pick = rng.choice(uniq, min(k, len(uniq)), replace=False)
                used.append(len(pick))
                keep = np.isin(r.cols["area"], pick)
                sub = {c: v[keep] for c, v in r.cols.items() if hasattr(v, "__len__") and len(v) == len(keep)}
                X[i] = slide_features(sub, heads, thr, n_boot=0)["features"]
            probs = nets.predict(np.nan_to_num(X, nan=0.0))
            for task, (pos, neg) in TASKS.items():
                m = np.isin(dx, pos + neg) & np.all(np.isfinite(X), axis=1)
                y = np.isin(dx[m], pos)
                if len(np.unique(y)) == 2:
                    aucs[task].append(auroc(y, probs[task][m]))
        table.append({"areas": k, "mean_areas_used": float(np.mean(used)) if used else 0.0, "draws": draws,
                      **{task: float(np.mean(v)) if v else None for task, v in aucs.items()}})
    return table


def evaluate_rows(rows: list[SlideRow], bundle, *, curves_dir: Path | None = None, draws: int = 5,
                  seed: int = 0) -> dict:
    """Every figure of the slide-level evaluation (see the module docstring)."""

    decision = bundle.part("slide_nets").get("decision", {})
    nets = SlideNets.from_bundle(bundle)
    heads = bundle.heads
    out = summarise_slide_results([(r.diagnosis, r.patient, r.result) for r in rows], decision)
    dx = np.array([r.diagnosis for r in rows])
    pats = np.array([r.patient for r in rows])
    if curves_dir is not None:
        from .plots import curves_png

        Path(curves_dir).mkdir(parents=True, exist_ok=True)
        for task, (pos, neg) in TASKS.items():
            key = f"p_{task}"
            sel = [(r.diagnosis in pos, r.result.get(key)) for r in rows
                   if r.diagnosis in pos + neg and r.result.get(key) is not None]
            if len({y for y, _ in sel}) == 2:
                y, s = np.array([y for y, _ in sel]), np.array([s for _, s in sel])
                out[task]["curves_png"] = str(curves_png(y, s, Path(curves_dir) / f"{task}.png", task))

    # subgroups: the microgranular APL variant, reactive marrows
    def status_share(sel, statuses):
        return (sum(r.result.get("status") in statuses for r in sel) / len(sel)) if sel else None

    micro = [r for r in rows if r.diagnosis == "apl" and r.truth and "microgranular" in str(r.truth.get("subtype", ""))]
    hyper = [r for r in rows if r.diagnosis == "apl" and r.truth and "microgranular" not in str(r.truth.get("subtype", ""))]
    reactive = [r for r in rows if r.diagnosis == "reactive"]
    out["subgroups"] = {
        "apl_microgranular": {"slides": len(micro), "sensitivity": status_share(micro, ("flagged",)),
                              "flagged_or_inconclusive": status_share(micro, (Status.FLAGGED, Status.INCONCLUSIVE))},
        "apl_hypergranular": {"slides": len(hyper), "sensitivity": status_share(hyper, ("flagged",)),
                              "flagged_or_inconclusive": status_share(hyper, (Status.FLAGGED, Status.INCONCLUSIVE))},
        "reactive": {"slides": len(reactive), "specificity": status_share(reactive, (Status.NOT_FLAGGED,)),
                     "flagged": status_share(reactive, ("flagged",))},
    }

    with_truth = [i for i, r in enumerate(rows) if r.truth is not None]
    if with_truth:
        names = feature_names(heads)
        Xo = np.full((len(rows), len(names)), np.nan)
        cover_area = cover_slide = n_cov = 0
        for i in with_truth:
            r = rows[i]
            in_areas, whole, n_in = truth_shares(r.truth, r.areas, heads)
            if n_in:
                Xo[i] = [in_areas[h] for h in heads for _kind in ("ratio", "mean_p")]
            ci = (r.result.get("ratios") or {}).get("promyelocyte") or {}
            lo, hi = ci.get("ci_low"), ci.get("ci_high")
            if lo is not None and hi is not None and n_in:
                n_cov += 1
                cover_area += lo <= in_areas["promyelocyte"] <= hi
                cover_slide += lo <= whole["promyelocyte"] <= hi
        out["oracle"] = _oof_oracle(Xo, dx, pats, seed)
        out["oracle"]["note"] = ("nets cross-validated by patient on the true ratios of the truth cells in the same "
                                 "chosen areas: the ceiling of the cell models")
        out["ci_coverage"] = {
            "slides": n_cov,
            "promyelocyte_in_areas": cover_area / n_cov if n_cov else None,
            "promyelocyte_whole_slide": cover_slide / n_cov if n_cov else None,
            "note": "share of slides whose 95% CI of the promyelocyte ratio contains the true ratio "
                    "(of the truth cells in the chosen areas; of every cell on the slide)"}
    out["areas_per_slide"] = _area_subsets(rows, bundle, nets, draws=draws, seed=seed)
    out["paper"] = PAPER
    return out


def summarise_slide_results(rows: list[tuple[str, str, dict]], decision: dict) -> dict:
    """AUROC/AUPRC per task and triage sensitivity/specificity from (diagnosis, patient, result) rows."""
    out: dict = {"slides": len(rows), "statuses": {}}
    for dx, _p, r in rows:
        out["statuses"].setdefault(dx, {}).setdefault(r["status"], 0)
        out["statuses"][dx][r["status"]] += 1
    thresholds = decision.get("thresholds") or {}
    for task, pos, neg, key in (("apl_vs_aml", ("apl",), ("aml",), "p_apl_vs_aml"),
                                ("apl_vs_healthy", ("apl",), ("healthy", "reactive"), "p_apl_vs_healthy")):
        sel = [(dx, p, r) for dx, p, r in rows if dx in pos + neg and r.get(key) is not None]
        if not sel:
            continue
        y = np.array([dx in pos for dx, _, _ in sel])
        s = np.array([r[key] for _, _, r in sel])
        groups = np.array([p for _, p, _ in sel])
        # sensitivity / specificity at the net's stored threshold (chosen on out-of-fold predictions)
        out[task] = binary_summary(y, s, float(thresholds.get(task, 0.5)), groups=groups, n_boot=500)
        out[task]["without_score"] = sum(dx in pos + neg for dx, _, _ in rows) - len(sel)
    scored = [(dx, r) for dx, _p, r in rows]
    apl = [r for dx, r in scored if dx == "apl"]
    non = [r for dx, r in scored if dx != "apl"]
    # triage: flagged or inconclusive both send the slide to an expert first
    out["triage"] = {
        "apl_flagged": sum(r["status"] == Status.FLAGGED for r in apl),
        "apl_inconclusive": sum(r["status"] == Status.INCONCLUSIVE for r in apl),
        "apl_missed": sum(r["status"] == Status.NOT_FLAGGED for r in apl),
        "apl_total": len(apl),
        "non_apl_flagged": sum(r["status"] == Status.FLAGGED for r in non),
        "non_apl_not_flagged": sum(r["status"] == Status.NOT_FLAGGED for r in non),
        "non_apl_total": len(non),
        "threshold": decision.get("threshold"),
    }
    t = out["triage"]
    t["sensitivity"] = t["apl_flagged"] / t["apl_total"] if t["apl_total"] else None
    t["specificity"] = t["non_apl_not_flagged"] / t["non_apl_total"] if t["non_apl_total"] else None
    return out
