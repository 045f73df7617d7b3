"""Per-slide features from the cell table: ratios of each head with bootstrap confidence intervals.

The denominator is the *counted* nucleated cells: detected cells not cut by an area border
(smudge cells are not detected as cells). For each head: the hard ratio (cells at or above the
head's threshold / counted cells) and the mean probability. Confidence intervals come from a
two-level bootstrap: areas are resampled, then cells within each chosen area, so both the
area-to-area variation and the counting noise are in the interval.
"""

from __future__ import annotations

import numpy as np

FEATURE_KINDS = ("ratio", "mean_p")


def feature_names(heads: list[str]) -> list[str]:
    return [f"{kind}_{h}" for h in heads for kind in FEATURE_KINDS]


def _features_of(p: dict[str, np.ndarray], heads: list[str], thresholds: dict[str, float]) -> np.ndarray:
    n = len(next(iter(p.values()))) if p else 0
    out = []
    for h in heads:
        if n == 0:
            out += [np.nan, np.nan]
            continue
        out.append(float(np.mean(p[h] >= thresholds.get(h, 0.5))))
        out.append(float(np.mean(p[h])))
    return np.asarray(out, np.float64)


def counted(cols: dict[str, np.ndarray]) -> np.ndarray:
    """Mask of cells in the denominators (not cut by an area border)."""
    return ~np.asarray(cols["cut"], bool)


def slide_features(cols: dict[str, np.ndarray], heads: list[str], thresholds: dict[str, float],
                   n_boot: int = 300, seed: int = 0) -> dict:
    """Features, ratios with 95 % CIs and counts of one slide's cell table columns.

    Returns ``{"features": (F,), "names": [...], "ratios": {head: {"value", "ci_low", "ci_high",
    "count"}}, "cells": n, "areas": n, "boot": (n_boot, F)}``.
    """
    keep = counted(cols)
    areas = np.asarray(cols["area"])[keep]
    p = {h: np.asarray(cols[f"p_{h}"], np.float64)[keep] for h in heads}
    feats = _features_of(p, heads, thresholds)
    uniq = np.unique(areas)
    rng = np.random.default_rng(seed)
    boot = np.full((n_boot, len(feats)), np.nan)
    members = [np.flatnonzero(areas == a) for a in uniq]
    if len(areas):
        for b in range(n_boot):
            pick = rng.integers(0, len(uniq), len(uniq)) if len(uniq) > 1 else np.zeros(1, int)
            idx = np.concatenate([rng.choice(members[k], len(members[k]), replace=True) for k in pick])
            boot[b] = _features_of({h: p[h][idx] for h in heads}, heads, thresholds)
    ratios = {}
    for j, h in enumerate(heads):
        k = j * len(FEATURE_KINDS)
        col = boot[:, k]
        col = col[np.isfinite(col)]
        lo, hi = (float(np.percentile(col, 2.5)), float(np.percentile(col, 97.5))) if len(col) else (np.nan, np.nan)
        ratios[h] = {"value": float(feats[k]), "ci_low": lo, "ci_high": hi,
                     "count": int(np.sum(p[h] >= thresholds.get(h, 0.5))) if len(areas) else 0}
    blast = None
    blast_heads = [h for h in ("myeloblast", "promyelocyte") if h in p]
    if len(areas) and blast_heads:
        # blasts and blast equivalents (APL promyelocytes count as blasts, WHO): either head at its threshold
        is_blast = np.zeros(len(areas), bool)
        for h in blast_heads:
            is_blast |= p[h] >= thresholds.get(h, 0.5)
        blast = round(100.0 * float(is_blast.mean()), 2)
    return {"features": feats, "names": feature_names(heads), "ratios": ratios, "cells": int(keep.sum()),
            "areas": int(len(uniq)), "boot": boot, "blast_percent": blast}
