"""Training data from a labelled cohort: areas read through the same path a scan uses.

A cohort folder holds slides, ``labels.csv`` and ``truth/<slide>.json`` (the synthetic ground truth,
or any annotation converted to it). Areas are chosen by the tile selector (what a scan would look
at) plus a few random areas anywhere on the smear (so the models also see thick and thin parts),
read at the bundle's mpp; ground-truth cells are mapped into area pixels.
"""

from __future__ import annotations

import csv
import glob
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tile_selector.select import SelectorConfig, select_areas
from tile_selector.slide import open_slide

#: Cell types the detector is trained to find by default: every nucleated cell except smudge cells
#: (broken cells are not counted, so the ratios' denominator leaves them out).
DEFAULT_DETECT_TYPES = ("myeloblast", "promyelocyte", "myelocyte", "metamyelocyte", "band", "neutrophil",
                        "eosinophil", "lymphocyte", "plasma_cell", "erythroblast")


@dataclass
class SlideEntry:
    slide: str
    patient: str
    diagnosis: str
    path: Path
    truth_path: Path | None = None
    mpp: float | None = None  # the file's pixel size where it states none (camera frames)

    def truth(self) -> dict:
        if self.truth_path is None or not self.truth_path.exists():
            raise FileNotFoundError(f"{self.path}: no ground truth (expected {self.truth_path})")
        return json.loads(self.truth_path.read_text())


def read_labels(labels_csv: str | Path) -> list[SlideEntry]:
    """Rows of a labels file: ``slide, patient, diagnosis[, path]`` (paths relative to the file)."""
    labels_csv = Path(labels_csv)
    base = labels_csv.parent
    out = []
    try:
        with labels_csv.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"slide", "patient", "diagnosis"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{labels_csv}: missing column(s) {', '.join(sorted(missing))} "
                                 "(expected: slide, patient, diagnosis[, path])")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{labels_csv}: not a readable CSV file ({exc}); save it as CSV in UTF-8") from exc
    for line, row in enumerate(rows, start=2):
        if any(row[k] is None for k in ("slide", "patient", "diagnosis")):
            raise ValueError(f"{labels_csv}, line {line}: fewer fields than columns (expected: slide, patient, "
                             "diagnosis[, path])")
        rel = row.get("path") or row["slide"]
        p = Path(rel)
        path = p if p.is_absolute() else base / p
        if not _exists(path) and not p.suffix:
            try:
                hits = sorted(base.glob(f"{glob.escape(row['slide'])}.*"))
            except (ValueError, NotImplementedError):  # a name glob cannot take (absolute, empty...)
                hits = []
            path = hits[0] if hits else path
        truth = base / "truth" / f"{row['slide']}.json"
        out.append(SlideEntry(row["slide"], row["patient"], row["diagnosis"].strip().lower(), path,
                              truth if _exists(truth) else None))
    return out


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name the file system refuses (e.g. too long): not there
        return False


def read_cohort(cohort_dir: str | Path) -> list[SlideEntry]:
    cohort_dir = Path(cohort_dir)
    labels = cohort_dir / "labels.csv"
    if not labels.exists():
        raise FileNotFoundError(f"{cohort_dir}: no labels.csv (make a cohort with 'wsi-apl synth {cohort_dir}')")
    return read_labels(labels)


@dataclass
class AreaSample:
    """One area image with its ground-truth cells in area pixels."""

    slide: str
    patient: str
    diagnosis: str
    image: np.ndarray            # (h, w, 3) uint8 at the bundle mpp
    boxes: np.ndarray            # (n, 4) float32 area px (cells to detect)
    types: list[str]
    auer: np.ndarray             # (n,) bool
    box_l0: tuple[float, float, float, float]
    selected: bool = True        # chosen by the selector (False: random smear area)
    extra: dict = field(default_factory=dict)
    faggot: np.ndarray | None = None  # (n,) bool: faggot cell (bundle of Auer rods); None: not labelled
    cell_image: np.ndarray | None = None  # the same area at the cell crops' finer pixel size; None: ``image``


def _truth_in_area(truth: dict, box_l0, size, types: tuple[str, ...] | None, min_visible: float = 0.5):
    x0, y0, x1, y1 = box_l0
    sx = size[0] / (x1 - x0)
    sy = size[1] / (y1 - y0)
    boxes, kinds, auer, faggot = [], [], [], []
    for c in truth["cells"]:
        if types is not None and c["type"] not in types:
            continue
        bx0, by0, bx1, by1 = c["box"]
        if bx1 <= x0 or bx0 >= x1 or by1 <= y0 or by0 >= y1:
            continue
        cx0, cy0, cx1, cy1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
        full = (bx1 - bx0) * (by1 - by0)
        if full <= 0 or (cx1 - cx0) * (cy1 - cy0) / full < min_visible:
            continue
        boxes.append([(cx0 - x0) * sx, (cy0 - y0) * sy, (cx1 - x0) * sx, (cy1 - y0) * sy])
        kinds.append(c["type"])
        auer.append(bool(c.get("auer_rod", False)))
        faggot.append(bool(c.get("faggot", False)))
    return (np.asarray(boxes, np.float32).reshape(-1, 4), kinds, np.asarray(auer, bool), np.asarray(faggot, bool))


