"""Small PNG plots without a plotting library: ROC and precision-recall curves of one head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .metrics import auprc, auroc, pr_points, roc_points

SIDE = 260
MARGIN = 36


def _panel(draw: ImageDraw.ImageDraw, x0: int, xs: np.ndarray, ys: np.ndarray, title: str, xlabel: str,
           ylabel: str, diagonal: bool) -> None:
    left, top = x0 + MARGIN, 24
    draw.rectangle((left, top, left + SIDE, top + SIDE), outline=(0, 0, 0))
    for t in (0.25, 0.5, 0.75):
        draw.line((left + t * SIDE, top, left + t * SIDE, top + SIDE), fill=(225, 225, 225))
        draw.line((left, top + t * SIDE, left + SIDE, top + t * SIDE), fill=(225, 225, 225))
    if diagonal:
        draw.line((left, top + SIDE, left + SIDE, top), fill=(180, 180, 180))
    pts = [(left + float(x) * SIDE, top + SIDE - float(y) * SIDE) for x, y in zip(xs, ys)]
    if len(pts) > 1:
        draw.line(pts, fill=(200, 40, 60), width=2)
    draw.text((left, 6), title, fill=(0, 0, 0))
    draw.text((left + SIDE // 2 - 20, top + SIDE + 6), xlabel, fill=(0, 0, 0))
    draw.text((x0 + 2, top + SIDE // 2), ylabel, fill=(0, 0, 0))
    for t in (0, 1):
        draw.text((left - 10 + t * SIDE, top + SIDE + 2), str(t), fill=(90, 90, 90))


def curves_png(y: np.ndarray, s: np.ndarray, path: str | Path, name: str) -> Path:
    """ROC (left) and precision-recall (right) curves of scores ``s`` for labels ``y``."""
    y = np.asarray(y).astype(bool)
    img = Image.new("RGB", (2 * (SIDE + MARGIN + 16), SIDE + 50), (255, 255, 255))
    d = ImageDraw.Draw(img)
    fpr, tpr = roc_points(y, s)
    rec, prec = pr_points(y, s)
    _panel(d, 0, fpr, tpr, f"{name}: ROC, AUROC {auroc(y, s):.3f}", "1 - specificity", "sens.", True)
    _panel(d, SIDE + MARGIN + 16, rec, prec, f"{name}: PR, AUPRC {auprc(y, s):.3f} (prev. {y.mean():.2f})",
           "recall", "prec.", False)
    path = Path(path)
    img.save(path)
    return path
