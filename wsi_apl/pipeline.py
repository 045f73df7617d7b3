"""One slide from pixels to a result: selection, per-area cell tables, features, decision.

Shared by the distributed scan (the pieces run on Dask workers) and by training and evaluation
(which run them in-process), so that what a model is trained on is what a scan computes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tile_selector.select import Selection, SelectorConfig, select_file
from workers.area import CellTable, LoadedModels, process_area
from workers.bundle import ModelBundle
from workers.classifier import CellConfig

from .enn import SlideNets, decide
from .features import slide_features

STATUSES = ("flagged", "not_flagged", "inconclusive", "failed", "not_analysed")


@dataclass
class SlideResult:
    """What the triage list and the store say about one slide."""

    slide: str
    path: str
    status: str
    reason: str = ""
    suspicion: float | None = None
    suspicion_ci: tuple[float, float] | None = None
    p_apl_vs_aml: float | None = None
    p_apl_vs_healthy: float | None = None
    ratios: dict = field(default_factory=dict)
    cells: int = 0
    areas: int = 0
    blast_percent: float | None = None
    mean_focus: float | None = None
    qc: list[str] = field(default_factory=list)
    bundle: str = ""
    scanned_at: str = ""
    fingerprint: str = ""
    case: str = ""
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["suspicion_ci"] = list(self.suspicion_ci) if self.suspicion_ci else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SlideResult":
        d = dict(d)
        if d.get("suspicion_ci") is not None:
            d["suspicion_ci"] = tuple(d["suspicion_ci"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})



def _finite(v: float | None, digits: int | None = None) -> float | None:
    """A finite float (probabilities are kept unrounded: rounding ties near 0 and 1 would change ranks)."""
    if v is None or not np.isfinite(v):
        return None
    return float(v) if digits is None else round(float(v), digits)


#: A flag threshold resting on fewer APL slides than this is warned about.
MIN_APL_SLIDES = 20


def few_apl_slides(rule: dict) -> str:
    """The warning for a decision rule whose thresholds rest on fewer than MIN_APL_SLIDES APL slides, or ''."""
    n = int(rule.get("apl_slides", 0) or 0)
    if n >= MIN_APL_SLIDES:
        return ""
    return (f"the flag threshold rests on only {n} APL slide(s) (fewer than {MIN_APL_SLIDES}): its sensitivity is "
            "uncertain; treat not_flagged with extra caution")


def coarse_crops(tables: list[CellTable], bundle: ModelBundle) -> str:
    """The warning for cell crops cut from pixels coarser than the heads were trained on (a slide
    scanned at 20x for heads that look at 0.25 µm/px), or ''."""
    if not tables or not bundle.has("cells"):
        return ""
    want = CellConfig.from_json(bundle.part("cells")["config"]).cell_mpp(bundle.mpp)
    have = max(t.crop_source_mpp for t in tables)
    if have <= want * 1.25:
        return ""
    return (f"the slide's pixels ({have:.2f} µm/px) are coarser than the {want:.2f} µm/px the cell heads were trained "
            "on: fine detail such as Auer rods may be missed, so the Auer-rod ratio may be too low")


def thresholds_of(bundle: ModelBundle) -> dict[str, float]:
    """Each head's probability threshold for hard counts."""
    return dict(bundle.part("cells")["config"].get("thresholds", {}))


def aggregate(name: str, path: str, selection: Selection, tables: list[CellTable], bundle: ModelBundle,
              nets: SlideNets | None, *, heads: list[str] | None = None) -> tuple[SlideResult, dict, dict | None]:
    """Combine a slide's selection and area tables into (result, cell columns, features)."""
    heads = heads or bundle.heads
    cols = CellTable.concat(sorted(tables, key=lambda t: t.area), heads)
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    result = SlideResult(slide=name, path=str(path), status="inconclusive", bundle=bundle.label, scanned_at=now)
    result.areas = len(selection.areas)
    result.mean_focus = round(selection.mean_focus, 4) if selection.areas else None
    result.qc = list(selection.warnings)
    coarse = coarse_crops(tables, bundle)
    if coarse:
        result.qc.append(coarse)
    if selection.status != "ok":
        result.reason = selection.reason
        return result, cols, None
    feats = slide_features(cols, heads, thresholds_of(bundle))
    result.cells = feats["cells"]
    result.blast_percent = feats.get("blast_percent")
    result.ratios = {h: {k: (None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v)
                         for k, v in r.items()} for h, r in feats["ratios"].items()}
    if nets is None:
        result.reason = "the bundle has no slide-level nets (train them with 'wsi-apl train enn')"
        return result, cols, feats
    rule = bundle.part("slide_nets").get("decision", {})
    if nets.names != feats["names"]:
        # the cell heads changed after the nets were trained (e.g. a faggot_cell head added): the nets
        # decide on the features they know
        missing = [n for n in nets.names if n not in feats["names"]]
        if missing:
            result.reason = (f"the slide-level nets need features the cell model does not give ({', '.join(missing)}): "
                             "retrain them (wsi-apl train enn)")
            return result, cols, feats
        idx = [feats["names"].index(n) for n in nets.names]
        d = decide(dict(feats, features=feats["features"][idx], boot=feats["boot"][:, idx], names=list(nets.names)),
                   nets, rule)
    else:
        d = decide(feats, nets, rule)
    result.status = d.status
    result.suspicion = _finite(d.suspicion)
    lo, hi = _finite(d.suspicion_ci[0]), _finite(d.suspicion_ci[1])
    result.suspicion_ci = (lo, hi) if lo is not None and hi is not None else None
    result.p_apl_vs_aml = _finite(d.p_apl_vs_aml)
    result.p_apl_vs_healthy = _finite(d.p_apl_vs_healthy)
    result.reason = "; ".join(d.reasons)
    if coarse and d.status == "not_flagged":
        # a flag stands on coarse pixels (the evidence is there), a negative call does not: rods and
        # granules the heads would need may simply not be resolved
        result.status = "inconclusive"
        result.reason = ("not flagged, but the cells were read from pixels coarser than the cell heads were trained "
                         "on, so a negative call is not earned: rescan at 40x or review" +
                         (f" ({result.reason})" if result.reason else ""))
    few = few_apl_slides(rule) if result.status == "not_flagged" else ""
    if few:
        result.qc.append(few)
    return result, cols, feats


def analyse_slide_local(path: str | Path, models: LoadedModels, nets: SlideNets | None, cfg: SelectorConfig,
                        reader: str = "auto", slide_mpp: float | None = None
                        ) -> tuple[SlideResult, dict, dict | None, Selection]:
    """Run a whole slide in this process (training, evaluation, tests)."""
    t0 = time.perf_counter()
    bundle = models.bundle
    sel = select_file(path, bundle.area_size, bundle.mpp, cfg, reader, slide_mpp)
    t1 = time.perf_counter()
    tables = [process_area(str(path), a.box, models, a.index, reader, slide_mpp, a.size) for a in sel.areas]
    t2 = time.perf_counter()
    result, cols, feats = aggregate(Path(path).name, str(path), sel, tables, bundle, nets)
    result.timings = {"select": round(t1 - t0, 3), "areas": round(t2 - t1, 3)}
    return result, cols, feats, sel
