"""Augmentations shared by the detector and the cell classifier: geometry, colour and stain jitter."""

from __future__ import annotations

import numpy as np


def stain_jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Colour augmentation in optical-density space (stain strength per channel, white balance,
    brightness, gamma), then back to uint8."""
    f = (img.astype(np.float32) + 1.0) / 256.0
    od = -np.log(f)
    od *= np.exp(rng.normal(0.0, 0.12 * strength)) * np.exp(rng.normal(0.0, 0.06 * strength, 3)).astype(np.float32)
    out = np.exp(-od)
    out *= np.clip(1.0 - np.abs(rng.normal(0.0, 0.04 * strength, 3)), 0.85, 1.0).astype(np.float32)
    out = np.power(np.clip(out, 0.0, 1.0), float(np.exp(rng.normal(0.0, 0.08 * strength))))
    out *= float(np.exp(rng.normal(0.0, 0.05 * strength)))
    return np.clip(out * 256.0 - 1.0, 0, 255).astype(np.uint8)


def flip_rot(img: np.ndarray, boxes: np.ndarray | None, k: int, flip: bool):
    """Rotate by ``k`` quarter turns counter-clockwise and optionally flip left-right, boxes along."""
    h, w = img.shape[:2]
    out = img
    b = None if boxes is None else boxes.copy()
    if flip:
        out = out[:, ::-1]
        if b is not None:
            b = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1)
    for _ in range(k % 4):
        hh, ww = out.shape[:2]
        out = np.rot90(out)  # counter-clockwise: (x, y) -> (y, ww - x)
        if b is not None:
            b = np.stack([b[:, 1], ww - b[:, 2], b[:, 3], ww - b[:, 0]], axis=1)
    return np.ascontiguousarray(out), b


def scale_jitter(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, lo: float = 0.85,
                 hi: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """Resample by a random factor in [lo, hi] (cells a little smaller or larger, as between scanners)."""
    from PIL import Image

    f = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    h, w = img.shape[:2]
    nw, nh = max(8, int(round(w * f))), max(8, int(round(h * f)))
    out = np.array(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))  # writable, for torch
    b = np.asarray(boxes, np.float32).reshape(-1, 4) * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    return out, b


#: Colour augmentations of the cell heads' training crops: ``od`` (:func:`stain_jitter` only),
#: ``hed`` (:func:`hed_jitter`, then a milder :func:`stain_jitter`), ``none``.
STAIN_AUGMENTS = ("none", "od", "hed")
#: The colour augmentation ``wsi-apl train cells`` uses unless told otherwise.
DEFAULT_STAIN_AUG = "od"


def hed_jitter(img: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.05) -> np.ndarray:
    """Stain augmentation in haematoxylin-eosin-DAB space (Tellez et al. 2018), through scikit-image's
    colour deconvolution: each stain's concentration scaled by ``1 + U(-sigma, sigma)`` and shifted by
    ``U(-bias, bias)`` times its spread, then back to uint8 RGB. For Romanowsky stains the HED axes
    are not the dyes, but they still separate the nuclear (blue-purple) from the eosinophilic (pink)
    component, so the change stays stain-like."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(img)
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3)
    beta = rng.uniform(-bias, bias, 3) * np.maximum(hed.reshape(-1, 3).std(axis=0), 1e-3) * 10
    out = hed2rgb(hed * alpha + beta)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
