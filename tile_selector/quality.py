"""Quality measures of one area image, made comparable across stains and scanners.

All measures work on optical density (OD = -log10(I / white)), so a paler or darker stain shifts
values but not ratios, and they are expressed per µm or as shares, never in raw pixels.

- ``focus``: edge sharpness (µm⁻¹, :func:`block_focus`): steepest edges relative to their local
  contrast. For an edge of contrast C blurred by a Gaussian of σ µm the steepest gradient is
  C / (σ √(2π)), so the ratio estimates 1 / (σ √(2π)) whatever the stain's strength (95th percentile
  over pixels with real contrast, so noise and glass do not count). About 0.7 for a sharp image read at
  0.5 µm/px, 0.37 under a 1 µm Gaussian defocus, 0.22 under 2 µm. ``focus_worst_block`` is the
  lowest over a 4x3 grid of blocks, so a partly blurred area scores low; ``blur_um`` translates it
  into the equivalent Gaussian blur.
- ``cells``: estimated nucleated cells (dark-purple blobs of nucleus size) in the area.
- ``coverage``: share of the area covered by cells (not glass or plasma).
- ``overlap``: share of the covered pixels darker than two stacked cells (cells piled up / clumped).
- ``clumps``: share of nuclear blobs much larger than a single nucleus.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .morphology import closing, extreme_filter, opening


def optical_density(img: np.ndarray, white: np.ndarray | None = None) -> np.ndarray:
    """OD (h, w, 3) float32 of an RGB uint8 image; ``white`` (3,) is the glass level (default: bright percentile)."""
    if white is None:
        white = np.percentile(img.reshape(-1, 3).astype(np.float32), 99.5, axis=0)
    white = np.maximum(np.asarray(white, np.float32), 64.0)
    if img.dtype == np.uint8:
        # a uint8 channel has 256 values: the same formula on them once, then a lookup per pixel (the
        # selector measures every area it reads; the log was a tenth of a read's measures)
        lut = np.ascontiguousarray(_od(np.arange(256, dtype=np.float32)[:, None], white).T)  # (3, 256)
        planes = np.empty((3,) + img.shape[:-1], np.float32)
        for c in range(3):
            np.take(lut[c], img[..., c], out=planes[c])
        return np.moveaxis(planes, 0, -1)  # (h, w, 3) whose channels are contiguous planes
    return _od(img.astype(np.float32), white)


def _od(f: np.ndarray, white: np.ndarray) -> np.ndarray:
    return -np.log10(np.clip((f + 1.0) / (white + 1.0), 1e-3, 1.0))


def _edge_ratio(od_sum: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Where the contrast is real, and there (row-major) the steepest-gradient / local-contrast ratio (µm⁻¹)."""
    g = ndimage.gaussian_filter(od_sum.astype(np.float32), 0.7)
    w = max(3, int(round(8.0 / mpp)))
    contrast = extreme_filter(g, w, np.maximum) - extreme_filter(g, w, np.minimum)
    edges = contrast > 0.15
    grad = np.hypot(ndimage.sobel(g, 1)[edges], ndimage.sobel(g, 0)[edges]) / (8.0 * mpp)
    return grad / contrast[edges], edges


def blur_from_sharpness(sharpness: float) -> float:
    """The Gaussian blur (µm) that edge sharpness corresponds to (includes the optics and sampling)."""
    return 1.0 / (max(sharpness, 1e-6) * math.sqrt(2.0 * math.pi))


