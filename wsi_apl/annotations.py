"""Cell box annotations for training and evaluating a cell detector.

Readers: VGG Image Annotator (VIA) 1.x/2.x annotation exports and project files, VIA 3 projects
(:func:`read_via` tells them apart) and Pascal VOC XML folders (:func:`read_voc`). Writer: a VIA 2
project in the 2.0.10 format (:func:`write_via`) that :func:`read_via` reads back.

Every shape becomes an axis-aligned box ``x0, y0, x1, y1`` in image pixels: rectangles as given,
circles and (rotated) ellipses by their exact bounding box, polygons, polylines, lines and VIA 3
extreme rectangles by the bounding box of their points, VIA 3 extreme circles by the circle through
their three points. Points have no extent and are skipped. Boxes are clipped to the image when its
size is known (VOC ``<size>``, else read from the image header with PIL) and boxes narrower or
lower than 1 px are dropped. Skipped shapes and dropped boxes are reported with one
``UserWarning`` per annotation file.
"""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LABEL_KEYS = ("label", "class", "type", "cell", "cell_type", "name")
GROUP_KEYS = ("patient", "patient_id", "case", "subject")
FIX = "pass --images DIR pointing at the folder holding the images"
_VIA3_SHAPES = {1: "point", 2: "rect", 3: "circle", 4: "ellipse", 5: "line", 6: "polyline",
                7: "polygon", 8: "extreme_rect", 9: "extreme_circle"}
_VIA2_SETTINGS = {
    "ui": {"annotation_editor_height": 25, "annotation_editor_fontsize": 0.8, "leftsidebar_width": 18,
           "image_grid": {"img_height": 80, "rshape_fill": "none", "rshape_fill_opacity": 0.3,
                          "rshape_stroke": "yellow", "rshape_stroke_width": 2, "show_region_shape": True,
                          "show_image_policy": "all"},
           "image": {"region_label": "label", "region_color": "__via_default_region_color__",
                     "region_label_font": "10px Sans", "on_image_annotation_editor_placement": "NEAR_REGION"}},
    "core": {"buffer_size": 18, "filepath": {}, "default_filepath": ""},
}

Box = tuple[float, float, float, float]
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # boxes are float32: larger coordinates would become inf


@dataclass
class ImageAnnotation:
    """The boxes of one image; ``boxes[i]``, ``labels[i]`` and ``attributes[i]`` describe box ``i``."""

    image: Path  # resolved path of the image file
    boxes: np.ndarray  # (n, 4) float32: x0, y0, x1, y1 in image pixels
    labels: list[str]  # one per box ("" when the annotation has none)
    attributes: list[dict]  # one str -> str dict per box: all region attributes
    group: str  # patient id from the file attributes, else the image's stem
    file_attributes: dict = field(default_factory=dict)


def _text(value) -> str:
    """An attribute value as text; VIA checkbox values ``{option: true}`` become ``a+b``."""
    if isinstance(value, dict):
        return "+".join(str(k) for k, on in value.items() if on)
    return "" if value is None else str(value)


def _label(attrs: dict[str, str]) -> str:
    for key, value in attrs.items():
        if key.lower() in LABEL_KEYS:
            return value
    return next(iter(attrs.values())) if len(attrs) == 1 else ""


def _group(file_attrs: dict, image: Path) -> str:
    for key, value in file_attrs.items():
        if key.lower() in GROUP_KEYS and _text(value).strip():
            return _text(value).strip()
    return image.stem


def _points_box(xs, ys) -> Box:
    xs, ys = [float(v) for v in xs], [float(v) for v in ys]
    if not xs or len(xs) != len(ys):
        raise ValueError("point lists are empty or of different lengths")
    return min(xs), min(ys), max(xs), max(ys)


def _ellipse_box(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0) -> Box:
    """Exact bounding box of an ellipse with semi-axes ``rx``, ``ry`` rotated by ``theta`` radians."""
    c, s = math.cos(theta), math.sin(theta)
    hx, hy = math.hypot(rx * c, ry * s), math.hypot(rx * s, ry * c)
    return cx - hx, cy - hy, cx + hx, cy + hy


def _circle3_box(p: list[float]) -> Box:
    """Box of the circle through three points ``x1, y1, x2, y2, x3, y3`` (points' box if collinear)."""
    (ax, ay), (bx, by), (cx, cy) = zip(p[0:6:2], p[1:6:2], strict=True)
    d = 2 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by))
    if abs(d) < 1e-9:
        return _points_box(p[0::2], p[1::2])
    a2, b2, c2 = ax * ax + ay * ay, bx * bx + by * by, cx * cx + cy * cy
    ux = (a2 * (by - cy) + b2 * (cy - ay) + c2 * (ay - by)) / d
    uy = (a2 * (cx - bx) + b2 * (ax - cx) + c2 * (bx - ax)) / d
    r = math.hypot(ax - ux, ay - uy)
    return ux - r, uy - r, ux + r, uy + r


