"""The layout Eckardt et al. 2022 published their data in, read (and, for tests, written) here.

A folder holding:

- ``wsi.csv``: one row per camera frame, ``id`` (the patient), ``imgName`` (the picture) and
  ``label`` (the diagnosis: APL, AML, healthy...);
- ``labeled_cells.csv``: one row per object, ``imgName``, ``bbox`` as ``[min_row, min_col, max_row,
  max_col]`` (scikit-image's ``regionprops`` order, rows first, the maxima exclusive), ``labels`` as a
  Python set literal (``{'Promyelocyte', 'Auer rod'}``, read with :func:`ast.literal_eval`, never
  ``eval``) and ``objectType`` (``Cell``, ``Smudge`` or ``Not recognizeable``);
- the pictures, next to the CSVs or in a subfolder: 2560x1920 frames at 0.0668 µm/px
  (:data:`PAPER_MPP`) unless told otherwise.

Only ``Cell`` objects are cells to detect and classify; smudges and unrecognisable objects are left
out, as the detector is not trained to count broken cells. A cell's labels give each head 1 when
the set names it (``Promyelocyte``, ``Myeloblast`` or ``Blast``, ``Auer rod(s)``, ``Faggot cell``)
and 0 otherwise — for a head whose finding appears nowhere in the file, NaN (not assessed).
"""

from __future__ import annotations

import ast
import csv
import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Pixel size of the paper's camera frames, µm.
PAPER_MPP = 0.0668
CELLS_CSV = "labeled_cells.csv"
FRAMES_CSV = "wsi.csv"
_DIAGNOSES = {"apl": "apl", "aml": "aml", "non_apl_aml": "aml", "nonapl": "aml", "non_apl": "aml",
              "healthy": "healthy", "hd": "healthy", "healthy_donor": "healthy", "control": "healthy",
              "normal": "healthy", "reactive": "reactive"}
_LABEL_HEADS = {"myeloblast": "myeloblast", "blast": "myeloblast", "promyelocyte": "promyelocyte",
                "auer_rod": "auer_rod", "auer_rods": "auer_rod", "auer": "auer_rod", "faggot_cell": "faggot_cell",
                "faggot": "faggot_cell", "faggot_cells": "faggot_cell"}


@dataclass
class PaperFrame:
    picture: Path
    patient: str
    diagnosis: str  # apl, aml, healthy, reactive (or the file's own word, lower case)


@dataclass
class PaperObject:
    picture: str    # imgName
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 picture pixels
    labels: frozenset[str]
    object_type: str  # cell, smudge, not_recognizeable
    line: int


def _key(text: str) -> str:
    return str(text).strip().lower().replace("-", "_").replace(" ", "_")


def _column(fields: list[str], path: Path, *names: str) -> str:
    keys = {_key(f).replace("_", ""): f for f in fields}
    for n in names:
        k = _key(n).replace("_", "")
        if k in keys:
            return keys[k]
    raise ValueError(f"{path}: no column {names[0]!r} (columns: {', '.join(fields)})")


def _find_picture(root: Path, name: str) -> Path:
    try:
        for cand in (root / name, root / "images" / name, root / "img" / name):
            if cand.is_file():
                return cand
        hits = sorted(p for p in root.rglob(glob.escape(Path(name).name)) if p.is_file())  # '': folders
    except (OSError, ValueError):  # a name the file system or glob refuses (e.g. too long): not there
        hits = []
    if hits:
        return hits[0]
    raise FileNotFoundError(f"{root}: picture {name!r} of {FRAMES_CSV} not found (next to the CSVs or in images/)")


def read_frames(root: Path) -> list[PaperFrame]:
    """The frames of ``wsi.csv`` with their patient and diagnosis."""
    root = Path(root)
    path = root / FRAMES_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {FRAMES_CSV} (the paper's layout: {FRAMES_CSV} and {CELLS_CSV})")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            c_id, c_img, c_lab = (_column(fields, path, "id"), _column(fields, path, "imgName", "image"),
                                  _column(fields, path, "label", "diagnosis"))
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc}); save it as CSV in UTF-8") from exc
    out = []
    for line, r in enumerate(rows, start=2):
        if None in (r[c_id], r[c_img], r[c_lab]):
            raise ValueError(f"{path}, line {line}: fewer fields than columns")
        dx = _key(r[c_lab])
        out.append(PaperFrame(_find_picture(root, r[c_img].strip()), str(r[c_id]).strip(), _DIAGNOSES.get(dx, dx)))
    if not out:
        raise ValueError(f"{path}: no frames")
    return out


