"""Synthetic cohorts: diagnoses with plausible marrow compositions, slides, ground truth, labels.

Diagnoses (``labels.csv`` column ``diagnosis``):

- ``healthy``: blasts < 5 %, promyelocytes 1-8 %, no Auer rods.
- ``aml`` (non-APL AML): blasts 20-90 %; Auer rods in a minority of blasts in some patients; AML
  with maturation shows more promyelocytes (up to 15 %).
- ``apl``: hypergranular abnormal promyelocytes 30-90 %, Auer rods and faggot cells in some cells;
  a microgranular-variant share that looks closer to blasts (mostly microgranular in ~20 % of
  patients).
- ``reactive``: a non-APL control that mimics APL (left shift after G-CSF or infection):
  promyelocytes and myelocytes raised up to 15-25 %, no Auer rods.

Every slide gets a JSON sidecar in ``OUT/truth/`` with every nucleated cell (box, ellipse, type,
Auer-rod flag, zone, focus), the zone and blur maps (``.maps.npz``), and the cohort gets a VIA 2
project and ``labels.csv``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .cells import cell_box_px
from .morphology import NUCLEATED_TYPES
from .scene import ZONES, Scene, SceneParams, SmearGeometry, build_scene
from .stains import PRESET_NAMES, Stain, make_stain
from .writer import write_pyramid_tiff

DIAGNOSES = ("apl", "aml", "healthy", "reactive")
# 2: real-marrow colours, fine chromatin and granules, irregular nuclei; 3: each pixel blurred by its truth sigma
GENERATOR = "wsi-apl synth 3"
MAP_MPP = 4.0

_HEALTHY_BASE = {
    "myelocyte": (0.08, 0.16), "metamyelocyte": (0.08, 0.15), "band": (0.08, 0.15),
    "neutrophil": (0.08, 0.2), "eosinophil": (0.01, 0.05), "lymphocyte": (0.08, 0.2),
    "plasma_cell": (0.005, 0.03), "erythroblast": (0.15, 0.3),
}


def _composition(fixed: dict[str, float], rng: np.random.Generator,
                 base: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """Shares of nucleated types: ``fixed`` as given, the rest drawn from ``base`` and rescaled."""
    base = dict(base or _HEALTHY_BASE)
    rest = {t: float(rng.uniform(*r)) for t, r in base.items() if t not in fixed}
    room = max(0.0, 1.0 - sum(fixed.values()))
    scale = room / max(1e-9, sum(rest.values()))
    comp = {t: 0.0 for t in NUCLEATED_TYPES if t != "smudge"}
    comp.update({t: v * scale for t, v in rest.items()})
    comp.update(fixed)
    return comp


def draw_params(diagnosis: str, rng: np.random.Generator) -> tuple[SceneParams, dict]:
    """A patient's marrow for ``diagnosis``: scene parameters and a description for the sidecar."""
    info: dict = {}
    if diagnosis == "healthy":
        comp = _composition({"myeloblast": rng.uniform(0.005, 0.045),
                             "promyelocyte": rng.uniform(0.01, 0.08)}, rng)
        params = SceneParams(comp, {})
    elif diagnosis == "reactive":
        comp = _composition({"myeloblast": rng.uniform(0.01, 0.05), "promyelocyte": rng.uniform(0.08, 0.2),
                             "myelocyte": rng.uniform(0.1, 0.22)}, rng)
        params = SceneParams(comp, {})
    elif diagnosis == "aml":
        with_maturation = rng.uniform() < 0.35
        info["subtype"] = "AML with maturation" if with_maturation else "AML"
        blasts = rng.uniform(0.2, 0.6) if with_maturation else rng.uniform(0.3, 0.9)
        promyelo = rng.uniform(0.05, 0.15) if with_maturation else rng.uniform(0.0, 0.05)
        comp = _composition({"myeloblast": blasts, "promyelocyte": promyelo}, rng)
        auer = {"myeloblast": float(rng.uniform(0.02, 0.15))} if rng.uniform() < 0.4 else {}
        params = SceneParams(comp, auer, faggot_share=0.0)
    elif diagnosis == "apl":
        micro = rng.uniform() < 0.2
        info["subtype"] = "APL microgranular variant" if micro else "APL hypergranular"
        comp = _composition({"promyelocyte": rng.uniform(0.3, 0.9), "myeloblast": rng.uniform(0.02, 0.12)},
                            rng)
        auer = {"promyelocyte": float(rng.uniform(0.05, 0.4))} if rng.uniform() < 0.8 else {}
        params = SceneParams(comp, auer, faggot_share=float(rng.uniform(0.0, 0.3)),
                             apl_variant_share=float(rng.uniform(0.6, 1.0) if micro else rng.uniform(0.0, 0.15)),
                             abnormal_promyelocytes=True)
    else:
        raise ValueError(f"unknown diagnosis {diagnosis!r}; use one of {', '.join(DIAGNOSES)}")
    params.cellularity = float(np.exp(rng.normal(0.0, 0.25)))
    return params, info