def block_focus(od_sum: np.ndarray, mpp: float, block_um: float = 40.0,
                min_edge_share: float = 0.05) -> tuple[float, list[tuple[int, int, int, int, float]], float]:
    """Edge sharpness of the whole image and per block of about ``block_um`` µm that has enough edges.

    Returns (the worst block, the judged blocks as ``(x0, y0, x1, y1, sharpness)`` in image pixels,
    the whole image); (0, [], 0) when nothing can be judged. Small blocks catch an
    out-of-focus patch that covers only part of the area.
    """
    ratio, edges = _edge_ratio(od_sum, mpp)
    h, w = od_sum.shape
    whole = float(np.percentile(ratio, 95)) if edges.sum() >= 50 and edges.mean() >= 0.01 else 0.0
    gx = max(1, int(round(w * mpp / block_um)))
    gy = max(1, int(round(h * mpp / block_um)))
    ys, xs = np.arange(gy + 1) * h // gy, np.arange(gx + 1) * w // gx  # block j spans rows ys[j]:ys[j + 1]
    rows, cols = np.searchsorted(ys, np.arange(h), "right") - 1, np.searchsorted(xs, np.arange(w), "right") - 1
    block = (rows[:, None] * gx + cols)[edges]
    # the edge pixels of every block at once, not a loop over blocks (each with its own percentile)
    counts = np.bincount(block, minlength=gx * gy)
    sizes = (np.diff(ys)[:, None] * np.diff(xs)[None, :]).ravel()
    ok = (sizes > 0) & (counts >= 50) & (counts / np.maximum(sizes, 1) >= min_edge_share)
    if not ok.any():
        return 0.0, [], whole
    values = sorted_by_group(ratio, block)
    p95 = group_percentile(values, counts, 95.0)
    blocks = [(int(xs[k % gx]), int(ys[k // gx]), int(xs[k % gx + 1]), int(ys[k // gx + 1]), float(p95[k]))
              for k in np.flatnonzero(ok)]
    return float(min(b[4] for b in blocks)), blocks, whole


def sorted_by_group(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """``values`` (float32, >= 0) sorted by group, then by value: one sort of 64-bit keys.

    A non-negative float32's bit pattern orders like its value, so group << 32 | bits is a key whose
    order is (group, value).
    """
    values = np.ascontiguousarray(values, np.float32)
    if values.size and values.min() < 0:
        raise ValueError("sorted_by_group needs values >= 0")
    key = (group.astype(np.uint64) << np.uint64(32)) | values.view(np.uint32).astype(np.uint64)
    key.sort()
    return (key & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)


def group_percentile(sorted_values: np.ndarray, counts: np.ndarray, q: float) -> np.ndarray:
    """``np.percentile(group_values, q)`` of each group (``nan`` where empty), bit for bit.

    ``sorted_values``: every group's values, sorted, groups in order (:func:`sorted_by_group`);
    ``counts``: values per group. numpy's default ('linear') method written out for many groups at
    once, in numpy's own order of operations: the index in float64, the interpolation in the values'
    dtype, from the nearer neighbour (``tests/tile_selector/test_quality.py`` compares with numpy).
    """
    counts = np.asarray(counts, np.int64)
    if not sorted_values.size:
        return np.full(len(counts), np.nan)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    quant = q / 100.0
    virtual = counts * quant + (1.0 + quant * (1.0 - 1.0 - 1.0)) - 1.0
    prev = np.floor(virtual)
    gamma = virtual - prev
    prev = prev.astype(np.int64)
    top = virtual >= counts - 1
    prev = np.where(top, counts - 1, np.maximum(prev, 0))
    nxt = np.where(top, counts - 1, np.minimum(prev + 1, counts - 1))
    empty = counts == 0
    idx_a, idx_b = np.where(empty, 0, start + prev), np.where(empty, 0, start + nxt)
    a, b = sorted_values[idx_a], sorted_values[idx_b]
    diff = b - a
    dt = sorted_values.dtype
    out = np.where(gamma >= 0.5, b - diff * (1.0 - gamma).astype(dt), a + diff * gamma.astype(dt))
    return np.where(empty, np.nan, out)


#: Coverage is also judged in blocks of about this size: an area straddling the edge of the thick
#: zone or of the feathered edge looks fine on average but not in every block.
COVERAGE_BLOCK_UM = 64.0


def block_means(mask: np.ndarray, mpp: float, block_um: float) -> np.ndarray:
    """Mean of ``mask`` in a grid of blocks of about ``block_um`` µm (at least one block)."""
    h, w = mask.shape
    gx, gy = max(1, int(round(w * mpp / block_um))), max(1, int(round(h * mpp / block_um)))
    return np.array([mask[j * h // gy:(j + 1) * h // gy, i * w // gx:(i + 1) * w // gx].mean()
                     for j in range(gy) for i in range(gx)], np.float64)


def nuclei_mask(od: np.ndarray, mpp: float) -> np.ndarray:
    """Pixels of nucleated-cell nuclei: dark in the red channel (red cells absorb green, not red)."""
    od_r = od[..., 0]
    od_g = od[..., 1]
    # nuclei absorb red strongly; red cells and granulocyte cytoplasm hardly do. Basophilic
    # cytoplasm absorbs red too but far less than green+red together in a nucleus.
    thr = max(0.22, float(np.percentile(od_r, 99.5)) * 0.35)
    mask = (od_r > thr) & (od_g > 0.6 * od_r)
    return opening(mask, max(1, int(round(0.4 / mpp))))


def background_od(img: np.ndarray, white: np.ndarray | None = None) -> float:
    """OD (sum of channels) of the brightest common level of an image: glass or plasma between cells."""
    return float(np.percentile(optical_density(img, white).sum(axis=2), 5))


def area_measures(img: np.ndarray, mpp: float, white: np.ndarray | None = None,
                  background: float | None = None) -> dict[str, float]:
    """Focus, cells, coverage, overlap and clumps of one area image at ``mpp`` µm/px.

    ``background``: the OD of the plasma between cells on this slide (default: this image's own
    5th percentile); a pixel is covered by a cell when it is 0.1 above it.
    """
    od = optical_density(img, white)
    od_sum = od.sum(axis=2)
    if background is None:
        background = float(np.percentile(od_sum, 5))
    worst, blocks, whole = block_focus(od_sum, mpp)
    fg = od_sum > background + 0.1
    # each focus block also carries its own coverage: the screen weighs a soft block by it (a piled-up
    # or sparse block shows fewer clean edges than the monolayer, whatever the focus)
    blocks = [(x0, y0, x1, y1, v, round(float(fg[y0:y1, x0:x1].mean()), 4)) for x0, y0, x1, y1, v in blocks]
    coverage = float(fg.mean())
    cov_blocks = block_means(fg, mpp, COVERAGE_BLOCK_UM)
    if fg.any():
        typical = float(np.median(od_sum[fg]))
        overlap = float((od_sum[fg] > max(0.6, 2.2 * typical)).mean())
    else:
        typical, overlap = 0.0, 0.0
    nuc = nuclei_mask(od, mpp)
    # merge the lobes of one nucleus (segmented neutrophils) before counting
    merged = closing(nuc, max(1, int(round(0.8 / mpp))))
    labels, n = ndimage.label(merged)
    px_area = mpp * mpp
    if n:
        sizes = np.bincount(labels.ravel())[1:] * px_area
        real = sizes[sizes >= 8.0]  # µm²: smaller blobs are platelets or granules
        cells = int(len(real))
        single = 90.0  # µm², a typical single nucleus (10.7 µm across)
        # blobs far larger than a nucleus are clumps of several cells: count them by area
        big = real[real > 3.0 * single]
        cells += int(np.sum(np.floor(big / single)) - len(big))
        clumps = float(len(big) / max(1, len(real)))
    else:
        cells, clumps = 0, 0.0
    area_mm2 = max(1e-9, img.shape[0] * img.shape[1] * px_area * 1e-6)
    return {
        "focus": round(whole, 4),
        "focus_worst_block": round(worst, 4),
        "focus_blocks": len(blocks),
        "blur_um": round(blur_from_sharpness(worst), 3) if blocks else None,
        "_blocks": blocks,
        "_fg": fg,  # the covered pixels (the screen keeps them on its map: tile_selector.evidence)
        "cells": int(cells),
        "coverage": round(coverage, 4),
        "coverage_min_block": round(float(cov_blocks.min()), 4),
        "coverage_max_block": round(float(cov_blocks.max()), 4),
        "overlap": round(overlap, 4),
        "clumps": round(clumps, 4),
        "od_typical": round(typical, 4),
        "od_background": round(background, 4),
        "cells_per_mm2": round(cells / area_mm2, 1),
        "red_cells_per_mm2": round(red_cell_count(od, nuc, mpp, background) / area_mm2, 1),
    }


def red_cell_count(od: np.ndarray, nuclei: np.ndarray, mpp: float, background: float = 0.0) -> int:
    """Separate red-cell-like discs: pink (green absorbed far more than red), 5-10 µm across.

    A Romanowsky-stained smear shows thousands per mm² in its monolayer; a tissue section (eosin is
    pink too, but continuous) or a fluorescence scan shows almost none. Red cells of real smears
    absorb 1.5-2.2 times as much green as red (CellaVision blood pictures 1.5, marrow pictures of
    Matek et al. 2021 2.2): the colour test asks for 1.35, the disc shape does the rest. (A fixed 1.2
    was tried for the greyish red cells of a pale stain, 1.1-1.35: it let touching red cells of thick
    smears merge into blobs that are no discs, and 3 of 4 held-out smears without a monolayer were
    called "not a smear" instead of 1.) So the test is lowered only where the area's own stained
    pixels are greyish (:func:`pink_ratio`); a well-stained smear keeps 1.35.
    """
    od_r, od_g = od[..., 0], od[..., 1]
    stained = (od_g > 0.08 + background / 3.0) & ~nuclei
    pink = stained & (od_g > pink_ratio(od_r[stained], od_g[stained]) * od_r)
    pink = opening(pink)
    labels, n = ndimage.label(pink)
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:] * mpp * mpp
    objs = ndimage.find_objects(labels)
    count = 0
    for size, sl in zip(sizes, objs):
        if not 15.0 <= size <= 70.0:
            continue
        h, w = (sl[0].stop - sl[0].start) * mpp, (sl[1].stop - sl[1].start) * mpp
        if max(h, w) <= 11.0 and min(h, w) >= 0.55 * max(h, w) and size >= 0.45 * h * w:
            count += 1
    return count


#: Green/red OD ratio above which a pixel is pink (a red cell's), for well-stained smears; and the lowest
#: it may fall to on a stain whose red cells are greyish (see :func:`pink_ratio`).
PINK_RATIO, PINK_RATIO_MIN = 1.35, 1.1


def pink_ratio(od_r: np.ndarray, od_g: np.ndarray) -> float:
    """The colour test of :func:`red_cell_count` for one area: :data:`PINK_RATIO`, or lower where the
    area's stained pixels (nuclei excluded) are typically greyer.

    Red cells are most of what is stained between the nuclei of a smear. A greyish stain (a pale,
    overwashed or faded smear) shifts all of them below 1.35 together: 0.9 times their median keeps
    most red cells while leukocyte cytoplasm (bluish or lilac: green/red OD about 1 or below) stays out.
    The test is only ever lowered (to :data:`PINK_RATIO_MIN` at most), so a well-stained smear or an
    eosin-pink tissue section is judged as before; separate discs are still required.
    """
    if od_r.size < 50:
        return PINK_RATIO
    typical = float(np.median(od_g / np.maximum(od_r, 1e-3)))
    return min(PINK_RATIO, max(PINK_RATIO_MIN, 0.9 * typical))


def field_equivalent_cells(cells: int, area_um2: float, field_diameter_um: float = 180.0) -> float:
    """Nucleated cells per 100x oil-immersion field (about 180 µm across), for the ICSH hemodilution rule."""
    field = math.pi * (field_diameter_um / 2.0) ** 2
    return cells * field / max(area_um2, 1e-9)