def parse_labels(text: str, where: str) -> frozenset[str]:
    """A set literal of label names (``{'Promyelocyte', 'Auer rod'}``; ``set()`` or empty: none)."""
    t = str(text or "").strip()
    if not t or t == "set()":
        return frozenset()
    try:
        value = ast.literal_eval(t)  # literals only: never eval
    except (ValueError, SyntaxError, TypeError):  # TypeError: an unhashable member, {['a']}
        raise ValueError(f"{where}: labels {t!r} are not a set literal such as {{'Promyelocyte'}}") from None
    if isinstance(value, str):
        value = {value}
    if not isinstance(value, (set, frozenset, list, tuple)):
        raise ValueError(f"{where}: labels {t!r} are not a set of names")
    return frozenset(_key(v) for v in value)


def parse_bbox(text: str, where: str) -> tuple[float, float, float, float]:
    """``[min_row, min_col, max_row, max_col]`` -> (x0, y0, x1, y1)."""
    try:
        v = ast.literal_eval(str(text).strip())
        r0, c0, r1, c1 = (float(x) for x in v)
    except (ValueError, SyntaxError, TypeError, OverflowError):  # OverflowError: float() of a huge int
        raise ValueError(f"{where}: bbox {text!r} is not [min_row, min_col, max_row, max_col]") from None
    if not np.isfinite([r0, c0, r1, c1]).all():
        raise ValueError(f"{where}: bbox {text!r} is not finite numbers")
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"{where}: bbox {text!r} is empty (max_row <= min_row or max_col <= min_col)")
    return c0, r0, c1, r1


def read_objects(root: Path) -> list[PaperObject]:
    """Every row of ``labeled_cells.csv``."""
    path = Path(root) / CELLS_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {CELLS_CSV} (the paper's layout: {FRAMES_CSV} and {CELLS_CSV})")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            c_img, c_box = _column(fields, path, "imgName", "image"), _column(fields, path, "bbox")
            c_lab, c_typ = _column(fields, path, "labels", "label"), _column(fields, path, "objectType", "object_type")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc}); save it as CSV in UTF-8") from exc
    out = []
    for line, r in enumerate(rows, start=2):
        where = f"{path}, line {line}"
        if None in (r[c_img], r[c_box], r[c_lab], r[c_typ]):
            raise ValueError(f"{where}: fewer fields than columns")
        out.append(PaperObject(r[c_img].strip(), parse_bbox(r[c_box], where), parse_labels(r[c_lab], where),
                               _key(r[c_typ]) or "cell", line))
    return out


def head_labels(objects: list[PaperObject], heads: tuple[str, ...]) -> np.ndarray:
    """(n, heads): 1 where a cell's labels name the head's finding, 0 where not, NaN for a head whose
    finding no object of the file carries (not assessed)."""
    named = [frozenset(_LABEL_HEADS.get(lab, lab) for lab in o.labels) for o in objects]
    seen = frozenset().union(*named) if named else frozenset()
    y = np.zeros((len(objects), len(heads)), np.float32)
    for j, h in enumerate(heads):
        y[:, j] = [float(h in s) for s in named] if h in seen else np.nan
    return y


def paper_cells(root: Path, heads: tuple[str, ...], image_mpp: float | None, work_mpp: float | None):
    """The ``Cell`` objects as a :class:`~wsi_apl.train.cells.CellSet`, grouped by patient (``id``)."""
    from .train.cell_labels import cells_mpp
    from .train.cells import CellSet
    from .train.data import read_picture

    root = Path(root)
    frames = {f.picture.name: f for f in read_frames(root)}
    objects = [o for o in read_objects(root) if o.object_type == "cell"]
    missing = sorted({o.picture for o in objects} - set(frames))
    if missing:
        raise ValueError(f"{root / CELLS_CSV}: pictures not in {FRAMES_CSV}: {', '.join(missing[:5])}")
    y = head_labels(objects, heads)
    mpp = image_mpp or PAPER_MPP
    images, idx, centres, patients = [], [], [], []
    where: dict[str, int] = {}
    for o in objects:
        if o.picture not in where:
            img, fac = read_picture(frames[o.picture].picture, mpp, work_mpp)
            where[o.picture] = len(images)
            images.append((img, fac))
        k = where[o.picture]
        fac = images[k][1]
        x0, y0, x1, y1 = (v * fac for v in o.box)
        centres.append(((x0 + x1) / 2, (y0 + y1) / 2))
        idx.append(k)
        patients.append(frames[o.picture].patient)
    return CellSet([im for im, _ in images], np.asarray(idx, int), np.asarray(centres, np.float32).reshape(-1, 2),
                   y, np.asarray(patients), cells_mpp(mpp, work_mpp))


