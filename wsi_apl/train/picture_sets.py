"""Labelled single-cell pictures in class folders: training and evaluating the heads on real cells.

A *folder set* is a directory whose subfolders are classes (``BLA/``, ``PMO/``, ``lymphocyte/``...),
one cell per picture at its centre, as public cell-morphology sets are published (Matek et al.
2021's bone marrow, Acevedo et al. 2020's peripheral blood). Where one folder mixes classes, the
class is the picture's file-name prefix (PBC's ``ig/`` holds ``PMY_``, ``MY_``, ``MMY_`` and ``IG_``).

A class becomes head labels through a *class map*: 1, 0 or not labelled (NaN, ignored by the loss)
per head. :data:`BUILTIN_CLASSES` covers both published layouts; ``--class-map MAP.csv`` (``class``,
then one column per head with 1/0/empty) covers any other set, and replaces the built-in one.

Each picture is read at the heads' own pixel size (resampled from ``image_mpp``) and only a window a
little larger than the crop is kept, padded with the picture's glass colour where the picture is
smaller than the crop: the crop keeps its physical size, never stretched. 3,000 pictures hold about
230 MB of pixels at the small backbone's 0.25 µm/px. A picture that cannot be read is listed and
skipped, never the end of the run.

Published sets carry no patient ids: each picture is its own group, so a validation split by
picture may put cells of one patient on both sides and its figures can be optimistic.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cell_labels import head_key, label_value
from .cells import CellSet

PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
#: The window kept per picture, as a multiple of the crop: room for the training jitter of centre
#: and scale.
WINDOW_MARGIN = 1.25

_NEG = {"myeloblast": 0.0, "promyelocyte": 0.0}
#: Class name (lower case) -> head labels; a head left out is not labelled (NaN). Blasts are
#: myeloblast-positive, promyelocytes promyelocyte-positive, every other class negative for both —
#: except where a class may hold either: PBC's unspecified immature granulocytes (``IG``) may be
#: promyelocytes, and monoblasts or immature lymphocytes are not myeloblasts for sure, so those
#: heads are left unlabelled there. Faggot cells (Matek's ``FGC``) are APL promyelocytes with rods.
BUILTIN_CLASSES: dict[str, dict[str, float]] = {
    # blasts (Matek 2021 BLA, Matek 2019 MYO)
    **{k: {"myeloblast": 1.0, "promyelocyte": 0.0} for k in ("bla", "blast", "blasts", "myeloblast", "myo")},
    # promyelocytes (Matek PMO, PBC PMY, Matek 2019's bilobed APL promyelocyte PMB)
    **{k: {"myeloblast": 0.0, "promyelocyte": 1.0} for k in ("pmo", "pmy", "pmb", "promyelocyte", "promyelocytes")},
    "fgc": {"myeloblast": 0.0, "promyelocyte": 1.0, "auer_rod": 1.0, "faggot_cell": 1.0},
    "ig": {"myeloblast": 0.0},
    **{k: {"promyelocyte": 0.0} for k in ("mob", "monoblast", "lyi")},
    **{k: dict(_NEG) for k in (
        # Matek 2021 bone marrow
        "eos", "lyt", "mon", "ngs", "nif", "ngb", "bas", "ebo", "mmz", "myb", "plm", "peb", "abe", "art",
        "hac", "ksc", "oth", "lya",
        # PBC peripheral blood (folders and file-name prefixes)
        "neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "erythroblast", "platelet",
        "my", "mmy", "bne", "sne", "seg", "ly", "mo", "eo", "ba", "erb",
        # plain names
        "myelocyte", "metamyelocyte", "band", "plasma_cell", "smudge", "artefact", "artifact")},
}


@dataclass
class FolderSource:
    """One folder set: its path, the pictures' pixel size and an optional class map."""

    path: Path
    mpp: float | None = None
    class_map: Path | None = None

    @classmethod
    def parse(cls, spec: str, default_mpp: float | None = None, class_map: Path | None = None) -> "FolderSource":
        """``DIR`` or ``DIR:MPP`` (the pictures' µm per pixel; default ``default_mpp``)."""
        path, mpp = spec, default_mpp
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                mpp = float(tail)
                path = head
            except ValueError:
                pass
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such folder (--folders DIR[:MPP], one subfolder per class)")
        if mpp is None:
            raise ValueError(f"{p}: the pictures' pixel size is needed (--folders {p}:MPP or --image-mpp MPP); "
                             f"'wsi-apl estimate-mpp {p}' estimates it from the red cells")
        if not mpp > 0:
            raise ValueError(f"{p}: pixel size {mpp} is not a positive number of µm per pixel")
        return cls(p, float(mpp), class_map)


