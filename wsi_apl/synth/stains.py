"""Romanowsky stain presets for the synthetic smear renderer.

Every structure of a smear is rendered as an optical density (OD, base-10 absorbance) per RGB
channel; the rendered transmission is ``10 ** -OD`` (Beer-Lambert), so overlapping cells darken the
way they do on glass. A preset gives the OD of each structure at its usual density; a slide draws a
jittered copy of its preset so that no two slides share exactly the same stain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The structures the renderer knows. Target colours (RGB at typical density) are given in the
#: comments of the May-Grünwald-Giemsa preset, the reference from which the others are shifted.
COMPONENTS = (
    "nucleus",       # blue-violet chromatin (55, 22, 140)
    "cyto_baso",     # basophilic (violet-blue) cytoplasm (140, 135, 205)
    "cyto_neutral",  # neutral / lilac cytoplasm of maturing granulocytes (205, 182, 215)
    "azur_granule",  # azurophilic (primary) granules, dark purple (95, 35, 125)
    "spec_granule",  # specific (secondary) granules, faint lilac (185, 160, 200)
    "eos_granule",   # eosinophil granules, dull orange (215, 135, 105)
    "auer",          # Auer rods, red-purple (170, 40, 90)
    "rbc",           # red cells, greyish pink-lilac (208, 176, 210)
    "platelet",      # platelets, purple (150, 110, 170)
    "plasma_bg",     # plasma / protein haze between cells, bluish white (238, 236, 246)
)
#: The May-Grünwald-Giemsa targets follow real marrow pictures (the colour bands of Matek et al.
#: 2021's cells: nuclei (32-77, 11-42, 108-160), glass (236, 235, 244)) more than an atlas drawing:
#: (the other presets' nuclei are as dense, each with its own hue)
#: dense blue-violet nuclei, violet rather than cyan cytoplasm, greyish red cells. Until generator
#: 2 the palette was lighter and pinker (nucleus (95, 55, 140), cytoplasm (120, 160, 210), red cells
#: (225, 165, 165)), which a discriminator told from real cells at every crop.


def _od(rgb: tuple[int, int, int]) -> np.ndarray:
    return -np.log10(np.asarray(rgb, dtype=np.float64) / 255.0)


_MGG = {
    "nucleus": (55, 22, 140),
    "cyto_baso": (140, 135, 205),
    "cyto_neutral": (205, 182, 215),
    "azur_granule": (95, 35, 125),
    "spec_granule": (185, 160, 200),
    "eos_granule": (215, 135, 105),
    "auer": (170, 40, 90),
    "rbc": (208, 176, 210),
    "platelet": (150, 110, 170),
    "plasma_bg": (238, 236, 246),
}

#: Presets: per-structure target colours overriding MGG, and a global density factor.
_PRESETS: dict[str, tuple[dict[str, tuple[int, int, int]], float]] = {
    "mgg": ({}, 1.0),
    # Wright-Giemsa: redder red cells and nuclei, pinker neutral cytoplasm
    "wright": ({"nucleus": (90, 35, 130), "rbc": (232, 150, 140), "cyto_neutral": (222, 180, 190),
                "cyto_baso": (130, 160, 205)}, 1.0),
    # Giemsa alone: bluer overall
    "giemsa": ({"nucleus": (55, 35, 150), "cyto_baso": (100, 150, 215), "rbc": (215, 170, 180),
                "cyto_neutral": (205, 185, 210)}, 1.05),
    # Leishman: violet nuclei, greyish-pink red cells (held out in evaluation by default)
    "leishman": ({"nucleus": (80, 40, 150), "rbc": (220, 160, 175), "cyto_baso": (125, 150, 200),
                  "azur_granule": (120, 45, 125)}, 0.95),
    # under-stained and over-stained runs
    "pale": ({}, 0.7),
    "dark": ({}, 1.3),
}

PRESET_NAMES = tuple(_PRESETS)


@dataclass(frozen=True)
class Stain:
    """OD vectors (3,) per structure, plus the scanner's illumination and response."""

    name: str
    od: dict[str, np.ndarray]
    illumination: np.ndarray  # (3,) white level per channel in [0, 1]
    gamma: float
    noise_sigma: float  # grey levels
    jpeg_quality: int


def make_stain(preset: str, rng: np.random.Generator, jitter: float = 1.0) -> Stain:
    """Draw one slide's stain from ``preset`` with per-slide jitter (``jitter=0``: the preset as is)."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown stain preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    overrides, scale = _PRESETS[preset]
    global_scale = scale * float(np.exp(rng.normal(0.0, 0.08 * jitter)))
    od = {}
    for name in COMPONENTS:
        base = _od(overrides.get(name, _MGG[name]))
        per_channel = np.exp(rng.normal(0.0, 0.07 * jitter, size=3))
        od[name] = (base * per_channel * global_scale).astype(np.float32)
    illumination = np.clip(1.0 - np.abs(rng.normal(0.0, 0.025 * jitter, size=3)), 0.88, 1.0)
    return Stain(
        name=preset,
        od=od,
        illumination=illumination.astype(np.float32),
        gamma=float(np.clip(rng.normal(1.0, 0.05 * jitter), 0.85, 1.15)),
        noise_sigma=float(rng.uniform(1.0, 2.5)),
        jpeg_quality=int(rng.integers(78, 93)),
    )
