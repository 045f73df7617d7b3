"""One slide from pixels to a status: :class:`SlideAnalysis`, a method of named parts.

Shared by the distributed scan (its worker-side parts run on Dask workers through
``cluster.plugin``, which calls the same functions) and by training, evaluation and the demo (which
run every part in this process), so that what a model is trained on is what a scan computes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tile_selector.select import Area, Selection, SelectorConfig, select_file
from workers.area import CellTable, LoadedModels, process_area
from workers.bundle import ModelBundle
from workers.classifier import CellConfig

from .enn import Decision, SlideNets, decide
from .features import slide_features
from .privacy import Names
from .status import DECISION_SUPPORT, Status


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


@dataclass
class SlideOutcome:
    """Everything the analysis of one slide gives: its row, its cells, its features, its areas."""

    result: SlideResult
    cells: dict[str, np.ndarray]     # per-cell columns of every area (the zarr group's arrays)
    features: dict | None            # slide features (None when no area could be used)
    selection: Selection

    def store_attrs(self, names: Names, path: Path, provenance: dict) -> dict:
        """The zarr group's attributes (see wsi_apl/store.py): no label, barcode or file name unless the
        folder's naming allows it."""
        sel = self.selection
        return {
            "result": self.result.to_json(),
            "areas": [a.to_json() for a in sel.areas],
            "rejected": dict(sel.rejected), "candidates": sel.candidates, "qc": sel.qc,
            "selection_status": sel.status, "selection_reason": names.text(sel.reason, path),
            "slide": dict(sel.slide), "provenance": provenance,
            "case": self.result.case, "decision_support": DECISION_SUPPORT,
        }


