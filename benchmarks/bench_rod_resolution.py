"""Can a head see Auer rods at a given crop resolution? A rod-only head trained and scored among
myeloblasts and promyelocytes alone (the within-type task), so the cell type cannot stand in for the rod.

    python benchmarks/bench_rod_resolution.py --train COHORT --test HELDOUT --mpp 0.5 --crop-px 64 --stem 0
    python benchmarks/bench_rod_resolution.py --train COHORT --test HELDOUT --mpp 0.25 --crop-px 128

The first is the older bundles' crops (64 px at 0.5 µm/px, no full-resolution stage), the
second today's small backbone (128 px at 0.25 µm/px with its 16-channel full-resolution stage).

Both cohorts are ``wsi-apl synth`` folders; their APL and AML slides are read (``--slides`` per
diagnosis) through the tile selector at ``--mpp`` with areas of 256 x 192 µm; crops cover 32 µm.
Prints the held-out AUROC among blasts and promyelocytes, and within each type.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from workers.classifier import CellConfig, classify
from wsi_apl.metrics import auroc
from wsi_apl.train.cells import CellSet, subset, train_cells
from wsi_apl.train.data import read_cohort
from wsi_apl.train.steps import Geometry, collect_samples

HEADS = ("myeloblast", "promyelocyte", "auer_rod")


def blasts_and_promyelocytes(cohort: str, n: int, mpp: float) -> tuple[CellSet, np.ndarray]:
    by: dict[str, list] = {}
    for e in read_cohort(cohort):
        if e.diagnosis in ("apl", "aml"):
            by.setdefault(e.diagnosis, []).append(e)
    entries = sum((v[:n] for v in by.values()), [])
    samples = sum(collect_samples(entries, Geometry(mpp, (int(256 / mpp), int(192 / mpp))), lambda s: None,
                                  n_random=0), [])
    cs = CellSet.from_samples(samples, HEADS, mpp)
    keep = (cs.labels[:, 0] == 1) | (cs.labels[:, 1] == 1)
    out = subset(cs, keep)
    out.labels = out.labels[:, 2:3]
    return out, cs.labels[keep, 1] == 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--crop-px", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--stem", type=int, default=-1,
                    help="channels of the small backbone's full-resolution stage (0: none; -1: the default)")
    ap.add_argument("--slides", type=int, default=8, help="APL and AML slides per cohort and diagnosis")
    a = ap.parse_args()
    t0 = time.time()
    tr, _ = blasts_and_promyelocytes(a.train, a.slides, a.mpp)
    te, is_pro = blasts_and_promyelocytes(a.test, a.slides, a.mpp)
    print(f"cells read in {time.time() - t0:.0f} s: training {len(tr)} ({int(tr.labels.sum())} with rods), "
          f"held-out {len(te)} ({int(te.labels.sum())} with rods)")
    val = np.isin(tr.patients, np.unique(tr.patients)[:2])
    cfg = CellConfig(heads=("auer_rod",), crop_px=a.crop_px, stem=a.stem)
    model, _ = train_cells(subset(tr, ~val), subset(tr, val), cfg, epochs=a.epochs, patience=a.epochs,
                           log=lambda s: None)
    p = classify(model, te.crops(cfg), "cpu")[:, 0]
    y = te.labels[:, 0]
    print(f"crops of {cfg.crop_um:g} µm at {cfg.crop_um / a.crop_px:g} µm/px ({a.crop_px} px, stem {cfg.stem}): "
          "Auer-rod AUROC among "
          f"blasts and promyelocytes {auroc(y, p):.3f}; promyelocytes {auroc(y[is_pro], p[is_pro]):.3f}; "
          f"blasts {auroc(y[~is_pro], p[~is_pro]):.3f} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