@dataclass
class SlideRecord:
    slide: str
    patient: str
    diagnosis: str
    path: str
    truth: str


def parse_diagnoses(spec: str) -> list[str]:
    """``"apl:2,aml:1"`` -> ``["apl", "apl", "aml"]``."""
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, count = part.partition(":")
        name = name.strip().lower()
        if name not in DIAGNOSES:
            raise ValueError(f"unknown diagnosis {name!r} in --diagnoses; use {', '.join(DIAGNOSES)}")
        out += [name] * int(count or 1)
    return out


def cell_records(scene: Scene) -> list[dict]:
    """Ground-truth rows of every nucleated cell (level-0 px boxes, µm sizes)."""
    rows = []
    X = np.array([c.x for c in scene.cells]) if scene.cells else np.zeros(0)
    Y = np.array([c.y for c in scene.cells]) if scene.cells else np.zeros(0)
    focus = scene.blur_at(X, Y) if len(X) else np.zeros(0)
    for c, f in zip(scene.cells, focus):
        shape = scene.shape(c)
        x0, y0, x1, y1 = cell_box_px(c, shape, scene.mpp)
        rows.append({
            "id": c.id, "type": c.type, "variant": c.variant,
            "box": [round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)],
            "ellipse": [round(c.x / scene.mpp, 1), round(c.y / scene.mpp, 1),
                        round(shape.a * shape.edge_max / scene.mpp, 1),
                        round(shape.b * shape.edge_max / scene.mpp, 1), round(math.degrees(c.angle) % 360, 1)],
            "diameter_um": round(c.diameter, 2),
            "auer_rod": bool(c.auer > 0), "faggot": bool(c.faggot),
            "zone": c.zone, "focus_um": round(float(f), 2),
        })
    return rows


#: Level-0 columns rendered at once: bounds the float working memory whatever the slide's width.
RENDER_CHUNK = 8192


