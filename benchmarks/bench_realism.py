"""Can a small network tell our rendered cells from real ones? A real-vs-synthetic discriminator.

    python benchmarks/bench_realism.py --real ../shared/testdata/real-cells/matek-bone-marrow:0.097 \\
        --synthetic COHORT [--per-type 150] [--picture docs/real_vs_synthetic.png]

Crops of the same cell types from both (real: Matek's blasts, promyelocytes, lymphocytes, segmented
neutrophils and eosinophils; synthetic: the truth cells of those types on a cohort's slides, read at
the same 0.25 µm/px), the central 22 µm only (the real pictures are 24 µm across, so neither side
shows padding). Two discriminators, 5-fold cross-validated, print their out-of-fold AUROC overall and
per type (0.5: the two cannot be told apart; 1.0: every crop gives itself away): a logistic
regression on colours alone (of the glass, the nuclei and the tones between, independent of how much of
the crop the cells cover), and a small CNN on
the pixels (colour, texture and shape; no colour augmentation, colour is one of the differences it
should find).
``--picture`` draws real and synthetic crops of each type side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tile_selector.slide import open_slide  # noqa: E402
from workers.classifier import SmallBackbone  # noqa: E402
from workers.crops import extract_crops  # noqa: E402
from wsi_apl.metrics import auroc  # noqa: E402
from wsi_apl.train.data import read_cohort  # noqa: E402
from wsi_apl.train.picture_sets import FolderSource, picture_window  # noqa: E402

MPP = 0.25
SIDE_UM = 22.0
TYPES = {"BLA": "myeloblast", "PMO": "promyelocyte", "LYT": "lymphocyte", "NGS": "neutrophil", "EOS": "eosinophil"}


def real_crops(src: FolderSource, per_type: int, seed: int) -> tuple[np.ndarray, list[str]]:
    px = int(round(SIDE_UM / MPP))
    rng = np.random.default_rng(seed)
    crops, types = [], []
    for folder, t in TYPES.items():
        files = sorted((src.path / folder).glob("*.jpg"))
        for f in rng.permutation(files)[:per_type]:
            win, _ = picture_window(Path(f), src.mpp, MPP, px)
            crops.append(win)
            types.append(t)
    return np.stack(crops), types


def synthetic_crops(cohort: Path, per_type: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Truth cells of the types, spread over the cohort's slides, monolayer zone, in focus."""
    px = int(round(SIDE_UM / MPP))
    rng = np.random.default_rng(seed)
    entries = read_cohort(cohort)
    want = {t: [] for t in TYPES.values()}
    for e in entries:
        truth = e.truth()
        for c in truth["cells"]:
            if c["type"] in want and c.get("zone") == "monolayer" and c.get("focus_um", 0) < 0.5 \
                    and not c.get("variant"):
                want[c["type"]].append((e, c))
    crops, types = [], []
    for t, cells in want.items():
        pick = rng.permutation(len(cells))[:per_type]
        by_slide: dict = {}
        for k in pick:
            e, c = cells[k]
            by_slide.setdefault(e.path, []).append(c)
        for path, cs in by_slide.items():
            s = open_slide(path)
            try:
                for c in cs:
                    x0, y0, x1, y1 = c["box"]
                    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                    half = SIDE_UM / 2 / s.mpp_x
                    img = s.read_area((cx - half - 4, cy - half - 4, cx + half + 4, cy + half + 4),
                                      (px + 8, px + 8)).image
                    crops.append(extract_crops(img, np.array([[(px + 8) / 2, (px + 8) / 2]], np.float32), px, px)[0])
                    types.append(t)
            finally:
                s.close()
    return np.stack(crops), types


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = SmallBackbone(16, 0)
        self.head = nn.Linear(self.backbone.out_features, 1)

    def forward(self, x):
        return self.head(self.backbone((x - 0.7) / 0.2)).squeeze(1)


