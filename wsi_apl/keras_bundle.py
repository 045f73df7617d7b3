"""Where imported Keras networks go (the calling side of :mod:`wsi_apl.keras_import`): the geometry of
the target bundle (:func:`bundle_geometry`) and the write of one network into its ``cells`` part
(:func:`write_cells`), which keeps every other network and part of an existing bundle.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from workers.bundle import BUNDLE_FILE, BundleError, create_bundle, load_bundle, save_part
from workers.classifier import HEADS, CellClassifier, CellConfig

from .keras_common import KerasImportError

DEFAULT_MPP = 0.0668            # µm/px of the paper's 2560x1920 frames
DEFAULT_AREA = (2560, 1920)


def bundle_geometry(out: Path, mpp: float | None) -> tuple[object | None, float]:
    """The existing bundle at ``out`` (or None) and the µm/px the import works at: an existing bundle
    keeps its own, so ``mpp`` must then be left out or equal."""
    if not (out / BUNDLE_FILE).exists():
        return None, float(mpp if mpp is not None else DEFAULT_MPP)
    b = load_bundle(out, verify=False)
    if not b.mpp_known:
        raise KerasImportError(f"{out}: this bundle works on pictures without a pixel size; import the Keras "
                               "models into a new bundle directory (with --mpp)")
    if mpp is not None and abs(mpp - b.mpp) > 1e-9:
        raise KerasImportError(f"{out}: the bundle works at {b.mpp} µm/px, not {mpp}; leave out --mpp to add to "
                               "it, or import into a new bundle directory")
    return b, b.mpp


def write_cells(out: Path, head: str, cfg: CellConfig, state: dict, provenance: dict, bundle, work_mpp: float,
                area: tuple[int, int], name: str | None, log: Callable[[str], None]):
    """Add (or replace) ``head``'s backbone and head in the bundle's cells part, keeping every other part."""
    tensors = dict(state)
    heads, head_sizes, thresholds, prov = [head], dict(cfg.head_sizes), {}, {"heads": {head: provenance}}
    old = bundle.part("cells") if bundle is not None else None
    if old is not None:
        oc = CellConfig.from_json(old["config"])
        if oc.backbone != "xception" or not oc.separate:
            raise KerasImportError(f"{out}: its cells part is a {oc.backbone} classifier"
                                   f"{'' if oc.separate else ' with a shared backbone'}, not imported Keras networks; "
                                   "import into a new bundle directory")
        same = (oc.crop_px == cfg.crop_px and abs(oc.crop_um - cfg.crop_um) < 1e-6
                and np.allclose(oc.image_mean, cfg.image_mean) and np.allclose(oc.image_std, cfg.image_std))
        if not same:
            raise KerasImportError(f"{out}: its networks take {oc.crop_px} px crops of {oc.crop_um:g} µm normalised "
                                   f"with mean {list(oc.image_mean)}, std {list(oc.image_std)}; this one takes "
                                   f"{cfg.crop_px} px, {cfg.crop_um:g} µm, mean {list(cfg.image_mean)}, std "
                                   f"{list(cfg.image_std)}; import it into another bundle directory")
        kept = {k: v for k, v in bundle.load_tensors("cells").items()
                if not k.startswith((f"backbones.{head}.", f"heads.{head}."))}
        kept.update(tensors)
        tensors = kept
        heads = list(oc.heads) + ([] if head in oc.heads else [head])
        head_sizes = {**oc.head_sizes, head: cfg.head_sizes[head]}
        thresholds = {h: t for h, t in oc.thresholds.items() if h != head}
        prov = dict(old.get("provenance", {}))
        prov["heads"] = {**prov.get("heads", {}), head: provenance}
        if head in oc.heads:
            log(f"  replacing the bundle's {head} network")
    cfg = CellConfig.from_json({**cfg.to_json(), "heads": heads, "head_sizes": head_sizes, "thresholds": thresholds})
    with torch.device("meta"):
        expect = CellClassifier(cfg).state_dict()
    bad = sorted(set(expect) ^ set(tensors)) + [k for k in expect if k in tensors
                                                and tuple(expect[k].shape) != tuple(tensors[k].shape)]
    if bad:
        raise BundleError(f"{out}: the cells weights do not match their config ({', '.join(bad[:3])}); "
                          "import into a new bundle directory")
    if bundle is None:
        bundle = create_bundle(out, name=name or out.name, mpp=work_mpp, area_size=area, heads=heads, synthetic=False,
                               description="Keras Xception cell classifiers imported with wsi-apl bundle import-keras")
    else:
        bundle = create_bundle(out, name=bundle.name, mpp=bundle.meta.get("mpp"), area_size=bundle.area_size,
                               heads=heads, synthetic=bundle.synthetic, description=bundle.meta.get("description", ""))
    metrics = {"import_check": {h: p["check"] for h, p in prov["heads"].items() if "check" in p}}
    bundle = save_part(bundle, "cells", tensors, config=cfg.to_json(), metrics=metrics, provenance=prov)
    if head not in HEADS:
        log(f"  note: the triage list reports {', '.join(HEADS)}; {head} is scanned and kept in the cell tables only")
    if bundle.has("slide_nets"):
        log("  note: the slide-level nets were trained on the previous cell outputs; retrain them "
            f"(wsi-apl train enn --bundle {out} --slides LABELS.csv)")
    if not bundle.has("detector"):
        w, h = bundle.area_size
        log(f"  the bundle has no detector yet: train one into {out} at {bundle.mpp:g} µm/px with {w}x{h} px areas "
            "(wsi-apl train detector --out ...); a bundle re-created at another geometry drops its parts")
    return bundle
