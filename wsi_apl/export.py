"""Exports of a results folder for the lab's own tools: QuPath (GeoJSON) and VGG Image Annotator (VIA 2).

- ``geojson``: per slide one FeatureCollection in the slide's level-0 pixels, as QuPath reads it
  (File > Import objects from file, or drag and drop onto the open slide): every detected cell a
  ``detection`` (its box as a closed rectangle, its class by the highest head at 0.5 or more, its head
  probabilities, detector score and morphometrics as measurements), every chosen area an
  ``annotation`` ("wsi-apl area N"). So a hematologist sees on the slide itself what the tool counted.
- ``via``: the chosen areas of one slide as pictures at the bundle's resolution, and a VIA 2 project
  holding the detected cells (rect regions, the type as a dropdown, findings as checkboxes), in the
  form ``wsi-apl train detector --via`` and ``wsi-apl train cells --via`` read back: corrected by an
  expert, the cells become training data.

Slides are named as the folder's other outputs name them (file name, or pseudonym with
``scan --pseudonymize``); the slide file's path is read from the ledger to find the pixels, never
written into an export. Label, macro and thumbnail images are never read.
"""

from __future__ import annotations

import json
import math
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from workers.bundle import replace_atomically

from .ledger import LEDGER, connect_readonly
from .privacy import Names
from .status import DECISION_SUPPORT
from .store import STORE, read_slide_group

#: Heads that name a cell's class in QuPath (the highest at ``CLASS_THRESHOLD`` or more), else OTHER.
CLASS_HEADS = ("promyelocyte", "myeloblast", "auer_rod")
#: Heads that are cell types (the VIA "type"); findings (auer_rod, faggot_cell) become checkboxes.
TYPE_HEADS = ("myeloblast", "promyelocyte")
FINDING_HEADS = ("auer_rod", "faggot_cell")
CLASS_THRESHOLD = 0.5
OTHER = "other cell"
COLOURS = {"promyelocyte": [220, 50, 50], "myeloblast": [50, 100, 230], "auer_rod": [245, 160, 0],
           OTHER: [150, 150, 150]}
AREA_COLOUR = [0, 170, 90]
#: Cell columns of the store exported as measurements (besides the head probabilities p_*).
MEASURES = {"score": "detector_score", "diameter_um": "diameter_um", "area_um2": "area_um2", "nc_ratio": "nc_ratio",
            "eccentricity": "eccentricity", "intensity": "intensity", "contrast": "contrast"}
#: Fixed namespace of the features' ids: the same export of the same slide gives the same ids.
_ID_SPACE = uuid.UUID("6f1d7a52-5a3e-4c1e-9a57-1c0de5a1a9e0")
_MIN_PREFIX = 6


class ExportError(ValueError):
    """An export that cannot be made, in plain words: what, which file, and what to do."""


@dataclass(frozen=True)
class SlideRef:
    """One slide of a results folder: how outputs name it, and (internal only) where its file is."""

    shown: str          # the name in outputs: file name or pseudonym
    fingerprint: str
    group: str | None   # zarr group (None: no result stored)
    status: str
    case: str
    paths: tuple[str, ...]  # the slide's files (never written into an export)
    size: int | None        # bytes when it was fingerprinted

    @property
    def slide_id(self) -> str:
        """The id of verdict files and the report's pages: the fingerprint's first 16 hex digits."""
        return self.fingerprint[:16]


# -- the slides of a results folder ---------------------------------------------------------------


