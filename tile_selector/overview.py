"""Overview picture of a selection: thumbnail, smear zones tinted, chosen areas outlined and numbered."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .select import ZONE_CODES, Selection

#: Tint per zone (RGB) and its strength.
ZONE_TINTS = {
    ZONE_CODES["thick"]: ((200, 60, 60), 0.35),
    ZONE_CODES["monolayer"]: ((60, 170, 80), 0.25),
    ZONE_CODES["thin"]: ((70, 110, 220), 0.3),
    ZONE_CODES["particle"]: ((160, 60, 200), 0.45),
}

#: Outline of a chosen area, and of one taken next to an out-of-focus patch (``near_blur``: check its focus).
AREA_RGB, NEAR_BLUR_RGB = (255, 200, 0), (255, 60, 0)


def overview_image(sel: Selection, slide_dimensions: tuple[int, int], max_side: int = 1600) -> Image.Image:
    """An RGB picture of the selection, at most ``max_side`` pixels wide or high."""
    if sel.overview is None:
        raise ValueError("this selection has no overview (a plain picture)")
    base = sel.overview.astype(np.float32)
    if sel.zone_map is not None and sel.zone_map.shape == base.shape[:2]:
        for code, (rgb, alpha) in ZONE_TINTS.items():
            m = sel.zone_map == code
            base[m] = base[m] * (1 - alpha) + np.asarray(rgb, np.float32) * alpha
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    scale = min(1.0, max_side / max(img.size)) if max(img.size) > max_side else max(1.0, 800 / max(img.size))
    if scale != 1.0:
        img = img.resize((max(1, int(img.size[0] * scale)), max(1, int(img.size[1] * scale))),
                         Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)
    sx = img.size[0] / slide_dimensions[0]
    sy = img.size[1] / slide_dimensions[1]
    for a in sel.areas:
        x0, y0, x1, y1 = a.box
        box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
        draw.rectangle(box, outline=NEAR_BLUR_RGB if a.scores.get("near_blur") else AREA_RGB, width=3)
        draw.rectangle(box, outline=(0, 0, 0), width=1)
        label = str(a.index + 1)
        tx, ty = box[0] + 3, box[1] + 2
        draw.rectangle((tx - 1, ty - 1, tx + 8 * len(label) + 2, ty + 12), fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=(255, 255, 0))
    legend = [("thick", ZONE_CODES["thick"]), ("monolayer", ZONE_CODES["monolayer"]),
              ("thin edge", ZONE_CODES["thin"]), ("particle", ZONE_CODES["particle"])]
    rows = [(name, ZONE_TINTS[code][0]) for name, code in legend]
    if any(a.scores.get("near_blur") for a in sel.areas):
        rows.append(("area next to an out-of-focus patch", NEAR_BLUR_RGB))
    y = 4
    for name, rgb in rows:
        draw.rectangle((4, y, 16, y + 10), fill=rgb)
        draw.text((20, y - 1), name, fill=(0, 0, 0))
        y += 14
    return img
