"""What a worker does with one area: read it, detect the cells, classify them, measure them.

``process_area(slide_path, box, models)`` is the unit of work the cluster distributes; it reads the
pixels itself from the slide path (the client never ships images) and returns a :class:`CellTable`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tile_selector.slide import open_slide_cached

from .bundle import ModelBundle, load_bundle
from .classifier import CellClassifier, CellConfig
from .crops import MORPHOMETRICS
from .detector import DetectorConfig, build_detector
from .engine import GALLERY_PX, ImageCells, analyse_images


@dataclass
class CellTable:
    """One row per detected cell of an area; positions in level-0 pixels, sizes in µm."""

    area: int
    box_l0: np.ndarray          # (n, 4) float32 level-0 px
    box_px: np.ndarray          # (n, 4) float32 area px at the bundle mpp
    score: np.ndarray           # (n,) detector score
    cut: np.ndarray             # (n,) bool, touches the area border
    probs: dict[str, np.ndarray]  # head -> (n,) probability
    morph: dict[str, np.ndarray]  # MORPHOMETRICS -> (n,)
    crops: np.ndarray           # (n, GALLERY_PX, GALLERY_PX, 3) uint8, for galleries
    timings: dict[str, float] = field(default_factory=dict)
    outside_fraction: float = 0.0
    crop_source_mpp: float = 0.0  # µm/px of the pixels the crops were cut from (coarser than asked: a 20x scan)

    def __len__(self) -> int:
        return int(len(self.score))

    @staticmethod
    def concat(tables: list["CellTable"], heads: list[str]) -> dict[str, np.ndarray]:
        """Column arrays of several areas' tables, with an ``area`` column."""
        cols: dict[str, list] = {k: [] for k in ("area", "box_l0", "box_px", "score", "cut", "crops")}
        for h in heads:
            cols[f"p_{h}"] = []
        for m in MORPHOMETRICS:
            cols[m] = []
        for t in tables:
            cols["area"].append(np.full(len(t), t.area, np.int32))
            for k in ("box_l0", "box_px", "score", "cut", "crops"):
                cols[k].append(getattr(t, k))
            for h in heads:
                cols[f"p_{h}"].append(t.probs[h])
            for m in MORPHOMETRICS:
                cols[m].append(t.morph[m])
        empty = {"area": np.zeros(0, np.int32), "box_l0": np.zeros((0, 4), np.float32),
                 "box_px": np.zeros((0, 4), np.float32), "score": np.zeros(0, np.float32),
                 "cut": np.zeros(0, bool), "crops": np.zeros((0, GALLERY_PX, GALLERY_PX, 3), np.uint8)}
        out = {}
        for k, v in cols.items():
            out[k] = np.concatenate(v) if v else empty.get(k, np.zeros(0, np.float32))
        return out


@dataclass
class LoadedModels:
    """A bundle's models, ready on a device."""

    bundle: ModelBundle
    detector: torch.nn.Module
    det_cfg: DetectorConfig
    cells: CellClassifier
    cell_cfg: CellConfig
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_detector(bundle: ModelBundle | str | Path, device: str = "auto"):
    """The bundle's detector alone (for evaluation and proposals): (model, config, device)."""
    if not isinstance(bundle, ModelBundle):
        bundle = load_bundle(bundle)
    bundle.require("detector")
    dev = pick_device(device)
    cfg = DetectorConfig.from_json(bundle.part("detector")["config"])
    det = build_detector(cfg)
    det.load_state_dict(bundle.load_tensors("detector"))
    return det.to(dev).eval(), cfg, dev


def load_models(bundle: ModelBundle | str | Path, device: str = "auto") -> LoadedModels:
    """Build the detector and cell classifier of a bundle and load their verified weights."""
    if not isinstance(bundle, ModelBundle):
        bundle = load_bundle(bundle)
    bundle.require("detector", "cells")
    dev = pick_device(device)
    det_cfg = DetectorConfig.from_json(bundle.part("detector")["config"])
    det = build_detector(det_cfg)
    det.load_state_dict(bundle.load_tensors("detector"))
    det.to(dev).eval()
    cls, cell_cfg, _ = load_cells(bundle, dev)
    return LoadedModels(bundle, det, det_cfg, cls, cell_cfg, dev)