def random_smear_boxes(truth: dict, slide_dims: tuple[int, int], box_px0: tuple[float, float], n: int,
                       rng: np.random.Generator, maps_dir: Path,
                       monolayer: bool = False) -> list[tuple[float, float, float, float]]:
    """Up to ``n`` random boxes lying on the smear (any zone; ``monolayer``: in the truth's monolayer
    zone), from the truth's zone map."""
    maps = np.load(maps_dir / truth["maps"])
    zones, map_mpp = maps["zones"], float(maps["map_mpp"])
    mpp = float(truth["mpp"])
    W, H = slide_dims
    out = []
    for _ in range(n * 30):
        if len(out) >= n or W <= box_px0[0] or H <= box_px0[1]:
            break
        x0 = float(rng.uniform(0, W - box_px0[0]))
        y0 = float(rng.uniform(0, H - box_px0[1]))
        zx0, zy0 = int(x0 * mpp / map_mpp), int(y0 * mpp / map_mpp)
        zx1, zy1 = int((x0 + box_px0[0]) * mpp / map_mpp) + 1, int((y0 + box_px0[1]) * mpp / map_mpp) + 1
        z = zones[zy0:zy1, zx0:zx1]
        if z.size and ((z == 2).mean() >= 0.9 if monolayer else (z > 0).mean() > 0.9):
            out.append((x0, y0, x0 + box_px0[0], y0 + box_px0[1]))
    return out


def area_samples(entry: SlideEntry, area_size: tuple[int, int], area_mpp: float, *, n_selected: int = 6,
                 n_random: int = 2, types: tuple[str, ...] | None = DEFAULT_DETECT_TYPES, seed: int = 0,
                 reader: str = "auto", cell_size: tuple[int, int] | None = None) -> list[AreaSample]:
    """Areas of one slide with their truth cells: the selector's choice (filled up to ``n_selected``
    with random areas of the truth's monolayer zone when it finds fewer) plus ``n_random`` random
    smear areas of any zone. ``cell_size``: each area is also read at this pixel size for the cell
    crops (``AreaSample.cell_image``; see ``workers.area.cell_read``)."""
    truth = entry.truth()
    slide = open_slide(entry.path, reader=reader)
    try:
        sel = select_areas(slide, area_size, area_mpp, SelectorConfig(max_areas=n_selected, target_cells=0))
        boxes = [(a.box, True) for a in sel.areas]
        if not truth.get("plain"):
            rng = np.random.default_rng([seed, zlib.crc32(entry.slide.encode())])
            px0 = (area_size[0] * area_mpp / slide.mpp_x, area_size[1] * area_mpp / slide.mpp_y)
            if len(boxes) < n_selected:
                # the selector is strict (a scan wants only the best areas); training also needs
                # slides where it found few: fill up with areas the truth puts in the monolayer
                boxes += [(b, False) for b in random_smear_boxes(truth, slide.dimensions, px0, n_selected - len(boxes),
                                                                   rng, entry.truth_path.parent, monolayer=True)]
            if n_random:
                boxes += [(b, False) for b in random_smear_boxes(truth, slide.dimensions, px0, n_random, rng,
                                                                   entry.truth_path.parent)]
        out = []
        for box, selected in boxes:
            img = slide.read_area(box, area_size).image
            fine = slide.read_area(box, cell_size, upsample=True).image if cell_size else None
            b, kinds, auer, faggot = _truth_in_area(truth, box, area_size, types)
            out.append(AreaSample(entry.slide, entry.patient, entry.diagnosis, img, b, kinds, auer,
                                  tuple(float(v) for v in box), selected, faggot=faggot, cell_image=fine))
        return out
    finally:
        slide.close()


def median_box_size(samples: list, default: float) -> float:
    """Median side (geometric mean of width and height, pixels) of the samples' boxes; ``default`` without boxes."""
    sizes = [np.sqrt(np.prod(s.boxes[:, 2:] - s.boxes[:, :2], axis=1)) for s in samples if len(s.boxes)]
    return float(np.median(np.concatenate(sizes))) if sizes else float(default)


def read_picture(path: Path, image_mpp: float | None = None, work_mpp: float | None = None) -> tuple[np.ndarray, float]:
    """A picture as RGB uint8, resampled to ``work_mpp`` when both pixel sizes are known and differ.

    Returns (image, factor): multiply the picture's own pixel coordinates by ``factor`` to get the
    returned image's.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PIL: truncated, corrupt,
        # not a picture, impossible dimensions, a header claiming billions of pixels
        raise ValueError(f"{path}: cannot read this picture ({exc}); convert it to PNG/JPEG/TIFF "
                         "or remove it from the annotations") from exc
    f = 1.0
    if image_mpp and work_mpp and abs(image_mpp / work_mpp - 1.0) > 1e-3:
        f = image_mpp / work_mpp
        w, h = img.size
        img = img.resize((max(1, int(round(w * f))), max(1, int(round(h * f)))), Image.Resampling.LANCZOS)
    return np.array(img), f


def image_samples(items: list, image_mpp: float | None = None, work_mpp: float | None = None) -> list[AreaSample]:
    """Annotated pictures (:class:`wsi_apl.annotations.ImageAnnotation`) as training/evaluation samples.

    A picture is used at its own pixels unless both its pixel size (``image_mpp``) and the bundle's
    working resolution (``work_mpp``) are known and differ: then it is resampled to ``work_mpp`` and
    its boxes with it (:func:`read_picture`). The annotation's group (patient) becomes the sample's patient.
    """
    out = []
    for it in items:
        arr, f = read_picture(it.image, image_mpp, work_mpp)
        boxes = np.asarray(it.boxes, np.float32).reshape(-1, 4) * np.float32(f)
        out.append(AreaSample(it.image.stem, it.group, "", arr, boxes, list(it.labels),
                              np.zeros(len(boxes), bool), (0.0, 0.0, float(arr.shape[1]), float(arr.shape[0])),
                              True, {"image": str(it.image)}))
    return out