def render_slide(scene: Scene, path: Path, description: str,
                 progress: Callable[[float], None] | None = None) -> None:
    def band(y0: int, y1: int):
        parts = [scene.render_region(x, y0, min(scene.width, x + RENDER_CHUNK), y1, band_index=y0 // 1024)
                 for x in range(0, scene.width, RENDER_CHUNK)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    write_pyramid_tiff(path, scene.width, scene.height, scene.mpp, band,
                       jpeg_quality=scene.stain.jpeg_quality, description=description, progress=progress)


def write_plain(scene: Scene, path: Path) -> None:
    """A single camera-frame picture (PNG, resolution in its pHYs chunk)."""
    from PIL import Image

    img = scene.render_region(0, 0, scene.width, scene.height)
    dpi = 25400.0 / scene.mpp
    Image.fromarray(img).save(path, dpi=(dpi, dpi))


def _slide_params(params: SceneParams, plain: bool, defect: str, smear: str) -> SceneParams:
    """The patient's scene parameters with the cohort-wide options of this run applied."""
    if plain:
        params = SceneParams(**{**params.__dict__, "blur_patches": (0, 0)})
    if defect != "none":
        params = SceneParams(**{**params.__dict__, "defect": defect})
    if smear != "normal":
        params = SceneParams(**{**params.__dict__, "smear": smear})
    return params


def _slide_stain(preset: str, slide_seed: int, jpeg_quality: int | None) -> Stain:
    """The slide's stain: ``preset`` jittered from the slide's seed, with the JPEG quality if fixed."""
    st = make_stain(preset, np.random.default_rng([slide_seed, 3]))
    if jpeg_quality is not None:
        st = replace(st, jpeg_quality=int(jpeg_quality))
    return st


def _write_maps(scene: Scene, path: Path) -> None:
    """The zone and blur maps (``.maps.npz``) at MAP_MPP."""
    zones, blur = scene.maps(MAP_MPP)
    np.savez_compressed(path, zones=zones, blur=blur.astype(np.float16),
                        map_mpp=MAP_MPP, zone_names=np.array(ZONES))


def _smear_truth(geometry: SmearGeometry | None) -> dict | None:
    """The smear's placement for the sidecar (None on an empty slide)."""
    if geometry is None:
        return None
    return {"theta_deg": math.degrees(geometry.theta) % 360, "length_um": geometry.length,
            "half_width_um": geometry.half_width,
            "monolayer_um": (geometry.mono_end - geometry.thick_end) * geometry.length}


def _truth(header: dict, name: str, scene: Scene, params: SceneParams, cells: list[dict]) -> dict:
    """The slide's JSON sidecar: ``header`` (who, what and how it was rendered), then its marrow,
    maps, focus, smear and cells."""
    counts: dict[str, int] = {}
    for c in cells:
        counts[c["type"]] = counts.get(c["type"], 0) + 1
    return {
        **header,
        "composition": {k: round(v, 4) for k, v in params.composition.items()},
        "auer_share": params.auer_share, "faggot_share": params.faggot_share,
        "microgranular_share": params.apl_variant_share, "cellularity": params.cellularity,
        "counts": counts, "maps": f"{name}.maps.npz", "map_mpp": MAP_MPP, "zones": list(ZONES),
        "blur_patches": [p.__dict__ for p in scene.blur], "base_blur_um": scene.base_blur,
        "smear": _smear_truth(scene.geometry),
        "cells": cells,
    }


def _via_entry(path: Path, patient: str, diagnosis: str, cells: list[dict]) -> dict:
    """The slide's image entry of the VIA 2 project: every cell as a rectangle with its type."""
    return {
        "filename": path.name, "size": path.stat().st_size, "file_attributes": {"patient": patient, "diagnosis": diagnosis},
        "regions": [{"shape_attributes": {"name": "rect", "x": c["box"][0], "y": c["box"][1],
                                          "width": round(c["box"][2] - c["box"][0], 1),
                                          "height": round(c["box"][3] - c["box"][1], 1)},
                     "region_attributes": {"type": c["type"], "auer_rod": {"1": True} if c["auer_rod"] else {},
                                           "faggot_cell": {"1": True} if c["faggot"] else {}}}
                    for c in cells],
    }


def synth_cohort(out_dir: str | Path, diagnoses: list[str], *, seed: int = 0, mpp: float = 0.125,
                 size: tuple[int, int] = (20000, 15000), stain: str | None = None, plain: bool = False,
                 slides_per_patient: int = 1, defect: str = "none", prefix: str = "slide",
                 jpeg_quality: int | None = None, smear: str = "normal", log: Callable[[str], None] | None = None) -> list[SlideRecord]:
    """Render one slide per entry of ``diagnoses`` into ``out_dir``; returns the records.

    ``stain=None`` draws each slide's preset from the training presets (all but ``leishman``,
    which is kept for held-out evaluation); a name fixes it for every slide.
    """
    out = Path(out_dir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 99])
    train_presets = [p for p in PRESET_NAMES if p != "leishman"]
    records: list[SlideRecord] = []
    via_meta: dict = {}
    patient_params: dict[str, tuple] = {}
    width, height = (2560, 1920) if plain and size == (20000, 15000) else size
    for i, diagnosis in enumerate(diagnoses):
        t0 = time.time()
        patient_no = i // slides_per_patient
        patient = f"P{seed:04d}-{patient_no:04d}"
        if patient not in patient_params:
            patient_params[patient] = draw_params(diagnosis, rng)
        params, info = patient_params[patient]
        params = _slide_params(params, plain, defect, smear)
        preset = stain or str(rng.choice(train_presets))
        slide_seed = int(rng.integers(1 << 31))
        st = _slide_stain(preset, slide_seed, jpeg_quality)
        scene = build_scene(width, height, mpp, st, params, slide_seed, plain=plain)
        name = f"{prefix}_{seed:04d}_{i:03d}"
        ext = ".png" if plain else ".tiff"
        path = out / f"{name}{ext}"
        if plain:
            write_plain(scene, path)
        else:
            render_slide(scene, path, f"wsi-apl synthetic bone-marrow smear ({GENERATOR}); not a patient")
        cells = cell_records(scene)
        _write_maps(scene, out / "truth" / f"{name}.maps.npz")
        header = {
            "generator": GENERATOR, "slide": name, "file": path.name, "patient": patient,
            "diagnosis": diagnosis, **info, "seed": slide_seed, "mpp": mpp, "size": [width, height],
            "plain": plain, "stain": preset, "defect": defect, "smear_shape": smear, "jpeg_quality": st.jpeg_quality,
        }
        (out / "truth" / f"{name}.json").write_text(json.dumps(_truth(header, name, scene, params, cells)))
        via_meta[f"{path.name}{path.stat().st_size}"] = _via_entry(path, patient, diagnosis, cells)
        records.append(SlideRecord(name, patient, diagnosis, path.name, f"truth/{name}.json"))
        if log:
            log(f"{name}: {diagnosis:8s} {len(cells):6d} nucleated cells, stain {preset}, "
                f"{width}x{height} px, {time.time() - t0:.1f} s")
    _write_via(out / "truth" / "via_project.json", via_meta)
    _write_labels(out / "labels.csv", records)
    return records


def _write_via(path: Path, meta: dict) -> None:
    project = {
        "_via_settings": {"project": {"name": "wsi-apl synthetic cohort"}},
        "_via_img_metadata": meta,
        "_via_attributes": {
            "region": {"type": {"type": "dropdown", "description": "cell type",
                                "options": {t: t for t in NUCLEATED_TYPES}, "default_options": {}},
                       "auer_rod": {"type": "checkbox", "description": "Auer rod(s)",
                                    "options": {"1": "yes"}, "default_options": {}},
                       "faggot_cell": {"type": "checkbox", "description": "faggot cell (bundle of Auer rods)",
                                       "options": {"1": "yes"}, "default_options": {}}},
            "file": {"patient": {"type": "text", "description": "patient (pseudonym)", "default_value": ""},
                     "diagnosis": {"type": "text", "description": "slide diagnosis", "default_value": ""}}},
        "_via_data_format_version": "2.0.10",
        "_via_image_id_list": list(meta),
    }
    path.write_text(json.dumps(project))


def _write_labels(path: Path, records: list[SlideRecord]) -> None:
    existing: dict[str, dict] = {}
    if path.exists():
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                existing[row["slide"]] = row
    for r in records:
        existing[r.slide] = {"slide": r.slide, "patient": r.patient, "diagnosis": r.diagnosis, "path": r.path}
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["slide", "patient", "diagnosis", "path"])
        w.writeheader()
        for row in existing.values():
            w.writerow(row)
