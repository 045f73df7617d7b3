"""The report's pictures: the slide overview with the chosen areas numbered, each area with its cells
outlined by the head that fired, and gallery crops. Written atomically, small (JPEG for pixels of
the slide, PNG for the tiny crops), read from the slide's pyramid only (never a label or macro image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tile_selector.overview import NEAR_BLUR_RGB  # the selector's own colour for such an area
from workers.bundle import replace_atomically

from .html import HEAD_COLOURS

OVERVIEW_MPP = 8.0          # µm/px: the whole smear at a glance
OVERVIEW_MIN_SIDE = 800     # small slides are read finer so that the areas stay visible
OVERVIEW_MAX_SIDE = 1200
AREA_MAX_WIDTH = 640        # area pictures are downscaled to this width (page size)
JPEG_QUALITY = 80


def save_picture(img: Image.Image, path: Path, quality: int = JPEG_QUALITY) -> Path:
    """Write ``img`` as JPEG (``.jpg``) or PNG (``.png``) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        return replace_atomically(path, lambda tmp: img.save(tmp, format="PNG", optimize=True))
    rgb = img.convert("RGB")
    return replace_atomically(path, lambda tmp: rgb.save(tmp, format="JPEG", quality=quality, optimize=True))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def hex_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def overview_picture(slide, areas: list[dict]) -> Image.Image:
    """The whole slide at about 8 µm/px (finer for a small slide, never wider than
    :data:`OVERVIEW_MAX_SIDE`), the chosen areas boxed and numbered by their rank (an area taken next
    to an out-of-focus patch in red-orange)."""
    w0, h0 = slide.dimensions
    extent_um = max(w0, h0) * slide.mpp
    target = min(OVERVIEW_MPP, extent_um / OVERVIEW_MIN_SIDE)
    target = max(target, slide.mpp, extent_um / 4096)
    image, _ = slide.read_overview(target)
    img = Image.fromarray(image)
    if max(img.size) > OVERVIEW_MAX_SIDE:
        s = OVERVIEW_MAX_SIDE / max(img.size)
        img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)
    sx, sy = img.size[0] / w0, img.size[1] / h0
    font = _font(max(12, img.size[0] // 60))
    for a in areas:
        x0, y0, x1, y1 = a["box"]
        box = (x0 * sx, y0 * sy, max(x0 * sx + 2, x1 * sx), max(y0 * sy + 2, y1 * sy))
        near = bool((a.get("scores") or {}).get("near_blur"))  # taken next to an out-of-focus patch
        draw.rectangle(box, outline=(0, 0, 0), width=4)
        draw.rectangle(box, outline=NEAR_BLUR_RGB if near else (255, 212, 0), width=2)
        label = str(a.get("rank", "?"))
        tx, ty = box[2] + 2, box[1]
        if tx + 20 > img.size[0]:
            tx = max(0, box[0] - 22)
        bb = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle((bb[0] - 2, bb[1] - 1, bb[2] + 2, bb[3] + 1), fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=(255, 212, 0), font=font)
    return img


def cell_kind(probs: dict[str, float], thresholds: dict[str, float]) -> tuple[str, bool]:
    """(the type head that fired, Auer rod fired) for one cell: the type is the head with the larger
    margin over its threshold among promyelocyte and myeloblast, else ``other``."""
    fired = {h: probs[h] - thresholds.get(h, 0.5) for h in ("promyelocyte", "myeloblast")
             if h in probs and probs[h] >= thresholds.get(h, 0.5)}
    kind = max(fired, key=fired.get) if fired else "other"
    rod = "auer_rod" in probs and probs["auer_rod"] >= thresholds.get("auer_rod", 0.5)
    return kind, rod


def area_picture(slide, area: dict, cells: list[dict], max_width: int = AREA_MAX_WIDTH) -> tuple[Image.Image, float]:
    """One area at the bundle's pixel size with its cells outlined, downscaled to ``max_width``.

    ``cells``: ``{"box": box_px, "kind", "rod", "cut", "tag"}`` per cell (``tag``: the gallery label
    written next to it). Returns (picture, scale from area pixels to picture pixels).
    """
    size = tuple(int(v) for v in area["size"])
    read = slide.read_area(tuple(area["box"]), size)
    img = Image.fromarray(read.image)
    scale = min(1.0, max_width / img.size[0])
    if scale < 1.0:
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)
    font = _font(12)
    order = sorted(cells, key=lambda c: (c["kind"] != "other", c["rod"]))  # grey first, findings on top
    for c in order:
        x0, y0, x1, y1 = (float(v) * scale for v in c["box"])
        colour = hex_rgb(HEAD_COLOURS[c["kind"]])
        width = 1 if c["kind"] == "other" else 2
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        if c["rod"]:
            draw.rectangle((x0 - 3, y0 - 3, x1 + 3, y1 + 3), outline=hex_rgb(HEAD_COLOURS["auer_rod"]), width=2)
    for c in order:
        if c.get("tag"):
            x0, y0 = float(c["box"][0]) * scale, float(c["box"][1]) * scale
            bb = draw.textbbox((x0, max(0.0, y0 - 14)), c["tag"], font=font)
            draw.rectangle(bb, fill=(255, 255, 255))
            draw.text((x0, max(0.0, y0 - 14)), c["tag"], fill=(0, 0, 0), font=font)
    return img, scale


def crop_picture(crop: np.ndarray) -> Image.Image:
    """A stored 48x48 gallery crop as a picture."""
    return Image.fromarray(np.ascontiguousarray(crop[..., :3]).astype(np.uint8))


def heat_overlay(crop: np.ndarray, drop: np.ndarray, vmax: float) -> Image.Image:
    """The crop and, next to it, the crop with the probability drop (0..``vmax``) laid over it as a
    black-red-yellow heat map: where hiding the pixels lowers the head's probability most."""
    base = crop.astype(np.float32)
    t = np.clip(drop / max(vmax, 1e-6), 0.0, 1.0)[..., None]
    heat = np.concatenate([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=2) * 255
    alpha = 0.7 * t
    over = base * (1 - alpha) + heat * alpha
    pair = np.concatenate([base, np.full((base.shape[0], 4, 3), 255.0), over], axis=1)
    return Image.fromarray(np.clip(pair + 0.5, 0, 255).astype(np.uint8))