class SlideAnalysis:
    """One slide, pixels to status, as named parts (compare torchvision's ``GeneralizedRCNN``):

    ``selector``
        where to look: representative, in-focus monolayer areas (tile_selector.select_file)
    ``models``
        per area: read, detect the cells (Faster R-CNN), classify them (the cell heads) and measure
        them (morphometry) into a CellTable (workers.area.process_area)
    ``aggregation``
        per slide: ratios with confidence intervals, blast percentage (features.slide_features)
    ``nets`` and ``rule``
        the decision: slide-level nets and the bundle's flag rule (enn.decide), with the QC that
        makes a result inconclusive rather than negative

    Calling it runs every part in this process (training, evaluation, the demo, tests). The scan runs
    :meth:`select` and :meth:`read_area`'s work on Dask workers (``cluster.plugin`` calls the same
    functions with the worker's copy of the models) and :meth:`conclude` on the client.
    """

    def __init__(self, bundle: ModelBundle, nets: SlideNets | None, *, selector: SelectorConfig | None = None,
                 models: LoadedModels | None = None, reader: str = "auto", slide_mpp: float | None = None):
        self.bundle = bundle
        self.selector = selector or SelectorConfig()
        self.models = models            # None where only conclude() runs (the scan's client)
        self.nets = nets
        self.rule = (bundle.part("slide_nets") or {}).get("decision", {})
        self.reader, self.slide_mpp = reader, slide_mpp

    def __call__(self, path: str | Path) -> SlideOutcome:
        t0 = time.perf_counter()
        selection = self.select(path)
        t1 = time.perf_counter()
        tables = [self.read_area(path, a) for a in selection.areas]
        t2 = time.perf_counter()
        outcome = self.conclude(path, selection, tables)
        outcome.result.timings = {"select": round(t1 - t0, 3), "areas": round(t2 - t1, 3)}
        return outcome

    # -- the parts ---------------------------------------------------------------------------------
    def select(self, path: str | Path) -> Selection:
        return select_file(path, self.bundle.area_size, self.bundle.mpp, self.selector, self.reader, self.slide_mpp)

    def read_area(self, path: str | Path, area: Area) -> CellTable:
        if self.models is None:
            raise RuntimeError("this SlideAnalysis has no models loaded (load_models(bundle))")
        return process_area(str(path), area.box, self.models, area.index, self.reader, self.slide_mpp, area.size)

    def aggregation(self, cells: dict[str, np.ndarray]) -> dict:
        return slide_features(cells, self.bundle.heads, thresholds_of(self.bundle))

    def decision(self, feats: dict) -> Decision | str:
        """The nets' decision on the slide's features, or why there is none (a reason in words)."""
        if self.nets is None:
            return "the bundle has no slide-level nets (train them with 'wsi-apl train enn')"
        if self.nets.names == feats["names"]:
            return decide(feats, self.nets, self.rule)
        # the cell heads changed after the nets were trained (e.g. a faggot_cell head added): the nets
        # decide on the features they know
        missing = [n for n in self.nets.names if n not in feats["names"]]
        if missing:
            return (f"the slide-level nets need features the cell model does not give ({', '.join(missing)}): "
                    "retrain them (wsi-apl train enn)")
        idx = [feats["names"].index(n) for n in self.nets.names]
        return decide(dict(feats, features=feats["features"][idx], boot=feats["boot"][:, idx],
                           names=list(self.nets.names)), self.nets, self.rule)

    # -- the slide's result ------------------------------------------------------------------------
    def conclude(self, path: str | Path, selection: Selection, tables: list[CellTable], *,
                 names: Names | None = None, fingerprint: str = "", case: str = "") -> SlideOutcome:
        """Combine a slide's selection and area tables into its outcome; ``names``: how outputs name
        the slide (pseudonyms, and file paths taken out of the reasons)."""
        names = names or Names()
        path = Path(path)
        cells = CellTable.concat(sorted(tables, key=lambda t: t.area), self.bundle.heads)
        result = SlideResult(slide=names.slide(path.name), path=names.path(path), status=Status.INCONCLUSIVE,
                             bundle=self.bundle.label, scanned_at=time.strftime("%Y-%m-%d %H:%M:%S"),
                             fingerprint=fingerprint, case=case)
        result.areas = len(selection.areas)
        result.mean_focus = round(selection.mean_focus, 4) if selection.areas else None
        result.qc = list(selection.warnings)
        coarse = coarse_crops(tables, self.bundle)
        if coarse:
            result.qc.append(coarse)
        feats = None
        if selection.status != "ok":
            result.reason = selection.reason
        else:
            feats = self.aggregation(cells)
            self._fill(result, feats, self.decision(feats), coarse)
        result.reason = names.text(result.reason, path)
        result.qc = [names.text(q, path) for q in result.qc]
        return SlideOutcome(result, cells, feats, selection)

    def _fill(self, result: SlideResult, feats: dict, d: Decision | str, coarse: str) -> None:
        result.cells = feats["cells"]
        result.blast_percent = feats.get("blast_percent")
        result.ratios = {h: {k: (None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v)
                             for k, v in r.items()} for h, r in feats["ratios"].items()}
        if isinstance(d, str):
            result.reason = d
            return
        result.status = d.status
        result.suspicion = _finite(d.suspicion)
        lo, hi = _finite(d.suspicion_ci[0]), _finite(d.suspicion_ci[1])
        result.suspicion_ci = (lo, hi) if lo is not None and hi is not None else None
        result.p_apl_vs_aml = _finite(d.p_apl_vs_aml)
        result.p_apl_vs_healthy = _finite(d.p_apl_vs_healthy)
        result.reason = "; ".join(d.reasons)
        if coarse and d.status == Status.NOT_FLAGGED:
            # a flag stands on coarse pixels (the evidence is there), a negative call does not: rods and
            # granules the heads would need may simply not be resolved
            result.status = Status.INCONCLUSIVE
            result.reason = ("not flagged, but the cells were read from pixels coarser than the cell heads were "
                             "trained on, so a negative call is not earned: rescan at 40x or review" +
                             (f" ({result.reason})" if result.reason else ""))
        few = few_apl_slides(self.rule) if result.status == Status.NOT_FLAGGED else ""
        if few:
            result.qc.append(few)