def _via2_box(sa: dict) -> Box | None:
    """Box of a VIA 2 ``shape_attributes`` dict; None for shapes without extent (point)."""
    name = str(sa.get("name", "")).lower()
    if name == "rect":
        x, y = float(sa["x"]), float(sa["y"])
        return x, y, x + float(sa["width"]), y + float(sa["height"])
    if name == "circle":
        return _ellipse_box(float(sa["cx"]), float(sa["cy"]), float(sa["r"]), float(sa["r"]))
    if name == "ellipse":
        return _ellipse_box(float(sa["cx"]), float(sa["cy"]), float(sa["rx"]), float(sa["ry"]),
                            float(sa.get("theta", 0) or 0))
    if name in ("polygon", "polyline"):
        return _points_box(sa["all_points_x"], sa["all_points_y"])
    return None


def _via3_box(xy: list) -> Box | None:
    """Box of a VIA 3 ``xy`` list ``[shape code, coordinates...]``; None for points."""
    code, v = int(xy[0]), [float(t) for t in xy[1:]]
    if code == 2:
        return v[0], v[1], v[0] + v[2], v[1] + v[3]
    if code == 3:
        return _ellipse_box(v[0], v[1], v[2], v[2])
    if code == 4:
        return _ellipse_box(v[0], v[1], v[2], v[3], v[4] if len(v) > 4 else 0.0)
    if code in (5, 6, 7, 8):
        return _points_box(v[0::2], v[1::2])
    if code == 9:
        return _circle3_box(v)
    return None


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header (no pixels decoded); None when PIL cannot read it (an
    unreadable header only means no clipping). Slides of any size: Pillow's decompression-bomb limit is
    neither applied nor changed (no process-wide state, so threads reading annotations are safe)."""
    from tile_selector.readers import picture_size

    return picture_size(path)


def _resolve(names: list[str], roots: list[Path], source: Path) -> Path:
    """First existing ``root/name`` or ``root/basename(name)``; FileNotFoundError naming both files."""
    tried: list[Path] = []
    for name in (n for n in names if n):
        rel = name.replace("\\", "/")
        for root in roots:
            for cand in (root / rel, root / Path(rel).name):
                if cand not in tried:
                    tried.append(cand)
                try:
                    found = cand.is_file()
                except OSError:  # a name the file system refuses (e.g. too long): not there
                    found = False
                if found:
                    return cand.resolve()
    shown = names[0] if names else "?"
    raise FileNotFoundError(f"{source}: image {shown!r} not found (looked for "
                            f"{', '.join(str(t) for t in tried) or 'nothing'}); {FIX}")


def _item(image: Path, shapes: list[tuple[Box, dict[str, str]]], file_attrs: dict,
          size: tuple[int, int] | None, notes: Counter) -> ImageAnnotation:
    """Clip, drop degenerate boxes and build the annotation of one image."""
    if shapes and size is None:
        size = _image_size(image)
    boxes, labels, attrs = [], [], []
    for (x0, y0, x1, y1), a in shapes:
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        if size is not None:
            x0, x1 = np.clip([x0, x1], 0, size[0])
            y0, y1 = np.clip([y0, y1], 0, size[1])
        if not all(abs(float(v)) <= _FLOAT32_MAX for v in (x0, y0, x1, y1)):  # NaN, inf, beyond float32
            notes["box with non-finite coordinates (dropped)"] += 1
            continue
        if x1 - x0 < 1 or y1 - y0 < 1:
            notes["degenerate box (dropped)"] += 1
            continue
        boxes.append((x0, y0, x1, y1))
        labels.append(_label(a))
        attrs.append(a)
    file_attrs = {str(k): _text(v) for k, v in file_attrs.items()}
    return ImageAnnotation(image, np.asarray(boxes, np.float32).reshape(-1, 4), labels, attrs,
                           _group(file_attrs, image), file_attrs)


def _warn(source: Path, notes: Counter) -> None:
    if notes:
        warnings.warn(f"{source}: " + ", ".join(f"{n} x {what}" for what, n in sorted(notes.items())),
                      stacklevel=3)


def read_via(json_path: str | Path, images_dir: str | Path | None = None) -> list[ImageAnnotation]:
    """Read a VIA 1.x/2.x annotation export or project file, or a VIA 3 project.

    Image filenames resolve inside ``images_dir`` (as stored, then by basename), else relative to
    the JSON file's folder. Images without regions are kept (empty ``boxes``).
    """
    path = Path(json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise ValueError(f"{path}: not a readable JSON file ({e}); expected a VIA 2 or VIA 3 project") from e
    roots = [Path(images_dir)] if images_dir is not None else [path.parent]
    notes: Counter = Counter()
    try:
        if isinstance(data, dict) and {"file", "view", "metadata"} <= data.keys():
            items = _read_via3(data, path, roots, notes)
        else:
            if isinstance(data, dict) and "_via_img_metadata" in data:  # VIA 2 project
                meta = data["_via_img_metadata"]
                order = data.get("_via_image_id_list") or list(meta)
            elif isinstance(data, dict) and all(isinstance(v, dict) and "filename" in v for v in data.values()):
                meta, order = data, list(data)  # VIA 1.x/2.x annotation export
            else:
                raise ValueError("unknown layout")
            items = [_via2_image(meta[k], path, roots, notes) for k in order]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise ValueError(f"{path}: not a VIA annotation file ({type(e).__name__}: {e}); expected a VIA 2 "
                         "project (_via_img_metadata), a VIA 1/2 export ({key: {filename, regions}}) or a "
                         "VIA 3 project (file, view, metadata)") from e
    _warn(path, notes)
    return items


def _via2_image(entry: dict, path: Path, roots: list[Path], notes: Counter) -> ImageAnnotation:
    image = _resolve([str(entry["filename"])], roots, path)
    regions = entry.get("regions") or []
    if isinstance(regions, dict):  # VIA 1.x: {"0": region, "1": region, ...}
        regions = [regions[k] for k in sorted(regions, key=lambda k: (len(str(k)), str(k)))]
    shapes = []
    for r in regions:
        sa = r.get("shape_attributes") or {}
        box = _via2_box(sa)
        if box is None:
            notes[f"{sa.get('name', '?')} shape (no box, skipped)"] += 1
            continue
        shapes.append((box, {str(k): _text(v) for k, v in (r.get("region_attributes") or {}).items()}))
    return _item(image, shapes, entry.get("file_attributes") or {}, None, notes)


def _read_via3(data: dict, path: Path, roots: list[Path], notes: Counter) -> list[ImageAnnotation]:
    attributes, files, views = data.get("attribute") or {}, data["file"], data["view"]

    def named(av: dict) -> dict[str, str]:
        out = {}
        for aid, value in av.items():
            a = attributes.get(str(aid)) or {}
            options = {str(k): v for k, v in (a.get("options") or {}).items()}
            ids = [k for k, on in value.items() if on] if isinstance(value, dict) else str(value).split(",")
            ids = [str(i).strip() for i in ids if str(i).strip()]
            if options and ids and all(i in options for i in ids):
                value = "+".join(str(options[i]) for i in ids)
            out[str(a.get("aname", aid))] = _text(value)
        return out

    by_view: dict[str, list[dict]] = {}
    for m in data["metadata"].values():
        by_view.setdefault(str(m["vid"]), []).append(m)
    vids = [str(v) for v in (data.get("project") or {}).get("vid_list") or views]
    items = []
    for vid in vids:
        f = files[str(views[vid]["fid_list"][0])]  # image projects: one file per view
        names = [str(f.get("fname", ""))]
        if not str(f.get("src", "")).startswith(("http:", "https:", "data:")):
            names.append(str(f.get("src", "")))
        image = _resolve(names, roots, path)
        shapes, file_attrs = [], {}
        for m in by_view.get(vid, []):
            xy = m.get("xy") or []
            if not xy:  # file-level attributes or a temporal segment: no region
                file_attrs.update(named(m.get("av") or {}))
                continue
            box = _via3_box(xy)
            if box is None:
                notes[f"{_VIA3_SHAPES.get(int(xy[0]), xy[0])} shape (no box, skipped)"] += 1
                continue
            shapes.append((box, named(m.get("av") or {})))
        items.append(_item(image, shapes, file_attrs, None, notes))
    return items


def read_voc(xml_dir: str | Path, images_dir: str | Path | None = None) -> list[ImageAnnotation]:
    """Read Pascal VOC XML files (a folder of ``*.xml``, or one file).

    VOC coordinates are 1-based pixel indices; they are kept as given (as floats), so a box may sit
    up to 1 px right/down of its 0-based position. The image is looked up in ``images_dir`` when
    given, then in a ``JPEGImages`` folder next to the XML folder, then beside the XML. Object
    children other than ``name``/``bndbox`` (``difficult``, ``truncated``, ``pose``) become attributes.
    """
    src = Path(xml_dir)
    files = sorted(src.glob("*.xml")) if src.is_dir() else [src]
    items = []
    for xml in files:
        notes: Counter = Counter()
        try:
            root = ET.parse(xml).getroot()
            name = root.findtext("filename")
            if not name:
                raise ValueError("no <filename>")
            shapes = []
            for obj in root.iter("object"):
                bb = obj.find("bndbox")
                if bb is None:
                    raise ValueError("<object> without <bndbox>")
                box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                attrs = {"name": (obj.findtext("name") or "").strip()}
                attrs.update({c.tag: (c.text or "").strip() for c in obj if c.tag not in ("name", "bndbox")
                              and len(c) == 0})
                shapes.append((box, attrs))
            w, h = (int(float(root.findtext(f"size/{k}") or 0)) for k in ("width", "height"))
        except (ET.ParseError, ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"{xml}: not a Pascal VOC annotation ({e}); expected <annotation> with "
                             "<filename> and <object><name>/<bndbox> xmin ymin xmax ymax") from e
        roots = ([Path(images_dir)] if images_dir is not None else []) + [xml.parent.parent / "JPEGImages",
                                                                           xml.parent]
        image = _resolve([name], roots, xml)
        items.append(_item(image, shapes, {}, (w, h) if w > 0 and h > 0 else None, notes))
        _warn(xml, notes)
    return items


def filter_classes(items: list[ImageAnnotation], classes: list[str] | None) -> list[ImageAnnotation]:
    """Keep only boxes whose label is in ``classes`` (case-insensitive); None keeps everything.

    Every image is kept, possibly with no boxes left (a negative image for the detector).
    """
    if classes is None:
        return list(items)
    wanted = {c.lower() for c in classes}
    out = []
    for it in items:
        keep = [i for i, lab in enumerate(it.labels) if lab.lower() in wanted]
        out.append(ImageAnnotation(it.image, it.boxes[keep].reshape(-1, 4), [it.labels[i] for i in keep],
                                   [it.attributes[i] for i in keep], it.group, dict(it.file_attributes)))
    return out


def write_via(path: str | Path, items: list[ImageAnnotation], scores: list[np.ndarray] | None = None) -> None:
    """Write ``items`` as a VIA 2.0.10 project (rect regions, integer pixels).

    Region attributes: ``label`` first, then the box's other attributes, and ``score`` (4 decimals)
    when ``scores`` gives one array per item. Filenames are relative to the JSON's folder when the
    image lies under it, else the basename (then read back with ``read_via(path, images_dir)``).
    """
    out = Path(path)
    base = out.parent.resolve()
    if scores is not None and len(scores) != len(items):
        raise ValueError(f"write_via: {len(scores)} score arrays for {len(items)} images")
    meta: dict[str, dict] = {}
    region_keys: dict[str, None] = {"label": None}
    file_keys: dict[str, None] = {}
    for i, it in enumerate(items):
        image = Path(it.image).resolve()
        try:
            name = image.relative_to(base).as_posix()
        except ValueError:
            name = image.name
        size = image.stat().st_size if image.is_file() else -1
        sc = None if scores is None else np.asarray(scores[i], dtype=float).ravel()
        if sc is not None and len(sc) != len(it.boxes):
            raise ValueError(f"write_via: {len(sc)} scores for {len(it.boxes)} boxes of {image}")
        regions = []
        for j, box in enumerate(np.asarray(it.boxes, dtype=float).reshape(-1, 4)):
            x0, y0, x1, y1 = (math.floor(v + 0.5) for v in box)  # half-up: width stays >= 1
            ra = {"label": it.labels[j]}
            ra.update({k: _text(v) for k, v in it.attributes[j].items() if k.lower() not in ("label", "score")})
            if sc is not None:
                ra["score"] = f"{sc[j]:.4f}"
            region_keys.update(dict.fromkeys(ra))
            regions.append({"shape_attributes": {"name": "rect", "x": x0, "y": y0, "width": x1 - x0,
                                                 "height": y1 - y0}, "region_attributes": ra})
        fa = {str(k): _text(v) for k, v in it.file_attributes.items()}
        file_keys.update(dict.fromkeys(fa))
        key = f"{name}{size}"
        if key in meta:
            raise ValueError(f"write_via: image {image} appears twice; merge its boxes into one item")
        meta[key] = {"filename": name, "size": size, "regions": regions, "file_attributes": fa}

    def text_attrs(keys) -> dict:
        return {k: {"type": "text", "description": "", "default_value": ""} for k in keys}

    project = {
        "_via_settings": {**_VIA2_SETTINGS, "project": {"name": out.stem}},
        "_via_img_metadata": meta,
        "_via_attributes": {"region": text_attrs(region_keys), "file": text_attrs(file_keys)},
        "_via_data_format_version": "2.0.10",
        "_via_image_id_list": list(meta),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(project, indent=1))