def load_cells(bundle: ModelBundle, device: str | torch.device = "auto"):
    """The bundle's cell classifier alone: (model, config, device)."""
    bundle.require("cells")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    cell_cfg = CellConfig.from_json(bundle.part("cells")["config"])
    cls = CellClassifier(cell_cfg)
    cls.load_state_dict(bundle.load_tensors("cells"))
    cls.to(dev).eval()
    return cls, cell_cfg, dev


def analyse_image(image: np.ndarray, models: LoadedModels, cell_image: np.ndarray | None = None) -> ImageCells:
    """Detect, crop, classify and measure the cells of one area image at the bundle mpp
    (:func:`workers.engine.analyse_images` with one image).

    ``cell_image``: the same area at the cells' finer pixel size (:func:`cell_read`), which the crops
    are cut from; default: ``image``. Timings in the scan's stages: ``detect`` (upload and forward
    pass), ``classify`` (crops and heads), ``measure`` (crops back to the host, morphometrics).
    """
    [found], t = analyse_images([image], models, None if cell_image is None else [cell_image])
    found.timings = {"detect": t["upload"] + t["detect"], "classify": t["crop"] + t["classify"],
                     "measure": t["download"] + t["measure"]}
    return found


def cell_read(cfg: CellConfig, area_mpp: float, size: tuple[int, int]) -> tuple[int, int] | None:
    """The pixel size of an area's second read for the cell crops, or None when the crops are cut from
    the detector's pixels (crops no finer than ``area_mpp``; bundles before finer crops)."""
    f = area_mpp / cfg.cell_mpp(area_mpp)
    if f < 1.01:
        return None
    return int(round(size[0] * f)), int(round(size[1] * f))


def process_area(slide_path: str, box: tuple[float, float, float, float], models: LoadedModels, area_index: int,
                 reader: str = "auto", mpp: float | None = None, size: tuple[int, int] | None = None) -> CellTable:
    """Read one area of a slide at the bundle's mpp and return its cell table.

    ``size`` is the area's pixel size at the bundle mpp: the bundle's area size for slide areas, the
    picture's own physical extent for a camera frame (the detector works at any size). Where the
    cell crops want finer pixels the area is read a second time at their resolution.
    """
    t0 = time.perf_counter()
    slide = open_slide_cached(slide_path, reader=reader, mpp=mpp)
    size = tuple(size) if size is not None else models.bundle.area_size
    read = slide.read_area(box, size)
    fine = cell_read(models.cell_cfg, models.bundle.mpp, size)
    cell_image = slide.read_area(box, fine, upsample=True).image if fine else None
    source_mpp = max(models.cell_cfg.cell_mpp(models.bundle.mpp), float(slide.mpp)) if fine else models.bundle.mpp
    t_read = time.perf_counter() - t0
    with models.lock:  # one forward pass at a time per worker process
        found = analyse_image(read.image, models, cell_image)
    boxes = found.boxes
    sx = (box[2] - box[0]) / size[0]
    sy = (box[3] - box[1]) / size[1]
    box_l0 = np.stack([box[0] + boxes[:, 0] * sx, box[1] + boxes[:, 1] * sy,
                       box[0] + boxes[:, 2] * sx, box[1] + boxes[:, 3] * sy], axis=1).astype(np.float32) \
        if len(boxes) else np.zeros((0, 4), np.float32)
    found.timings["read"] = t_read
    return CellTable(area=area_index, box_l0=box_l0, box_px=boxes, score=found.scores, cut=found.cut,
                     probs=found.probs, morph=found.morph, crops=found.gallery, timings=found.timings,
                     outside_fraction=read.outside_fraction, crop_source_mpp=source_mpp)
