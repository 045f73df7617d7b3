"""Train the cell classifier heads on crops around labelled cells; validation AUROC per head."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from workers.classifier import CellClassifier, CellConfig, classify, crops_to_tensor
from workers.crops import extract_crops

from ..metrics import auroc
from .augment import stain_jitter
from .data import AreaSample


def head_labels(types: list[str], auer: np.ndarray, heads: tuple[str, ...]) -> np.ndarray:
    """(n, heads) float labels; NaN where a head has no label for a cell."""
    y = np.zeros((len(types), len(heads)), np.float32)
    for j, h in enumerate(heads):
        if h == "auer_rod":
            y[:, j] = auer.astype(np.float32)
        else:
            y[:, j] = np.array([t == h for t in types], np.float32)
    return y


@dataclass
class CellSet:
    """Cells of some areas: which area, centre (area px), labels."""

    images: list[np.ndarray]
    area_idx: np.ndarray
    centres: np.ndarray
    labels: np.ndarray
    patients: np.ndarray

    @classmethod
    def from_samples(cls, samples: list[AreaSample], heads: tuple[str, ...]) -> "CellSet":
        images, idx, centres, labels, patients = [], [], [], [], []
        for k, s in enumerate(samples):
            images.append(s.image)
            if len(s.boxes) == 0:
                continue
            c = np.stack([(s.boxes[:, 0] + s.boxes[:, 2]) / 2, (s.boxes[:, 1] + s.boxes[:, 3]) / 2], axis=1)
            centres.append(c)
            idx.append(np.full(len(c), k))
            labels.append(head_labels(s.types, s.auer, heads))
            patients += [s.patient] * len(c)
        if not centres:
            return cls(images, np.zeros(0, int), np.zeros((0, 2)), np.zeros((0, len(heads))), np.zeros(0))
        return cls(images, np.concatenate(idx), np.concatenate(centres).astype(np.float32),
                   np.concatenate(labels), np.asarray(patients))

    def __len__(self) -> int:
        return len(self.area_idx)

    def crops(self, context_px: float, out_px: int, rng: np.random.Generator | None = None,
              jitter_px: float = 0.0, scale_jitter: float = 0.0, indices: np.ndarray | None = None) -> np.ndarray:
        idx = np.arange(len(self)) if indices is None else indices
        out = np.zeros((len(idx), out_px, out_px, 3), np.uint8)
        for a in np.unique(self.area_idx[idx]):
            sel = np.flatnonzero(self.area_idx[idx] == a)
            c = self.centres[idx[sel]].copy()
            ctx = context_px
            if rng is not None:
                c += rng.normal(0, jitter_px, c.shape).astype(np.float32)
                ctx = context_px * float(np.exp(rng.normal(0, scale_jitter)))
            out[sel] = extract_crops(self.images[a], c, ctx, out_px)
        return out


def _augment_batch(crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(crops)
    for i in range(len(crops)):
        c = crops[i]
        if rng.integers(0, 2):
            c = c[:, ::-1]
        c = np.rot90(c, int(rng.integers(0, 4)))
        out[i] = stain_jitter(np.ascontiguousarray(c), rng, 0.8)
    return out


def train_cells(train: CellSet, val: CellSet, cfg: CellConfig, area_mpp: float, *, epochs: int = 30,
                time_budget_s: float | None = None, batch_size: int = 128, lr: float = 2e-3,
                weight_decay: float = 1e-4, patience: int = 6, seed: int = 0,
                log: Callable[[str], None] = print, device: str = "cpu") -> tuple[CellClassifier, dict]:
    """Multi-label training with class balancing; keeps the epoch with the best mean validation AUROC."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CellClassifier(cfg).to(device)
    heads = cfg.heads
    context_px = cfg.crop_um / area_mpp
    y = train.labels
    pos = np.nansum(y, axis=0)
    neg = np.sum(~np.isnan(y), axis=0) - pos
    pos_weight = torch.tensor(np.clip(neg / np.maximum(pos, 1.0), 1.0, 30.0), dtype=torch.float32, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    val_crops = val.crops(context_px, cfg.crop_px) if len(val) else None
    t0 = time.time()
    best_score, best_state, best_epoch = -1.0, copy.deepcopy(model.state_dict()), 0
    history = []
    stale = 0
    n = len(train)
    if n == 0:
        raise ValueError("no labelled cells to train on")
    steps_total = epochs * math.ceil(n / batch_size)
    step = 0
    for epoch in range(epochs):
        model.train()
        crops = train.crops(context_px, cfg.crop_px, rng, jitter_px=1.5 / area_mpp, scale_jitter=0.06)
        order = rng.permutation(n)
        losses = []
        for bi in range(0, n, batch_size):
            idx = order[bi:bi + batch_size]
            x = crops_to_tensor(_augment_batch(crops[idx], rng)).to(device)
            t = torch.from_numpy(y[idx]).to(device)
            frac = step / max(1, steps_total)
            if time_budget_s:
                frac = max(frac, (time.time() - t0) / time_budget_s)
            for g in opt.param_groups:
                g["lr"] = lr * max(0.02, 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
            logits = model(x)
            mask = ~torch.isnan(t)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[mask], t[mask], pos_weight=pos_weight.expand_as(logits)[mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if time_budget_s and time.time() - t0 > time_budget_s:
                break
        aucs = {}
        if val_crops is not None:
            p = classify(model, val_crops, device)
            for j, h in enumerate(heads):
                ok = ~np.isnan(val.labels[:, j])
                aucs[h] = auroc(val.labels[ok, j], p[ok, j])
        finite = [v for v in aucs.values() if v == v]
        score = float(np.mean(finite)) if finite else float("nan")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "auroc": aucs,
                        "seconds": round(time.time() - t0, 1)})
        log(f"  cells epoch {epoch + 1}: loss {np.mean(losses):.3f}, validation AUROC "
            + ", ".join(f"{h} {v:.3f}" for h, v in aucs.items())
            + f" ({time.time() - t0:.0f} s, {step * batch_size / max(1e-6, time.time() - t0):.0f} cells/s)")
        if val_crops is None or (score == score and score > best_score):
            best_score, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch + 1
            stale = 0
        else:
            stale += 1
        if time_budget_s and time.time() - t0 > time_budget_s:
            log(f"  time budget of {time_budget_s:.0f} s reached")
            break
        if stale >= patience:
            log(f"  no improvement for {patience} epochs: stopping")
            break
    model.load_state_dict(best_state)
    model.eval()
    # thresholds: predicted prevalence on validation equals the true prevalence (unbiased ratios)
    thresholds = {}
    best_auc = {}
    if val_crops is not None:
        p = classify(model, val_crops, device)
        for j, h in enumerate(heads):
            ok = ~np.isnan(val.labels[:, j])
            prev = float(np.mean(val.labels[ok, j])) if ok.any() else 0.0
            thresholds[h] = float(np.quantile(p[ok, j], 1.0 - prev)) if ok.any() and 0 < prev < 1 else 0.5
            thresholds[h] = float(np.clip(thresholds[h], 0.05, 0.95))
            best_auc[h] = auroc(val.labels[ok, j], p[ok, j])
    cfg.thresholds = thresholds
    return model, {"best_epoch": best_epoch, "val_auroc": best_auc, "history": history,
                   "train_cells": n, "val_cells": len(val), "seconds": round(time.time() - t0, 1),
                   "positives": {h: int(pos[j]) for j, h in enumerate(heads)}}