def read_ledger(results: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """(one row per slide file: name, path, fingerprint, case, status, group, size; the ``meta`` table),
    read-only, so that an export never blocks a scan writing the folder."""
    path = Path(results) / LEDGER
    if not path.exists():
        raise ExportError(f"{results}: no {LEDGER}; give the --out folder of a 'wsi-apl scan'")
    db = connect_readonly(results)
    try:
        files = pd.read_sql_query(
            "SELECT f.name, f.path, f.fingerprint, f.case_id AS 'case', COALESCE(s.status, f.status) AS status, "
            "s.group_name AS 'group', s.size FROM files f LEFT JOIN slides s ON s.fingerprint = f.fingerprint "
            "ORDER BY f.path", db)
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        raise ExportError(f"{path}: cannot read the ledger ({exc}); is this the --out folder of a scan?") from exc
    finally:
        db.close()
    return files, meta


def slide_table(results: Path) -> tuple[pd.DataFrame, Names]:
    """The slide files of ``results`` with the name outputs give them (``shown``), and the folder's naming."""
    files, meta = read_ledger(results)
    names = Names.of(results, meta)
    files["shown"] = [names.slide(n) for n in files["name"]]
    files["fingerprint"] = files["fingerprint"].fillna("")
    files["case"] = files["case"].fillna("")
    return files, names


def _ref(rows: pd.DataFrame) -> SlideRef:
    first = rows.iloc[0]
    group = next((g for g in rows["group"] if isinstance(g, str) and g), None)
    size = next((int(v) for v in rows["size"] if pd.notna(v)), None)
    return SlideRef(shown=str(first["shown"]), fingerprint=str(first["fingerprint"]), group=group,
                    status=str(first["status"] or ""), case=str(first["case"] or ""),
                    paths=tuple(str(p) for p in rows["path"]), size=size)


def all_slides(results: Path) -> list[SlideRef]:
    """Every fingerprinted slide of ``results`` (a file seen under two names counts once)."""
    files, _ = slide_table(results)
    files = files[files["fingerprint"] != ""]
    return [_ref(rows) for _, rows in files.groupby("fingerprint", sort=False)]


def find_slide(results: Path, query: str) -> SlideRef:
    """The slide ``query`` names: its name in triage.csv's slide column (a file name or pseudonym), its
    file name, or the first digits (at least 6) of its fingerprint."""
    files, _ = slide_table(results)
    q = query.strip()
    hit = files[(files["shown"] == q) | (files["name"] == q)]
    if hit.empty and len(q) >= _MIN_PREFIX and all(c in "0123456789abcdefABCDEF" for c in q):
        hit = files[files["fingerprint"].str.startswith(q.lower()) & (files["fingerprint"] != "")]
    how = (f"give the slide's name from the slide column of {Path(results) / 'triage.csv'}, or the first digits "
           f"(at least {_MIN_PREFIX}) of its fingerprint column ('wsi-apl status {results}' lists them)")
    if hit.empty:
        raise ExportError(f"{results}: no slide {q!r} in this results folder; {how}")
    fps = hit["fingerprint"].unique()
    if len(fps) > 1:
        raise ExportError(f"{results}: {q!r} names {len(fps)} slides (" + ", ".join(
            f"{files[files['fingerprint'] == f]['shown'].iloc[0]} {f[:12]}" for f in fps if f) + "); give more "
            "digits of the fingerprint")
    if not fps[0]:
        raise ExportError(f"{results}: {q!r} could not be read by the scan (it has no fingerprint and no result); "
                          "see its reason in triage.csv")
    return _ref(files[files["fingerprint"] == fps[0]])


def _need_group(results: Path, ref: SlideRef) -> tuple[dict[str, np.ndarray], dict]:
    if not ref.group or not (Path(results) / STORE / ref.group).exists():
        raise ExportError(f"{results}: slide {ref.shown} has no stored cells (status {ref.status or 'unknown'}); "
                          "only analysed slides (flagged, not_flagged, inconclusive) can be exported")
    return read_slide_group(results, ref.group)


# -- QuPath GeoJSON -----------------------------------------------------------------------------


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _dims(attrs: dict) -> tuple[float, float] | None:
    """The slide's level-0 width and height from the stored slide facts (None when not stored)."""
    levels = (attrs.get("slide") or {}).get("levels") or []
    if not levels:
        return None
    return float(levels[0]["width"]), float(levels[0]["height"])


def _ring(box, dims: tuple[float, float] | None) -> list[list[float]]:
    """A box as a closed GeoJSON ring in level-0 pixels, clipped to the slide (areas may reach past its
    edge, where the scan padded them white)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if dims is not None:
        x0, x1 = (min(max(v, 0.0), dims[0]) for v in (x0, x1))
        y0, y1 = (min(max(v, 0.0), dims[1]) for v in (y0, y1))
    x0, y0, x1, y1 = (round(v, 2) for v in (x0, y0, x1, y1))
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def cell_class(probs: dict[str, float], heads: tuple[str, ...] = CLASS_HEADS) -> str:
    """The head with the highest probability at ``CLASS_THRESHOLD`` or more, else "other cell"."""
    best, best_p = OTHER, CLASS_THRESHOLD
    for h in heads:
        p = probs.get(h)
        if p is not None and p >= best_p:
            best, best_p = h, p
    return best


def _heads(cols: dict[str, np.ndarray]) -> list[str]:
    return [k[2:] for k in cols if k.startswith("p_")]


def cell_features(cols: dict[str, np.ndarray], fingerprint: str, dims) -> list[dict]:
    """Every cell of a slide group as a QuPath detection."""
    boxes = np.asarray(cols.get("box_l0", np.zeros((0, 4))), np.float64).reshape(-1, 4)
    heads = _heads(cols)
    out = []
    for i, box in enumerate(boxes):
        probs = {h: float(cols[f"p_{h}"][i]) for h in heads}
        name = cell_class(probs)
        meas: dict[str, float] = {f"p_{h}": p for h, p in probs.items() if math.isfinite(p)}
        for col, label in MEASURES.items():
            if col in cols and (v := _finite(cols[col][i])) is not None:
                meas[label] = v
        if "area" in cols:
            meas["area_rank"] = float(int(cols["area"][i]) + 1)
        if "cut" in cols:
            meas["touches_area_border"] = float(bool(cols["cut"][i]))
        out.append({"type": "Feature", "id": str(uuid.uuid5(_ID_SPACE, f"{fingerprint}:cell:{i}")),
                    "geometry": {"type": "Polygon", "coordinates": [_ring(box, dims)]},
                    "properties": {"objectType": "detection",
                                   "classification": {"name": name, "color": COLOURS.get(name, COLOURS[OTHER])},
                                   "measurements": meas}})
    return out


def area_features(areas: list[dict], fingerprint: str, dims) -> list[dict]:
    """The chosen areas as locked QuPath annotations, classified "wsi-apl area N"."""
    out = []
    for a in areas:
        rank = int(a.get("rank", len(out) + 1))
        meas = {k: float(v) for k, v in (a.get("scores") or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        meas["mpp"] = float(a.get("mpp") or 0.0)
        out.append({"type": "Feature", "id": str(uuid.uuid5(_ID_SPACE, f"{fingerprint}:area:{rank}")),
                    "geometry": {"type": "Polygon", "coordinates": [_ring(a["box"], dims)]},
                    "properties": {"objectType": "annotation", "name": f"area {rank}", "isLocked": True,
                                   "classification": {"name": f"wsi-apl area {rank}", "color": AREA_COLOUR},
                                   "measurements": meas}})
    return out


def slide_geojson(results: Path, ref: SlideRef) -> dict:
    """One slide's FeatureCollection: its areas (annotations) first, then its cells (detections)."""
    cols, attrs = _need_group(results, ref)
    dims = _dims(attrs)
    result = attrs.get("result") or {}
    features = area_features(attrs.get("areas") or [], ref.fingerprint, dims) + cell_features(cols, ref.fingerprint,
                                                                                                dims)
    return {"type": "FeatureCollection", "features": features,
            # a foreign member (RFC 7946, 6.1): QuPath reads only the features
            "wsi_apl": {"slide": ref.shown, "slide_id": ref.slide_id, "status": result.get("status", ref.status),
                        "suspicion": result.get("suspicion"), "bundle": result.get("bundle", ""),
                        "units": "level-0 pixels of the slide",
                        "slide_size": list(dims) if dims else None, "note": DECISION_SUPPORT}}


def _write_json(path: Path, data: dict) -> Path:
    text = json.dumps(data, allow_nan=False)
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def slides_to_export(results: Path, slide: str | None) -> list[SlideRef]:
    """The slide ``slide`` names, or every analysed slide (an error when there is none)."""
    refs = [find_slide(results, slide)] if slide else [r for r in all_slides(results) if r.group]
    if slide is None and not refs:
        raise ExportError(f"{results}: no analysed slide to export (see triage.csv)")
    return refs


def export_geojson(results: Path, out: Path, slide: str | None = None) -> list[Path]:
    """Write ``<group>.geojson`` per analysed slide (or for ``slide``) into ``out``; returns the files."""
    results, out = Path(results), Path(out)
    refs = slides_to_export(results, slide)
    out.mkdir(parents=True, exist_ok=True)
    return [_write_json(out / f"{ref.group}.geojson", slide_geojson(results, ref)) for ref in refs]


# -- VIA 2 project of the chosen areas ----------------------------------------------------------


def _slide_file(results: Path, ref: SlideRef) -> Path:
    """The slide's file as the scan read it: the first of its paths that still exists with its size."""
    for p in ref.paths:
        path = Path(p)
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError:
            size = None
        if size is not None and (ref.size is None or size == ref.size):
            return path
    raise ExportError(f"{results}: the file of slide {ref.shown} is no longer where the scan read it, or has "
                      "changed since (another size); put the slide back and export again")


def _type_options() -> dict[str, str]:
    from .synth.morphology import NUCLEATED_TYPES

    return {t: t for t in (*TYPE_HEADS, *(t for t in NUCLEATED_TYPES if t not in TYPE_HEADS), OTHER)}


def via_regions(cols: dict[str, np.ndarray], rows: np.ndarray, size: tuple[int, int]) -> list[dict]:
    """The cells ``rows`` of a group as VIA 2 rect regions in the area picture's pixels (``box_px``),
    labelled as ``train cells --via`` reads them: the type as ``type``, findings as checkboxes."""
    heads = _heads(cols)
    regions = []
    for i in rows:
        x0, y0, x1, y1 = (float(v) for v in cols["box_px"][i])
        x0, x1 = (min(max(v, 0.0), size[0]) for v in (x0, x1))
        y0, y1 = (min(max(v, 0.0), size[1]) for v in (y0, y1))
        x0, y0, x1, y1 = (round(v, 1) for v in (x0, y0, x1, y1))
        probs = {h: float(cols[f"p_{h}"][i]) for h in heads}
        attrs: dict = {"type": cell_class(probs, TYPE_HEADS)}
        for h in FINDING_HEADS:
            if h in probs:
                attrs[h] = {"1": True} if probs[h] >= CLASS_THRESHOLD else {}
        attrs["score"] = f"{float(cols['score'][i]):.4f}"
        attrs.update({f"p_{h}": f"{p:.4f}" for h, p in probs.items()})
        regions.append({"shape_attributes": {"name": "rect", "x": x0, "y": y0, "width": round(x1 - x0, 1),
                                             "height": round(y1 - y0, 1)},
                        "region_attributes": attrs})
    return regions


def via_project(name: str, meta: dict, heads: list[str]) -> dict:
    """A VIA 2.0.10 project: the type a dropdown, each finding a checkbox (unticked means no)."""
    from .annotations import _VIA2_SETTINGS

    region = {"type": {"type": "dropdown", "description": "cell type (the model's; correct it)",
                       "options": _type_options(), "default_options": {}}}
    for h in FINDING_HEADS:
        if h in heads:
            region[h] = {"type": "checkbox", "description": h.replace("_", " "), "options": {"1": "yes"},
                         "default_options": {}}
    for k in ["score", *(f"p_{h}" for h in heads)]:
        region[k] = {"type": "text", "description": "the model's (not a label)", "default_value": ""}
    text = {"type": "text", "description": "", "default_value": ""}
    settings = {**_VIA2_SETTINGS, "project": {"name": name}}
    settings["ui"] = {**settings["ui"], "image": {**settings["ui"]["image"], "region_label": "type"}}
    return {"_via_settings": settings, "_via_img_metadata": meta,
            "_via_attributes": {"region": region, "file": {k: dict(text) for k in ("patient", "slide", "area", "mpp")}},
            "_via_data_format_version": "2.0.10", "_via_image_id_list": list(meta)}


def _area_reader(results: Path, ref: SlideRef, attrs: dict):
    """The slide opened again as the scan read it (its reader, and the --mpp it was given); returns a
    function giving one area's pixels at the bundle's resolution. Errors are said without the path."""
    from tile_selector.errors import SlideError
    from tile_selector.slide import open_slide

    facts = attrs.get("slide") or {}

    def unreadable(exc: SlideError) -> ExportError:
        return ExportError(f"{results}: slide {ref.shown} cannot be read again ({exc.cause})"
                           + (f"; {exc.fix}" if exc.fix else ""))

    try:
        s = open_slide(_slide_file(results, ref), reader=facts.get("reader") or "auto",
                       mpp=(facts.get("mpp") or [None])[0])
    except SlideError as exc:
        raise unreadable(exc) from exc

    def read(area: dict) -> np.ndarray:
        try:
            return s.read_area(tuple(area["box"]), (int(area["size"][0]), int(area["size"][1]))).image
        except SlideError as exc:
            raise unreadable(exc) from exc

    return read


def export_via(results: Path, out: Path, slide: str) -> Path:
    """The chosen areas of ``slide`` as PNG pictures and a VIA 2 project of its cells in ``out``; returns
    the project file."""
    from PIL import Image

    results, out = Path(results), Path(out)
    ref = find_slide(results, slide)
    cols, attrs = _need_group(results, ref)
    areas = attrs.get("areas") or []
    if not areas:
        why = (attrs.get("result") or {}).get("reason") or attrs.get("selection_reason") or ""
        raise ExportError(f"{results}: the scan chose no area on slide {ref.shown}" + (f" ({why})" if why else "")
                          + "; there is nothing to export as pictures")
    read = _area_reader(results, ref, attrs)
    out.mkdir(parents=True, exist_ok=True)
    area_of = np.asarray(cols.get("area", np.zeros(0, np.int32)))
    meta: dict[str, dict] = {}
    for a in areas:  # one area in memory at a time
        rank, size = int(a["rank"]), (int(a["size"][0]), int(a["size"][1]))
        img = read(a)
        picture = out / f"{ref.group}_area{rank:02d}.png"
        dpi = (25400.0 / float(a["mpp"]),) * 2  # the pixel size travels with the picture
        replace_atomically(picture, lambda tmp, img=img, dpi=dpi: Image.fromarray(img).save(tmp, format="PNG", dpi=dpi))
        n = picture.stat().st_size
        meta[f"{picture.name}{n}"] = {
            "filename": picture.name, "size": n,
            "regions": via_regions(cols, np.flatnonzero(area_of == rank - 1), size),
            "file_attributes": {"patient": ref.case or ref.shown, "slide": ref.shown, "area": str(rank),
                                "mpp": f"{float(a['mpp']):g}"}}
    project = out / f"{ref.group}.via.json"
    _write_json(project, via_project(f"wsi-apl {ref.shown}", meta, _heads(cols)))
    return project


# -- per-cell tables (parquet, CSV) -------------------------------------------------------------

CELL_FORMATS = ("parquet", "csv")


def cell_table(results: Path, ref: SlideRef) -> pd.DataFrame:
    """One row per stored cell of a slide: its area, its boxes (level-0 and area pixels), the detector's
    score, whether it touches an area border, one probability per head, the morphometrics. The crops
    (pictures) stay in the zarr store."""
    cols, attrs = _need_group(results, ref)
    n = len(cols.get("score", ()))
    table: dict[str, np.ndarray | list] = {"slide": [ref.shown] * n, "cell": np.arange(n)}
    for name, arr in cols.items():
        arr = np.asarray(arr)
        if name == "crops":
            continue
        if name in ("box_l0", "box_px"):
            for k, side in enumerate(("x0", "y0", "x1", "y1")):
                table[f"{name}_{side}"] = arr.reshape(-1, 4)[:, k]
        elif arr.ndim == 1:
            table[name] = arr
    df = pd.DataFrame(table)
    if "area" in df:
        df["area"] = df["area"] + 1  # areas are numbered from 1 in every output people read
    return df


def export_cells(results: Path, out: Path, slide: str | None = None, fmt: str = "parquet") -> list[Path]:
    """Write ``<group>.cells.<fmt>`` per analysed slide (or for ``slide``) into ``out``; returns the files."""
    if fmt not in CELL_FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(CELL_FORMATS)}")
    results, out = Path(results), Path(out)
    refs = slides_to_export(results, slide)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for ref in refs:
        df = cell_table(results, ref)
        path = out / f"{ref.group}.cells.{fmt}"
        tmp = path.with_name(f".{path.name}.tmp")
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False, lineterminator="\n")
        tmp.replace(path)
        files.append(path)
    return files
