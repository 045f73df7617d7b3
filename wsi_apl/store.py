"""The cell store: ``RESULTS/cells.zarr``, one zarr v3 group per slide.

Layout of a slide group ``cells.zarr/<slide>/``::

    area            (n,)          int32    index of the area the cell lies in
    box_l0          (n, 4)        float32  level-0 pixels x0, y0, x1, y1
    box_px          (n, 4)        float32  pixels of the area image at the bundle mpp
    score           (n,)          float32  detector score
    cut             (n,)          bool     touches an area border (not counted in ratios)
    p_<head>        (n,)          float32  probability per classifier head
    diameter_um, area_um2, eccentricity, intensity, contrast, nc_ratio   (n,) float32
    crops           (n, 48, 48, 3) uint8   small crops for galleries
    attrs: result (status, probabilities, ratios with CIs, counts, QC), areas (boxes, scores, why),
           rejected (candidate counts by reason), qc, provenance (bundle id and label, versions,
           timings; slide properties from an allow-list only, tile_selector.slide.PUBLIC_FACTS: no label,
           barcode or name).

A group is written aside (``RESULTS/.staging/``) and renamed into place, so a crash never leaves a
half-written slide visible. One writer per group.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import zarr

STORE = "cells.zarr"
STAGING = ".staging"


def open_root(results: Path) -> zarr.Group:
    return zarr.open_group(str(results / STORE), mode="a", zarr_format=3)


def write_slide_group(results: Path, name: str, cols: dict[str, np.ndarray], attrs: dict) -> Path:
    """Write one slide's cell table and attributes atomically; replaces an older group of that name."""
    results = Path(results)
    open_root(results)
    staging = results / STAGING
    staging.mkdir(exist_ok=True)
    tmp = staging / f"{name}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for key, arr in cols.items():
        a = np.asarray(arr)
        if a.dtype == object:
            continue
        chunks = (max(1, min(len(a), 4096)),) + a.shape[1:] if a.ndim else None
        if key == "crops":
            chunks = (max(1, min(len(a), 256)),) + a.shape[1:]
        g.create_array(key, data=a, chunks=chunks if a.ndim and len(a) else "auto")
    for k, v in attrs.items():
        g.attrs[k] = v
    final = results / STORE / name
    _publish(tmp, final, staging)
    return final


def _publish(tmp: Path, final: Path, staging: Path) -> None:
    """Rename a finished group into the store (an older group of that name is moved aside first)."""
    if final.exists():
        old = staging / f"{final.name}.old.{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def remove_slide_group(results: Path, name: str) -> None:
    """Take a slide's group out of the store (renamed aside first, so readers never see half of it)."""
    final = Path(results) / STORE / name
    if final.exists():
        staging = Path(results) / STAGING
        staging.mkdir(exist_ok=True)
        aside = staging / f"{name}.removed.{os.getpid()}"
        os.replace(final, aside)
        shutil.rmtree(aside, ignore_errors=True)


def read_slide_group(results: Path, name: str) -> tuple[dict[str, np.ndarray], dict]:
    """(columns, attributes) of one slide group, read with plain zarr; columns in name order (zarr lists
    a group's members in the file system's order, and outputs built from them must not depend on it)."""
    g = zarr.open_group(str(Path(results) / STORE / name), mode="r")
    cols = {k: g[k][...] for k in sorted(g.array_keys())}
    return cols, dict(g.attrs)


def slide_groups(results: Path) -> list[str]:
    p = Path(results) / STORE
    if not p.exists():
        return []
    return sorted(zarr.open_group(str(p), mode="r").group_keys())


def clean_staging(results: Path) -> None:
    """Remove leftovers of interrupted writes (they were never visible in the store)."""
    shutil.rmtree(Path(results) / STAGING, ignore_errors=True)
