"""A picture of what the generator renders: every cell type, and one slide with its zones.

    python -m wsi_apl.synth.gallery docs/gallery.png
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .cells import Cell, NoiseBank, render_cell, shape_of
from .morphology import NUCLEATED_TYPES, spec_for
from .stains import make_stain

ROWS = [(t, "", 0, False, t) for t in NUCLEATED_TYPES] + [
    ("promyelocyte", "hypergranular", 0, False, "APL promyelocyte"),
    ("promyelocyte", "hypergranular", 2, False, "APL + Auer rods"),
    ("promyelocyte", "hypergranular", 10, True, "faggot cell"),
    ("promyelocyte", "microgranular", 0, False, "APL microgranular"),
    ("myeloblast", "", 2, False, "blast + Auer rods"),
]


def cell_gallery(mpp: float = 0.125, per_type: int = 3, seed: int = 0, stain: str = "mgg") -> Image.Image:
    rng = np.random.default_rng(seed)
    st = make_stain(stain, rng, jitter=0.0)
    bank = NoiseBank(mpp, seed)
    tile = int(round(34 / mpp))
    label_h = 28
    img = np.zeros((per_type * tile, tile * len(ROWS), 3), np.float32)
    for j, (ctype, variant, auer, faggot, _label) in enumerate(ROWS):
        spec = spec_for(ctype, variant)
        for i in range(per_type):
            c = Cell(id=0, type=ctype, x=(j + 0.5) * tile * mpp, y=(i + 0.5) * tile * mpp,
                     diameter=float(rng.uniform(*spec.diameter_um)), aspect=float(rng.uniform(*spec.aspect)),
                     angle=float(rng.uniform(0, np.pi)), seed=int(rng.integers(1 << 40)), variant=variant,
                     auer=auer, faggot=faggot, maturity=float(rng.uniform()))
            x0, y0, od, _ = render_cell(c, shape_of(c), mpp, st, bank)
            img[y0:y0 + od.shape[0], x0:x0 + od.shape[1]] += od
    rgb = (255 * st.illumination * 10 ** (-(img + st.od["plasma_bg"]))).clip(0, 255).astype(np.uint8)
    pic = Image.fromarray(rgb)
    scale = 0.5
    pic = pic.resize((int(pic.width * scale), int(pic.height * scale)), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (pic.width, pic.height + label_h), "white")
    out.paste(pic, (0, label_h))
    d = ImageDraw.Draw(out)
    tw = pic.width / len(ROWS)
    for j, row in enumerate(ROWS):
        words = row[4].split(" ")
        d.text((j * tw + 3, 2), " ".join(words[:2]), fill=(0, 0, 0))
        if len(words) > 2:
            d.text((j * tw + 3, 14), " ".join(words[2:]), fill=(0, 0, 0))
    return out


def slide_with_zones(seed: int = 12) -> Image.Image:
    """Thumbnail of one synthetic slide next to its ground-truth zone and blur map."""
    from tile_selector.slide import open_slide

    from .cohort import synth_cohort

    with tempfile.TemporaryDirectory() as tmp:
        rec = synth_cohort(tmp, ["apl"], seed=seed, mpp=0.25, size=(8000, 6000))[0]
        s = open_slide(Path(tmp) / rec.path)
        thumb, _ = s.read_overview(4.0)
        maps = np.load(Path(tmp) / "truth" / f"{rec.slide}.maps.npz")
        zones, blur = maps["zones"], maps["blur"].astype(np.float32)
    colours = np.array([[255, 255, 255], [200, 60, 60], [60, 170, 80], [70, 110, 220], [160, 60, 200]], np.float32)
    zmap = colours[zones]
    zmap[blur > 0.6] = zmap[blur > 0.6] * 0.45 + np.array([40, 40, 40]) * 0.55
    a = Image.fromarray(thumb)
    b = Image.fromarray(zmap.astype(np.uint8)).resize(a.size, Image.Resampling.NEAREST)
    out = Image.new("RGB", (a.width * 2 + 10, a.height + 60), "white")
    out.paste(a, (0, 0))
    out.paste(b, (a.width + 10, 0))
    d = ImageDraw.Draw(out)
    y = a.height + 6
    for k, (name, col) in enumerate([("thick", colours[1]), ("monolayer", colours[2]), ("thin edge", colours[3]),
                                     ("particle", colours[4]), ("out of focus (darker)", (80, 80, 80))]):
        x = 10 + k * 150
        d.rectangle((x, y, x + 12, y + 12), fill=tuple(int(v) for v in col))
        d.text((x + 16, y), name, fill=(0, 0, 0))
    d.text((10, y + 22), "synthetic APL smear, 2 x 1.5 mm (8000 x 6000 px at 0.25 um/px): thumbnail and ground-truth zones",
           fill=(0, 0, 0))
    return out


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "docs/gallery.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    cell_gallery().save(out)
    slide_with_zones().save(out.with_name(out.stem + "_slide.png"))
    print(out, out.with_name(out.stem + "_slide.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
