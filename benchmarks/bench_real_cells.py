"""The cell heads on held-out real cells: synthetic heads zero-shot, real only, synthetic pretraining
then real fine-tuning, synthetic and real mixed; each with OD or HED colour augmentation and with or
without stain normalisation; and across sources (marrow <-> blood).

    python benchmarks/bench_real_cells.py \\
        --marrow ../shared/testdata/real-cells/matek-bone-marrow:0.097 \\
        --blood ../shared/testdata/real-cells/pbc-peripheral-blood:0.107 \\
        --synthetic-bundle demo_out/bundle --cohort demo_out/training_cohort [--recipes b,c] [--json OUT]

The marrow pictures are split once (seeded, stratified by class, by picture: the sets have no patient
ids) into a training part and a held-out test part (``--test-share``); every recipe trains on the
training part only and is scored on the same test pictures with ``wsi-apl evaluate cells``' own
code. The split is made of symbolic links to the pictures, so training goes through the real
``--folders`` path. Training runs a fixed number of epochs (``--epochs``; the mixed recipe
``--mixed-epochs``, as each of its epochs holds several times the cells).

Recipes: ``a`` the synthetic bundle's heads as they are; ``b`` real marrow cells only; ``b+blood`` real
marrow and blood cells; ``c`` the synthetic heads' backbone fine-tuned on real marrow; ``d`` the
synthetic cohort and real marrow mixed; ``x`` trained on marrow, tested on blood, and trained on
blood, tested on marrow. Variants: colour augmentation ``od``/``hed`` x normalisation
``none``/``reinhard`` (``--variants``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_apl.evaluate import evaluate_labelled_cells  # noqa: E402
from wsi_apl.train.cells import train_cells_config  # noqa: E402
from wsi_apl.train.defaults import TRAIN_CELLS_DEFAULTS  # noqa: E402
from wsi_apl.train.picture_sets import BUILTIN_CLASSES, FolderSource, picture_classes  # noqa: E402
from wsi_apl.train.sources import CellSources, training_cells  # noqa: E402
from wsi_apl.train.steps import Geometry, open_or_create, step_cells_from  # noqa: E402

HEADS = ("myeloblast", "promyelocyte")


def split_folder(src: FolderSource, test_share: float, seed: int, out: Path) -> tuple[FolderSource, FolderSource]:
    """Symbolic-link copies of a folder set: (training part, test part), stratified by class."""
    items, _ = picture_classes(src.path, BUILTIN_CLASSES)
    rng = np.random.default_rng(seed)
    by_cls: dict[str, list[Path]] = {}
    for p, c in items:
        by_cls.setdefault(c, []).append(p)
    parts = {"train": out / f"{src.path.name}-train", "test": out / f"{src.path.name}-test"}
    for c, files in by_cls.items():
        files = sorted(files)
        rng.shuffle(files)
        k = int(round(test_share * len(files)))
        for part, chosen in (("test", files[:k]), ("train", files[k:])):
            for f in chosen:
                dst = parts[part] / f.relative_to(src.path)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(f.resolve(), dst)
    return FolderSource(parts["train"], src.mpp), FolderSource(parts["test"], src.mpp)


def score(bundle: Path, test: FolderSource) -> dict:
    m = evaluate_labelled_cells(bundle, CellSources(folders=[test]), log=lambda s: None)
    out = {h: {"auroc": v["auroc"], "auroc_ci": v["auroc_ci"]} for h, v in m["heads"].items() if h in HEADS}
    pair = m.get("promyelocyte_vs_myeloblast")
    if pair:
        out["pro_vs_blast"] = pair["heads"]["promyelocyte"]
    return out


def train(out: Path, src: CellSources, *, epochs: int, aug: str, norm: str, seed: int, crop: tuple[float, int],
          weights: Path | None = None, patience: int = 1000, heads: tuple[str, ...] = HEADS) -> float:
    """Heads trained as ``wsi-apl train cells`` trains them (a ``crop`` of (µm, px), fixed epochs)."""
    geo = Geometry(0.5, (512, 384))
    cfg = train_cells_config(heads, crop[0], crop[1])
    t0 = time.time()
    tr, va, synthetic, notes = training_cells(src, geo, cfg, seed=seed, log=lambda s: None)
    bundle = open_or_create(out, geo, synthetic)
    step_cells_from(bundle, tr, va, heads=heads, epochs=epochs, seed=seed, stain_aug=aug, stain_norm=norm,
                    backbone_weights=weights, notes=notes, config=cfg, patience=patience, log=lambda s: None)
    return time.time() - t0


def fmt(r: dict) -> str:
    def one(k):
        v = r.get(k)
        return f"{v['auroc']:.3f} [{v['auroc_ci'][0]:.3f}, {v['auroc_ci'][1]:.3f}]" if v else "-"
    return f"| {one('myeloblast')} | {one('promyelocyte')} | {one('pro_vs_blast')} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--marrow", required=True, help="marrow folder set DIR:MPP")
    ap.add_argument("--blood", default=None, help="blood folder set DIR:MPP (b+blood, x)")
    ap.add_argument("--synthetic-bundle", type=Path, default=None, help="a bundle trained on synthetic slides (a, c)")
    ap.add_argument("--cohort", type=Path, default=None, help="the synthetic cohort it was trained on (d)")
    ap.add_argument("--retrain-synthetic", type=Path, nargs="*", default=[],
                    help="synthetic cohorts to train heads on with the demo's recipe (32-µm crops at 0.25 µm/px, "
                         "--synthetic-epochs), each then scored zero-shot (a)")
    ap.add_argument("--synthetic-epochs", type=int, default=6)
    ap.add_argument("--crop-um", type=float, default=TRAIN_CELLS_DEFAULTS["crop_um"])
    ap.add_argument("--crop-px", type=int, default=TRAIN_CELLS_DEFAULTS["crop_px"])
    ap.add_argument("--recipes", default="a,b,b+blood,c,d,x")
    ap.add_argument("--variants", default="od/none,hed/none,od/reinhard,hed/reinhard")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--mixed-epochs", type=int, default=8)
    ap.add_argument("--test-share", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    marrow = FolderSource.parse(a.marrow)
    blood = FolderSource.parse(a.blood) if a.blood else None
    recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    variants = [tuple(v.split("/")) for v in a.variants.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        m_train, m_test = split_folder(marrow, a.test_share, a.seed, tmp)
        n_test = sum(1 for p in m_test.path.rglob("*") if p.is_file())
        print(f"marrow: {n_test} held-out test pictures, the rest for training (seed {a.seed}); "
              f"epochs {a.epochs} (mixed {a.mixed_epochs})", flush=True)
        print("| recipe | colour aug | stain norm | myeloblast AUROC [95 % CI] | promyelocyte | promyelocyte vs blast |"
              " seconds |")
        print("|---|---|---|---|---|---|---|", flush=True)

        crop = (a.crop_um, a.crop_px)

        def run(name, src, aug, norm, weights=None, epochs=a.epochs, test=m_test):
            out = tmp / f"b-{len(results)}"
            secs = train(out, src, epochs=epochs, aug=aug, norm=norm, seed=a.seed, weights=weights, crop=crop)
            r = score(out, test)
            results.append({"recipe": name, "aug": aug, "norm": norm, "seconds": round(secs), **r})
            print(f"| {name} | {aug} | {norm} {fmt(r)} {secs:.0f} |", flush=True)

        if "a" in recipes and a.synthetic_bundle:
            r = score(a.synthetic_bundle, m_test)
            results.append({"recipe": "a", "aug": "-", "norm": "-", **r})
            print(f"| a: synthetic heads ({a.synthetic_bundle}), zero-shot | - | - {fmt(r)} - |", flush=True)
        for cohort in a.retrain_synthetic:
            from wsi_apl.train.data import read_cohort

            out = tmp / f"s-{len(results)}"
            gen = read_cohort(cohort)[0].truth().get("generator", "?")
            secs = train(out, CellSources(cohort=cohort), epochs=a.synthetic_epochs, aug="od", norm="none",
                         seed=a.seed, crop=(32.0, 128), heads=("myeloblast", "promyelocyte", "auer_rod"))
            r = score(out, m_test)
            results.append({"recipe": f"a: {gen}", "aug": "od", "norm": "none", "seconds": round(secs), **r})
            print(f"| a: heads trained on {cohort.name} ({gen}), zero-shot | od | none {fmt(r)} {secs:.0f} |",
                  flush=True)
        for aug, norm in variants:
            if "b" in recipes:
                run("b: real marrow only", CellSources(folders=[m_train]), aug, norm)
            if "b+blood" in recipes and blood:
                run("b+blood: real marrow and blood", CellSources(folders=[m_train, blood]), aug, norm)
            if "c" in recipes and a.synthetic_bundle:
                run("c: synthetic pretraining, real fine-tuning", CellSources(folders=[m_train]), aug, norm,
                    weights=a.synthetic_bundle / "cells.safetensors")
            if "d" in recipes and a.cohort:
                run("d: synthetic and real mixed", CellSources(cohort=a.cohort, folders=[m_train]), aug, norm,
                    epochs=a.mixed_epochs)
        if "x" in recipes and blood:
            aug, norm = variants[0]
            run("x: marrow -> blood", CellSources(folders=[m_train]), aug, norm, test=blood)
            run("x: blood -> marrow", CellSources(folders=[blood]), aug, norm)
    import resource

    print(f"peak memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