def paper_annotations(root: Path):
    """The frames with their ``Cell`` boxes as :class:`~wsi_apl.annotations.ImageAnnotation` (group:
    the patient), for the detector."""
    from .annotations import ImageAnnotation

    frames = read_frames(root)
    by_pic: dict[str, list[PaperObject]] = {}
    for o in read_objects(root):
        if o.object_type == "cell":
            by_pic.setdefault(o.picture, []).append(o)
    out = []
    for f in frames:
        objs = by_pic.get(f.picture.name, [])
        boxes = np.asarray([o.box for o in objs], np.float32).reshape(-1, 4)
        out.append(ImageAnnotation(f.picture, boxes, ["cell"] * len(objs), [{} for _ in objs], f.patient,
                                   {"patient": f.patient, "diagnosis": f.diagnosis}))
    return out


def paper_entries(root: Path, image_mpp: float | None = None):
    """The frames as labelled slides (:class:`~wsi_apl.train.data.SlideEntry`) for the slide-level nets:
    one camera frame per entry, grouped by patient, at ``image_mpp`` (default :data:`PAPER_MPP`)."""
    from .train.data import SlideEntry

    return [SlideEntry(f.picture.stem, f.patient, f.diagnosis, f.picture, None, image_mpp or PAPER_MPP)
            for f in read_frames(root)]


_WRITE_NAMES = {"myeloblast": "Myeloblast", "promyelocyte": "Promyelocyte", "myelocyte": "Myelocyte",
                "metamyelocyte": "Metamyelocyte", "band": "Band neutrophil", "neutrophil": "Segmented neutrophil",
                "eosinophil": "Eosinophil", "lymphocyte": "Lymphocyte", "plasma_cell": "Plasma cell",
                "erythroblast": "Erythroblast", "smudge": "Smudge cell"}
_WRITE_DX = {"apl": "APL", "aml": "AML", "healthy": "healthy", "reactive": "reactive"}


def write_paper_layout(cohort: Path) -> tuple[Path, Path]:
    """Write ``wsi.csv`` and ``labeled_cells.csv`` for a cohort of camera frames made by ``wsi-apl synth
    --plain`` (its ``truth/``), next to its pictures. Returns the two paths."""
    import json

    cohort = Path(cohort)
    frames, cells = [], []
    for t in sorted((cohort / "truth").glob("*.json")):
        truth = json.loads(t.read_text())
        if "cells" not in truth:
            continue
        if not truth.get("plain"):
            raise ValueError(f"{cohort}: {truth['slide']} is a whole slide; the paper's layout holds camera frames "
                             "(wsi-apl synth --plain)")
        frames.append({"id": truth["patient"], "imgName": truth["file"],
                       "label": _WRITE_DX.get(truth["diagnosis"], truth["diagnosis"])})
        for c in truth["cells"]:
            x0, y0, x1, y1 = c["box"]
            labels = {_WRITE_NAMES.get(c["type"], c["type"])}
            if c.get("auer_rod"):
                labels.add("Auer rod")
            if c.get("faggot"):
                labels.add("Faggot cell")
            bbox = [int(np.floor(y0)), int(np.floor(x0)), int(np.ceil(y1)), int(np.ceil(x1))]
            cells.append({"imgName": truth["file"], "bbox": str(bbox), "labels": repr(sorted(labels)).replace("[", "{")
                          .replace("]", "}"), "objectType": "Smudge" if c["type"] == "smudge" else "Cell"})
    if not frames:
        raise ValueError(f"{cohort}: no truth/*.json to write the paper's layout from")
    paths = cohort / FRAMES_CSV, cohort / CELLS_CSV
    for path, rows, fields in ((paths[0], frames, ["id", "imgName", "label"]),
                               (paths[1], cells, ["imgName", "bbox", "labels", "objectType"])):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    return paths
