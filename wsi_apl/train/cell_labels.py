"""Labelled single cells from a lab's own files: a CSV of boxes (``--cells``) or a VIA project
(``--via``), with the pictures they point at, as a :class:`CellSet` for ``wsi-apl train cells``."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .cells import CellSet

# -- labelled cells from a CSV ------------------------------------------------------------------

_FLOAT32_MAX = float(np.finfo(np.float32).max)  # cell centres are float32

_TRUE = {"1", "1.0", "true", "yes", "y", "pos", "positive", "x"}
_FALSE = {"0", "0.0", "false", "no", "n", "neg", "negative"}


def label_value(text: str, checkbox: bool = False) -> float:
    """1.0, 0.0 or NaN (not labelled) from a label's text; ``checkbox``: a VIA checkbox, where any
    ticked option is yes and nothing ticked is no. Raises ValueError for text that is no label."""
    v = str(text or "").strip().lower()
    if v in _TRUE or (v and checkbox and v not in _FALSE):
        return 1.0
    if v in _FALSE or (not v and checkbox):
        return 0.0
    if v:
        raise ValueError(f"{text!r} is not a label")
    return float("nan")


def read_cells_csv(path: Path, images: Path | None, heads: tuple[str, ...], image_mpp: float | None,
                   work_mpp: float | None, log: Callable[[str], None] = print) -> CellSet:
    """Labelled cells from a CSV: ``image, x0, y0, x1, y1`` (the picture's pixels), one column per head
    with 1/0 (yes/no, true/false; empty: not labelled, ignored by the loss), optional ``patient`` (the
    cross-validation group; default: the picture).

    Pictures are found under ``images`` (default: the CSV's folder) and resampled to ``work_mpp`` when
    ``image_mpp`` is known; the boxes with them. A picture that cannot be read is skipped with its
    cells, and listed (``log``).
    """

    from .data import read_picture

    path = Path(path)
    root = Path(images) if images is not None else path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or [])
            column = {head_key(c): c for c in cols}  # head -> the CSV's spelling
            need = {"image", "x0", "y0", "x1", "y1"}
            if not need <= cols:
                raise ValueError(f"{path}: needs columns {', '.join(sorted(need))} (missing: "
                                 f"{', '.join(sorted(need - cols))})")
            have = [h for h in heads if h in column]
            if not have:
                raise ValueError(f"{path}: no label column for any head ({', '.join(heads)}); add a column per "
                                 "finding with 1/0 (empty when not labelled)")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc}); save it as CSV in UTF-8") from exc
    by_image: dict[str, list[tuple[int, dict]]] = {}
    for i, r in enumerate(rows, start=2):
        if any(r[c] is None for c in need):
            raise ValueError(f"{path}, line {i}: fewer fields than columns (needs {', '.join(sorted(need))})")
        by_image.setdefault(r["image"].strip(), []).append((i, r))
    images_out, idx, centres, labels, patients = [], [], [], [], []
    unreadable = []
    for name, items in sorted(by_image.items()):
        pic = root / name
        try:
            found = pic.exists()
        except OSError:  # a name the file system refuses (e.g. too long): not there
            found = False
        if not found:
            raise FileNotFoundError(f"{path}: picture {name!r} not found in {root} (give --images DIR)")
        try:
            img, fac = read_picture(pic, image_mpp, work_mpp)
        except ValueError as exc:
            unreadable.append((str(exc), len(items)))
            continue
        k = len(images_out)
        images_out.append(img)
        for line, r in items:
            try:
                x0, y0, x1, y1 = (float(r[c]) * fac for c in ("x0", "y0", "x1", "y1"))
            except ValueError as exc:
                raise ValueError(f"{path}, line {line}: the box is not numbers ({exc})") from exc
            if not all(abs(v) <= _FLOAT32_MAX for v in (x0, y0, x1, y1)):  # NaN, inf, beyond float32
                raise ValueError(f"{path}, line {line}: the box ({', '.join(r[c] for c in ('x0', 'y0', 'x1', 'y1'))}) "
                                 "is not finite numbers")
            y = np.full(len(heads), np.nan, np.float32)
            for j, h in enumerate(heads):
                try:
                    y[j] = label_value(r.get(column.get(h, h), ""))
                except ValueError:
                    raise ValueError(f"{path}, line {line}: {column[h]}={r[column[h]]!r} is not a label "
                                     "(use 1, 0 or leave empty)") from None
            centres.append(((x0 + x1) / 2, (y0 + y1) / 2))
            idx.append(k)
            labels.append(y)
            patients.append((r.get("patient") or "").strip() or name)
    _report_unreadable(path, unreadable, log)
    return CellSet(images_out, np.asarray(idx, int), np.asarray(centres, np.float32).reshape(-1, 2),
                   np.asarray(labels, np.float32).reshape(-1, len(heads)), np.asarray(patients),
                   cells_mpp(image_mpp, work_mpp))


def _report_unreadable(source: Path, unreadable: list[tuple[str, int]], log: Callable[[str], None]) -> None:
    """Say which pictures were skipped (and how many cells with them)."""
    if not unreadable:
        return
    log(f"  {source}: skipped {len(unreadable)} unreadable picture(s) with {sum(n for _, n in unreadable)} cells:")
    for why, _n in unreadable[:20]:
        log(f"    {why}")
    if len(unreadable) > 20:
        log(f"    ... and {len(unreadable) - 20} more")


def cells_mpp(image_mpp: float | None, work_mpp: float | None) -> float:
    """The pixel size of pictures read by :func:`~wsi_apl.train.data.read_picture`: ``work_mpp`` when
    resampled, else their own (1.0 when unknown: ``crop_um`` then counts pixels)."""
    return float(work_mpp) if image_mpp and work_mpp else float(image_mpp or 1.0)


#: Other spellings of the heads in label columns and VIA attributes (after lower case, spaces and
#: hyphens to underscores).
HEAD_ALIASES = {"auer": "auer_rod", "auer_rods": "auer_rod", "auerrod": "auer_rod", "faggot": "faggot_cell",
                "faggot_cells": "faggot_cell", "fagot_cell": "faggot_cell", "myeloblasts": "myeloblast",
                "promyelocytes": "promyelocyte"}
#: Heads that are cell types: a region whose type/label names another cell type is negative for them.
TYPE_HEADS = ("myeloblast", "promyelocyte")


def head_key(name: str) -> str:
    """A label column / attribute / cell type name in the heads' spelling (``Auer rods`` -> ``auer_rod``)."""
    k = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    return HEAD_ALIASES.get(k, k)


def _via_checkboxes(path: Path) -> set[str]:
    """Names of the region attributes a VIA project declares as checkboxes (unticked means no)."""

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    out = set()
    if isinstance(data, dict) and isinstance(data.get("_via_attributes"), dict):  # VIA 2
        for name, spec in (data["_via_attributes"].get("region") or {}).items():
            if isinstance(spec, dict) and spec.get("type") == "checkbox":
                out.add(head_key(name))
    if isinstance(data, dict) and isinstance(data.get("attribute"), dict):  # VIA 3: type 2 is a checkbox
        for spec in data["attribute"].values():
            if isinstance(spec, dict) and spec.get("type") == 2 and spec.get("anchor_id") != "FILE1_Z0_XY0":
                out.add(head_key(spec.get("aname", "")))
    return out


def read_via_cells(path: Path, images: Path | None, heads: tuple[str, ...], image_mpp: float | None,
                   work_mpp: float | None, log: Callable[[str], None] = print) -> CellSet:
    """Labelled cells from a VIA project (VIA 2 or 3): every region is a cell, its region attributes
    the labels. A head is labelled by an attribute of its name (``auer_rod``, ``Auer rod``,
    ``faggot_cell``...: yes/no, 1/0, a ticked or unticked checkbox); the cell-type heads (myeloblast,
    promyelocyte) also by the region's type/label attribute (its type: 1; another type: 0). Anything
    else is not labelled (ignored by the loss). The patient is the file attribute ``patient`` (else
    the picture)."""
    from ..annotations import LABEL_KEYS, read_via
    from .data import read_picture

    path = Path(path)
    items = read_via(path, images)
    checkbox = _via_checkboxes(path)
    images_out, idx, centres, labels, patients = [], [], [], [], []
    unreadable = []
    for it in items:
        if len(it.boxes) == 0:
            continue
        try:
            img, fac = read_picture(it.image, image_mpp, work_mpp)
        except ValueError as exc:
            unreadable.append((str(exc), len(it.boxes)))
            continue
        images_out.append(img)
        for i, box in enumerate(np.asarray(it.boxes, np.float64) * fac):
            attrs = {head_key(a): str(v).strip() for a, v in it.attributes[i].items()}
            label = next((attrs[k] for k in LABEL_KEYS if attrs.get(k)), it.labels[i])
            label = head_key(label) if label else ""
            y = np.full(len(heads), np.nan, np.float32)
            for j, h in enumerate(heads):
                if h in attrs:
                    try:
                        y[j] = label_value(attrs[h], h in checkbox)
                    except ValueError:
                        raise ValueError(f"{path}: {it.image.name}, region {i + 1}: {h}={attrs[h]!r} is not a label "
                                         "(use yes/no, 1/0 or a checkbox)") from None
                elif h in TYPE_HEADS and label:
                    y[j] = float(label == h)
            centres.append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
            idx.append(len(images_out) - 1)
            labels.append(y)
            patients.append(it.group)
    _report_unreadable(path, unreadable, log)
    cells = CellSet(images_out, np.asarray(idx, int), np.asarray(centres, np.float32).reshape(-1, 2),
                    np.asarray(labels, np.float32).reshape(-1, len(heads)), np.asarray(patients),
                    cells_mpp(image_mpp, work_mpp))
    if len(cells) == 0 or np.all(np.isnan(cells.labels)):
        raise ValueError(f"{path}: no region carries a label for any head ({', '.join(heads)}); give each cell a "
                         "type attribute and/or a yes/no (checkbox) attribute per finding, e.g. auer_rod")
    return cells


def read_labelled_cells(cells_csv: Path | None, via: Path | None, images: Path | None, heads: tuple[str, ...],
                        image_mpp: float | None, work_mpp: float | None, log: Callable[[str], None] = print) -> CellSet:
    """Labelled cells from a CSV (:func:`read_cells_csv`) or a VIA project (:func:`read_via_cells`)."""
    if via is not None:
        return read_via_cells(via, images, heads, image_mpp, work_mpp, log)
    return read_cells_csv(cells_csv, images, heads, image_mpp, work_mpp, log)