def cross_validated_auroc(x: np.ndarray, y: np.ndarray, folds: int = 5, epochs: int = 12, seed: int = 0) -> np.ndarray:
    """Out-of-fold probability of 'synthetic' for every crop."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(x)) % folds
    oof = np.zeros(len(x), np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
    for f in range(folds):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        model = Discriminator()
        opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
        steps = epochs * math.ceil(len(tr) / 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
        for _ in range(epochs):
            model.train()
            for b in np.array_split(rng.permutation(tr), math.ceil(len(tr) / 64)):
                xb = t[b]
                if rng.integers(2):
                    xb = xb.flip(3)
                xb = torch.rot90(xb, int(rng.integers(4)), (2, 3))
                loss = nn.functional.binary_cross_entropy_with_logits(model(xb), torch.from_numpy(y[b]).float())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.inference_mode():
            oof[te] = torch.sigmoid(model(t[te])).numpy()
    return oof


def colour_features(crops: np.ndarray) -> np.ndarray:
    """Per crop, colours that do not depend on how much of the crop the cells cover: the glass (the
    brightest fifth of the pixels: mean RGB), the nuclei (the darkest tenth: optical density and its
    share per channel) and the tones between (the 40-60 % band: share per channel)."""
    od = -np.log10(np.clip((crops.astype(np.float32) + 1.0) / 256.0, 1e-3, 1.0)).reshape(len(crops), -1, 3)
    tot = od.sum(axis=2)
    order = np.argsort(tot, axis=1)
    n = tot.shape[1]
    feats = []
    for i in range(len(crops)):
        o = od[i][order[i]]
        glass, mid, dark = o[: n // 5], o[int(0.4 * n):int(0.6 * n)], o[int(0.9 * n):]
        share = lambda v: v.mean(0) / max(1e-6, float(v.mean(0).sum()))  # noqa: E731
        feats.append(np.r_[glass.mean(0), dark.mean(0), share(dark), share(mid)])
    return np.asarray(feats)


def colour_only_auroc(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Out-of-fold probabilities of a logistic regression on :func:`colour_features` (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    return cross_val_predict(clf, colour_features(x), y, cv=cv, method="predict_proba")[:, 1]


def picture(real: np.ndarray, rtypes: list[str], syn: np.ndarray, stypes: list[str], out: Path, n: int = 5) -> None:
    """One row per type: ``n`` real crops, then ``n`` synthetic ones."""
    from PIL import Image, ImageDraw

    tile = real.shape[1]
    names = list(TYPES.values())
    label_w, gap = 110, 12
    canvas = Image.new("RGB", (label_w + 2 * n * tile + gap, len(names) * (tile + 4) + 24), "white")
    d = ImageDraw.Draw(canvas)
    d.text((label_w, 4), "real (Matek et al. 2021, CC BY 4.0)", fill=(0, 0, 0))
    d.text((label_w + n * tile + gap, 4), "synthetic (wsi-apl synth)", fill=(0, 0, 0))
    for j, t in enumerate(names):
        y0 = 24 + j * (tile + 4)
        d.text((4, y0 + tile // 2 - 6), t, fill=(0, 0, 0))
        r = [c for c, tt in zip(real, rtypes) if tt == t][:n]
        s = [c for c, tt in zip(syn, stypes) if tt == t][:n]
        for k, c in enumerate(r):
            canvas.paste(Image.fromarray(c), (label_w + k * tile, y0))
        for k, c in enumerate(s):
            canvas.paste(Image.fromarray(c), (label_w + (n + k) * tile + gap, y0))
    canvas.save(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, help="Matek-layout folder set DIR:MPP")
    ap.add_argument("--synthetic", type=Path, required=True, help="a synthetic cohort (labels.csv + truth/)")
    ap.add_argument("--per-type", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=12, help="CNN discriminator epochs (0: colour statistics only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--picture", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    t0 = time.time()
    real, rtypes = real_crops(FolderSource.parse(a.real), a.per_type, a.seed)
    syn, stypes = synthetic_crops(a.synthetic, a.per_type, a.seed)
    if a.picture:
        picture(real, rtypes, syn, stypes, a.picture)
    x = np.concatenate([real, syn])
    y = np.r_[np.zeros(len(real)), np.ones(len(syn))].astype(np.float32)
    types = np.array(rtypes + stypes)
    pc = colour_only_auroc(x, y, a.seed)
    out = {"real": len(real), "synthetic": len(syn), "colour_only_auroc": auroc(y, pc), "per_type": {},
           "colour_only_per_type": {}}
    print(f"{len(real)} real, {len(syn)} synthetic crops of {SIDE_UM:g} µm at {MPP} µm/px (0.5: indistinguishable)")
    print(f"  colour statistics alone (logistic regression): out-of-fold AUROC {out['colour_only_auroc']:.3f}")
    if a.epochs:
        p = cross_validated_auroc(x, y, epochs=a.epochs, seed=a.seed)
        out["auroc"] = auroc(y, p)
        print(f"  small CNN discriminator: out-of-fold AUROC {out['auroc']:.3f}")
    for t in TYPES.values():
        m = types == t
        if (y[m] == 0).any() and (y[m] == 1).any():
            out["colour_only_per_type"][t] = auroc(y[m], pc[m])
            if a.epochs:
                out["per_type"][t] = auroc(y[m], p[m])
    print("  per type, colour alone: " + ", ".join(f"{t} {v:.3f}" for t, v in out["colour_only_per_type"].items()))
    if a.epochs:
        print("  per type, CNN: " + ", ".join(f"{t} {v:.3f}" for t, v in out["per_type"].items()))
    print(f"  ({time.time() - t0:.0f} s)")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
