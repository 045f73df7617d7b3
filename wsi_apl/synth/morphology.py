"""Marrow cell types as a cytologist describes them, in physical units (µm).

Each nucleated type has a size range, a nucleus-to-cell diameter ratio (N:C), a nucleus shape, a
chromatin texture, nucleoli, a cytoplasm colour and granules. The values follow standard
haematology atlases (May-Grünwald-Giemsa): for example myeloblasts 12-20 µm with a round nucleus,
fine chromatin, nucleoli, a high N:C and scant basophilic cytoplasm; promyelocytes 15-25 µm with an
eccentric nucleus, abundant cytoplasm packed with azurophilic granules and a perinuclear clear zone;
lymphocytes 7-10 µm, dense nucleus, thin rim of sky-blue cytoplasm.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Types that count as nucleated marrow cells, in a fixed order (their index is stored in zarr).
NUCLEATED_TYPES = (
    "myeloblast",
    "promyelocyte",
    "myelocyte",
    "metamyelocyte",
    "band",
    "neutrophil",
    "eosinophil",
    "lymphocyte",
    "plasma_cell",
    "erythroblast",
    "smudge",
)


@dataclass(frozen=True)
class TypeSpec:
    """Appearance of one cell type; ranges are (low, high) drawn uniformly per cell."""

    diameter_um: tuple[float, float]
    aspect: tuple[float, float]           # minor / major axis of the cell outline
    nc_ratio: tuple[float, float]         # nucleus diameter / cell diameter
    nucleus: str                          # round | kidney | band | segmented | bilobed | smudge
    eccentricity: tuple[float, float]     # nucleus offset as a share of the free room
    chromatin_scale_um: float             # texture grain
    chromatin_amp: float                  # texture contrast
    nucleus_density: float                # relative OD of the nucleus
    nucleoli: tuple[int, int]
    cyto_mix: tuple[float, float]         # weights of (basophilic, neutral) cytoplasm colour
    cyto_density: float
    granule: str                          # none | azur | spec | eos
    granule_density: tuple[float, float]  # granules per µm² of cytoplasm
    granule_radius_um: tuple[float, float]
    hof: float                            # probability of a perinuclear clear zone
    granules_over_nucleus: bool = False


TYPES: dict[str, TypeSpec] = {
    "myeloblast": TypeSpec((12, 20), (0.85, 1.0), (0.72, 0.85), "round", (0.0, 0.35), 0.25, 0.22, 0.82,
                           (1, 3), (1.0, 0.0), 0.8, "azur", (0.0, 0.012), (0.2, 0.3), 0.0),
    "promyelocyte": TypeSpec((15, 25), (0.8, 1.0), (0.48, 0.62), "round", (0.5, 0.9), 0.35, 0.25, 0.9,
                             (0, 2), (0.6, 0.4), 0.8, "azur", (2.0, 3.0), (0.14, 0.22), 0.8,
                             granules_over_nucleus=True),
    "myelocyte": TypeSpec((12, 18), (0.8, 1.0), (0.5, 0.6), "round", (0.4, 0.8), 0.8, 0.32, 1.0,
                          (0, 0), (0.2, 0.8), 0.7, "spec", (0.6, 0.9), (0.18, 0.26), 0.4),
    "metamyelocyte": TypeSpec((10, 15), (0.8, 1.0), (0.5, 0.6), "kidney", (0.2, 0.5), 0.9, 0.36, 1.05,
                              (0, 0), (0.05, 0.95), 0.65, "spec", (0.6, 0.9), (0.18, 0.26), 0.0),
    "band": TypeSpec((10, 14), (0.85, 1.0), (0.6, 0.72), "band", (0.0, 0.2), 0.9, 0.36, 1.1,
                     (0, 0), (0.0, 1.0), 0.6, "spec", (0.6, 0.9), (0.18, 0.26), 0.0),
    "neutrophil": TypeSpec((10, 14), (0.85, 1.0), (0.6, 0.75), "segmented", (0.0, 0.2), 0.9, 0.36, 1.15,
                           (0, 0), (0.0, 1.0), 0.55, "spec", (0.6, 0.9), (0.18, 0.26), 0.0),
    "eosinophil": TypeSpec((12, 17), (0.85, 1.0), (0.55, 0.7), "bilobed", (0.0, 0.2), 0.9, 0.36, 1.1,
                           (0, 0), (0.0, 1.0), 0.45, "eos", (0.9, 1.3), (0.35, 0.5), 0.0),
    "lymphocyte": TypeSpec((7, 11), (0.85, 1.0), (0.8, 0.9), "round", (0.0, 0.25), 1.1, 0.42, 1.3,
                           (0, 0), (0.85, 0.15), 0.55, "none", (0.0, 0.0), (0.2, 0.3), 0.0),
    "plasma_cell": TypeSpec((10, 16), (0.65, 0.85), (0.45, 0.55), "round", (0.7, 0.95), 1.0, 0.45, 1.2,
                            (0, 0), (1.0, 0.0), 1.35, "none", (0.0, 0.0), (0.2, 0.3), 0.9),
    "erythroblast": TypeSpec((8, 14), (0.85, 1.0), (0.55, 0.72), "round", (0.0, 0.2), 1.2, 0.28, 1.55,
                             (0, 0), (1.0, 0.0), 0.8, "none", (0.0, 0.0), (0.2, 0.3), 0.0),
    "smudge": TypeSpec((10, 25), (0.6, 0.95), (1.0, 1.0), "smudge", (0.0, 0.0), 1.5, 0.45, 0.5,
                       (0, 0), (0.0, 0.0), 0.0, "none", (0.0, 0.0), (0.2, 0.3), 0.0),
}

#: APL's abnormal promyelocytes: hypergranular (classic) and microgranular (variant, closer to blasts).
APL_VARIANTS: dict[str, TypeSpec] = {
    "hypergranular": TypeSpec((16, 26), (0.8, 1.0), (0.5, 0.64), "kidney", (0.3, 0.7), 0.35, 0.25, 0.95,
                              (0, 2), (0.5, 0.5), 0.85, "azur", (3.2, 4.5), (0.2, 0.32), 0.3,
                              granules_over_nucleus=True),
    "microgranular": TypeSpec((14, 20), (0.85, 1.0), (0.66, 0.78), "bilobed", (0.1, 0.3), 0.3, 0.26, 0.85,
                              (0, 2), (0.7, 0.3), 0.85, "azur", (0.3, 0.6), (0.1, 0.16), 0.1),
}


def spec_for(cell_type: str, variant: str = "") -> TypeSpec:
    """The appearance spec of a cell type (an APL variant of promyelocyte when ``variant`` is set)."""
    if cell_type == "promyelocyte" and variant:
        return APL_VARIANTS[variant]
    return TYPES[cell_type]