@dataclass
class PictureReport:
    """What reading folder sets found: pictures per class, unreadable and unmapped pictures."""

    classes: Counter = field(default_factory=Counter)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unmapped: Counter = field(default_factory=Counter)  # class -> pictures without a mapping
    padded: int = 0  # pictures smaller than the crop (padded with their glass colour)

    def lines(self) -> list[str]:
        out = ["classes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.classes.items()))]
        if self.padded:
            out.append(f"{self.padded} pictures are smaller than the crop: padded with their glass colour, "
                       "never stretched")
        if self.unmapped:
            out.append("skipped, no mapping to the heads: " + ", ".join(f"{k} ({v})" for k, v in
                                                                    sorted(self.unmapped.items()))
                       + " (give --class-map MAP.csv)")
        if self.unreadable:
            out.append(f"skipped {len(self.unreadable)} unreadable picture(s):")
            out += [f"  {p}: {why}" for p, why in self.unreadable[:20]]
            if len(self.unreadable) > 20:
                out.append(f"  ... and {len(self.unreadable) - 20} more")
        return out

    def to_json(self) -> dict:
        return {"classes": dict(self.classes), "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
                "unmapped": dict(self.unmapped), "padded": self.padded}


def read_class_map(path: Path, heads: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``class, <head>, <head>...`` rows with 1/0/empty (yes/no...): class -> head labels."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {head_key(c): c for c in reader.fieldnames or []}
        if "class" not in cols:
            raise ValueError(f"{path}: needs a 'class' column, then one column per head ({', '.join(heads)}) "
                             "with 1, 0 or empty")
        have = [h for h in heads if h in cols]
        if not have:
            raise ValueError(f"{path}: no column for any head ({', '.join(heads)})")
        out: dict[str, dict[str, float]] = {}
        for line, row in enumerate(reader, start=2):
            name = class_key(row[cols["class"]])
            if not name:
                continue
            labels = {}
            for h in have:
                try:
                    v = label_value(row.get(cols[h], ""))
                except ValueError:
                    raise ValueError(f"{path}, line {line}: {h}={row[cols[h]]!r} is not a label "
                                     "(use 1, 0 or leave empty)") from None
                if v == v:
                    labels[h] = v
            out[name] = labels
    if not out:
        raise ValueError(f"{path}: no classes")
    return out


def class_key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def file_prefix(path: Path) -> str:
    """The class-like prefix of a file name: the letters before the first ``_``, ``-`` or digit."""
    m = re.match(r"([A-Za-z]+)(?:[_\-\d]|$)", path.stem)
    return class_key(m.group(1)) if m else ""


def picture_classes(root: Path, table: dict) -> tuple[list[tuple[Path, str]], Counter]:
    """(picture, class) for every picture under ``root``'s subfolders, and the unmapped classes.

    A subfolder is one class (its name), unless its files carry two or more different known
    file-name prefixes: then each file's prefix is its class. Pictures directly in ``root`` are
    classed by their prefix.
    """
    out: list[tuple[Path, str]] = []
    unmapped: Counter = Counter()
    groups: dict[Path, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES:
            rel = p.relative_to(root)
            groups.setdefault(root / rel.parts[0] if len(rel.parts) > 1 else root, []).append(p)
    for folder, files in groups.items():
        prefixes = {file_prefix(f) for f in files}
        known = {q for q in prefixes if q in table}
        folder_class = class_key(folder.name) if folder != root else ""
        for f in files:
            if len(known) >= 2 or folder == root or (folder_class not in table and known):
                cls = file_prefix(f)
            else:
                cls = folder_class
            if cls in table:
                out.append((f, cls))
            else:
                unmapped[cls or folder.name] += 1
    return out, unmapped


def glass_colour(img: np.ndarray) -> np.ndarray:
    """The picture's glass (background) colour: the mean of its brightest tenth of pixels."""
    flat = img.reshape(-1, 3).astype(np.float32)
    grey = flat.mean(axis=1)
    return flat[grey >= np.percentile(grey, 90)].mean(axis=0)


def picture_window(path: Path, image_mpp: float, cell_mpp: float, window_px: int,
                   crop_px: float | None = None) -> tuple[np.ndarray, bool]:
    """The ``window_px`` square around the picture's centre at ``cell_mpp`` (uint8 RGB) and whether the
    picture is smaller than a crop of ``crop_px`` (default: the window), so that crops are padded with
    its glass colour: resampled with antialiasing, never stretched.

    Raises OSError / ValueError for a picture that cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB")
    except Image.DecompressionBombError as exc:  # far larger than a picture of one cell
        raise ValueError(f"{path}: {exc}") from exc
    f = float(image_mpp) / float(cell_mpp)  # output pixels per picture pixel
    w, h = img.size
    # cut the window's footprint first (a large picture is not resampled whole)
    need = window_px / f
    cx, cy = w / 2.0, h / 2.0
    x0, y0 = max(0, int(math.floor(cx - need / 2 - 2))), max(0, int(math.floor(cy - need / 2 - 2)))
    x1, y1 = min(w, int(math.ceil(cx + need / 2 + 2))), min(h, int(math.ceil(cy + need / 2 + 2)))
    img = img.crop((x0, y0, x1, y1))
    nw, nh = max(1, int(round((x1 - x0) * f))), max(1, int(round((y1 - y0) * f)))
    arr = np.asarray(img.resize((nw, nh), Image.Resampling.LANCZOS) if abs(f - 1.0) > 1e-3 else img)
    # the picture's centre in the resampled cut, then the window around it
    ccx, ccy = (cx - x0) * nw / (x1 - x0), (cy - y0) * nh / (y1 - y0)
    wx0, wy0 = int(round(ccx - window_px / 2)), int(round(ccy - window_px / 2))
    out = np.empty((window_px, window_px, 3), np.uint8)
    out[:] = np.clip(np.round(glass_colour(arr)), 0, 255).astype(np.uint8)
    sx0, sy0 = max(0, wx0), max(0, wy0)
    sx1, sy1 = min(nw, wx0 + window_px), min(nh, wy0 + window_px)
    padded = min(w, h) * f < (crop_px or window_px) - 0.5
    out[sy0 - wy0:sy1 - wy0, sx0 - wx0:sx1 - wx0] = arr[sy0:sy1, sx0:sx1]
    return out, padded


def window_px(crop_um: float, cell_mpp: float) -> int:
    """Side of the window kept per picture, pixels at ``cell_mpp``."""
    return int(math.ceil(crop_um / cell_mpp * WINDOW_MARGIN / 2)) * 2


def read_folder_sets(sources: list[FolderSource], heads: tuple[str, ...], cell_mpp: float, crop_um: float,
                     log: Callable[[str], None] = print) -> tuple[CellSet, PictureReport]:
    """Every mapped picture of ``sources`` as one labelled cell at the heads' pixel size ``cell_mpp``.

    Each picture is its own group (``patients``: ``source/class/file``): the sets have no patient ids.
    """
    import time

    report = PictureReport()
    win = window_px(crop_um, cell_mpp)
    images, labels, groups, source_of = [], [], [], []
    t0 = time.time()
    for src in sources:
        table = read_class_map(src.class_map, heads) if src.class_map else BUILTIN_CLASSES
        items, unmapped = picture_classes(src.path, table)
        report.unmapped.update(unmapped)
        if not items:
            raise ValueError(f"{src.path}: no picture of a mapped class ({', '.join(PICTURE_SUFFIXES)} in one "
                             "subfolder per class); give --class-map MAP.csv for other class names")
        n0 = len(images)
        for k, (pic, cls) in enumerate(items):
            try:
                img, padded = picture_window(pic, src.mpp, cell_mpp, win, crop_um / cell_mpp)
            except (OSError, ValueError, SyntaxError) as exc:  # PIL: truncated, corrupt or not a picture
                report.unreadable.append((str(pic), str(exc) or type(exc).__name__))
                continue
            images.append(img)
            report.padded += padded
            report.classes[f"{src.path.name}/{cls}"] += 1
            y = np.full(len(heads), np.nan, np.float32)
            for j, h in enumerate(heads):
                y[j] = table[cls].get(h, np.nan)
            labels.append(y)
            groups.append(f"{src.path.name}/{pic.relative_to(src.path)}")
            source_of.append(src.path.name)
            if (k + 1) % 500 == 0:
                log(f"  {src.path.name}: read {k + 1}/{len(items)} pictures "
                    f"({(len(images)) / max(1e-6, time.time() - t0):.0f} pictures/s)")
        log(f"  {src.path}: {len(images) - n0} pictures at {src.mpp:g} µm/px -> {cell_mpp:g} µm/px")
    n = len(images)
    centre = np.full((n, 2), win / 2.0, np.float32)
    cells = CellSet(images, np.arange(n), centre, np.asarray(labels, np.float32).reshape(n, len(heads)),
                    np.asarray(groups), float(cell_mpp), sources=np.asarray(source_of))
    return cells, report
