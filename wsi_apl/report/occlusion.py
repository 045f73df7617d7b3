"""Occlusion sensitivity maps (the paper's explainability): which parts of a cell crop the head needs.

A cell's crop is read again the way the worker read it (the area at the bundle's pixel size, a
second read at the crops' finer pixel size where the bundle asks for one, the same fixed physical
context, :func:`workers.crops.extract_crops`), so the map explains the probability the scan stored.
A grey patch (1/8 of the crop) slides over it with a stride of 1/16; the map is the drop of the
head's probability when each part is hidden. All occluded copies of a crop go through the network
in one or a few batched forward passes, on the CPU, without gradients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PATCH_FRACTION = 1 / 8
STRIDE_FRACTION = 1 / 16

_MODELS: dict[tuple[str, float], tuple] = {}


def cell_model(bundle):
    """The bundle's cell classifier on the CPU, loaded once per process and bundle version."""
    from workers.area import load_cells

    key = (str(Path(bundle.path).resolve()), (Path(bundle.path) / "bundle.json").stat().st_mtime)
    if key not in _MODELS:
        model, cfg, _ = load_cells(bundle, torch.device("cpu"))
        model.eval()
        _MODELS.clear()
        _MODELS[key] = (model, cfg)
    return _MODELS[key]


def read_cell_crops(slide, area: dict, boxes_px: np.ndarray, cfg, bundle_mpp: float) -> np.ndarray:
    """Crops (n, crop_px, crop_px, 3) of the cells ``boxes_px`` (area pixels at the bundle mpp) of one
    area, cut as :func:`workers.area.process_area` cuts them."""
    from workers.area import cell_read
    from workers.crops import cell_centres, extract_crops

    size = tuple(int(v) for v in area["size"])
    fine = cell_read(cfg, bundle_mpp, size)
    if fine:
        src = slide.read_area(tuple(area["box"]), fine, upsample=True).image
    else:
        src = slide.read_area(tuple(area["box"]), size).image
    centres, scale = cell_centres(np.asarray(boxes_px, np.float32), (size[1], size[0], 3), src.shape)
    context_px = cfg.crop_um / bundle_mpp * scale
    return extract_crops(src, centres, context_px, cfg.crop_px)


def _positions(side: int, patch: int, stride: int) -> list[int]:
    """Patch origins along one side that cover it to the last pixel."""
    pos = list(range(0, side - patch + 1, stride))
    if pos[-1] != side - patch:
        pos.append(side - patch)
    return pos


@dataclass
class OcclusionMap:
    head: str
    p: float                 # the head's probability on the re-read crop
    drop: np.ndarray         # (crop_px, crop_px) mean drop of that probability with each pixel hidden
    crop: np.ndarray         # (crop_px, crop_px, 3) the crop the network saw


#: Occluded copies per forward pass: 128 crops of 128 px (fewer of larger crops, to bound memory).
BATCH_PIXELS = 128 * 128 * 128


def occlusion_maps(model, cfg, crops: np.ndarray, heads: list[list[str]], patch_fraction: float = PATCH_FRACTION,
                   stride_fraction: float = STRIDE_FRACTION) -> list[list[OcclusionMap]]:
    """Maps per crop for each head named for it in ``heads`` (one set of forward passes per crop serves
    all its heads: a promyelocyte with Auer rods sits in two galleries). Grey patches of the crop's own
    mean brightness hide detail without adding a dark blob a head could read as a nucleus."""
    if cfg.stain_norm != "none":
        from workers.stain import normalise_crops

        crops = normalise_crops(crops, cfg.stain_norm, cfg.stain_target)
    side = int(crops.shape[1])
    patch = max(2, int(round(side * patch_fraction)))
    stride = max(1, int(round(side * stride_fraction)))
    ys = _positions(side, patch, stride)
    spots = [(y, x) for y in ys for x in ys]
    batch = max(4, BATCH_PIXELS // (side * side))
    count = np.zeros((side, side), np.float64)
    for y, x in spots:
        count[y:y + patch, x:x + patch] += 1
    out = []
    model.to(memory_format=torch.channels_last)
    for crop, names in zip(crops, heads):
        grey = int(round(float(crop.astype(np.float32).mean())))
        copies = np.repeat(crop[None], len(spots) + 1, axis=0)
        for i, (y, x) in enumerate(spots, start=1):
            copies[i, y:y + patch, x:x + patch] = grey
        probs = _forward(model, copies, batch)
        maps = []
        for head in names:
            k = list(cfg.heads).index(head)
            p0 = float(probs[0, k])
            total = np.zeros((side, side), np.float64)
            for (y, x), p in zip(spots, probs[1:, k]):
                total[y:y + patch, x:x + patch] += p0 - float(p)
            maps.append(OcclusionMap(head, p0, (total / np.maximum(count, 1)).astype(np.float32), crop))
        out.append(maps)
    return out


def _forward(model, copies: np.ndarray, batch: int) -> np.ndarray:
    """Probabilities (n, heads) for uint8 crops, batched, without gradients."""
    from workers.classifier import crops_to_tensor

    out = []
    with torch.inference_mode():
        for i in range(0, len(copies), batch):
            x = crops_to_tensor(copies[i:i + batch]).contiguous(memory_format=torch.channels_last)
            out.append(torch.sigmoid(model(x).float()).numpy())
    return np.concatenate(out)


def timed_maps(model, cfg, slide, bundle_mpp: float, areas: dict[int, dict],
               cells: dict[int, tuple[int, np.ndarray, list[str]]]
               ) -> tuple[dict[tuple[int, str], OcclusionMap], float]:
    """Maps for ``cells`` = {cell index: (area index, box_px, heads)}, reading each area once;
    ({(cell index, head): map}, seconds)."""
    t0 = time.perf_counter()
    order = list(cells)
    by_area: dict[int, list[int]] = {}
    for c in order:
        by_area.setdefault(cells[c][0], []).append(c)
    crops: dict[int, np.ndarray] = {}
    for a, members in by_area.items():
        got = read_cell_crops(slide, areas[a], np.stack([cells[c][1] for c in members]), cfg, bundle_mpp)
        crops.update(zip(members, got))
    maps: dict[tuple[int, str], OcclusionMap] = {}
    if order:
        done = occlusion_maps(model, cfg, np.stack([crops[c] for c in order]), [cells[c][2] for c in order])
        for c, ms in zip(order, done):
            for m in ms:
                maps[(c, m.head)] = m
    return maps, time.perf_counter() - t0
