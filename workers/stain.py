"""Stain normalisation of cell crops before the heads see them (optional, stored with the heads).

Two methods of the maintained ``torchstain`` package (numpy backend), each fitted once to the
training crops and stored in the bundle's cell config, then applied to every crop wherever the heads
run (training, evaluation, scans), so that all of them see the same colours:

- ``reinhard``: each crop's L*a*b* channel means and spreads mapped to the training crops' (Reinhard
  et al. 2001); stain-agnostic, so it fits May-Grünwald-Giemsa as well as H&E;
- ``macenko``: two stain vectors found per crop in optical density and replaced by the training
  crops' (Macenko et al. 2009). Written for H&E; on a crop without enough stained pixels it leaves
  the crop as it is.

``none`` (the default) leaves crops untouched; colour differences are then left to augmentation.
"""

from __future__ import annotations

import numpy as np

STAIN_NORMS = ("none", "reinhard", "macenko")


def _mosaic(crops: np.ndarray, n: int = 64, seed: int = 0) -> np.ndarray:
    """Up to ``n`` crops side by side: the reference the normaliser is fitted to."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(crops), min(n, len(crops)), replace=False) if len(crops) else []
    return np.concatenate([crops[i] for i in pick], axis=1) if len(pick) else np.full((8, 8, 3), 255, np.uint8)


def fit_stain_target(crops: np.ndarray, method: str, seed: int = 0) -> dict:
    """The reference of ``method`` from training crops (n, h, w, 3) uint8, as JSON-able numbers."""
    if method == "none":
        return {}
    if method not in STAIN_NORMS:
        raise ValueError(f"unknown stain normalisation {method!r}; choose one of {', '.join(STAIN_NORMS)}")
    ref = _mosaic(crops, seed=seed)
    norm = _normaliser(method, {})
    norm.fit(ref)
    if method == "reinhard":
        return {"means": [float(v) for v in norm.target_means], "stds": [float(v) for v in norm.target_stds]}
    return {"stain_matrix": np.asarray(norm.HERef, float).tolist(), "max_conc": np.asarray(norm.maxCRef, float).tolist()}


def _normaliser(method: str, target: dict):
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    if method == "reinhard":
        n = NumpyReinhardNormalizer()
        if target:
            n.target_means = np.asarray(target["means"], np.float64)
            n.target_stds = np.asarray(target["stds"], np.float64)
        return n
    n = NumpyMacenkoNormalizer()
    if target:
        n.HERef = np.asarray(target["stain_matrix"], np.float64)
        n.maxCRef = np.asarray(target["max_conc"], np.float64)
    return n


def normalise_crops(crops: np.ndarray, method: str, target: dict) -> np.ndarray:
    """Crops (n, h, w, 3) uint8 with their colours mapped to ``target`` (a new array; ``none``: as given)."""
    if method == "none" or len(crops) == 0:
        return crops
    norm = _normaliser(method, target)
    out = np.empty_like(crops)
    for i in range(len(crops)):
        c = crops[i]
        if float(c.std()) < 1.0:  # a flat crop (glass): nothing to map
            out[i] = c
            continue
        try:
            if method == "reinhard":
                out[i] = np.clip(norm.normalize(c), 0, 255)
            else:
                out[i] = norm.normalize(c, stains=False)[0]
        except (ValueError, np.linalg.LinAlgError, IndexError):  # Macenko: too few stained pixels
            out[i] = c
    return out
