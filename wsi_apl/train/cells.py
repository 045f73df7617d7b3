"""Train the cell classifier heads on crops around labelled cells; validation AUROC per head."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workers.classifier import CellClassifier, CellConfig, classify, crops_to_tensor
from workers.crops import cell_centres, extract_crops

from ..metrics import auroc
from .augment import DEFAULT_STAIN_AUG, STAIN_AUGMENTS, hed_jitter, stain_jitter
from .budget import Budget
from .data import AreaSample

#: Exponent of the label-pattern balancing of training draws (0.5: square-root sampling).
BALANCE = 0.5
#: The recipe ``wsi-apl train cells`` follows unless told otherwise: the best on held-out real marrow
#: cells (docs/RESULTS.md, "Real cells"; ``benchmarks/bench_real_cells.py``). ``wsi-apl train all`` and the
#: demo keep the library's own defaults (32-µm crops at 0.25 µm/px, as for 40x scans).


def train_cells_config(heads: tuple[str, ...], crop_um: float, crop_px: int, backbone: str = "small") -> CellConfig:
    """The heads' config as ``wsi-apl train cells`` makes it: crops cut at their own pixel size (a
    24-µm crop of 128 px at 0.1875 µm/px, finer than the library's 0.25-µm/px bound)."""
    cfg = CellConfig(backbone=backbone, heads=heads, crop_um=crop_um, crop_px=crop_px)
    cfg.finest_mpp = min(cfg.finest_mpp, cfg.crop_mpp)
    return cfg


def pattern_weights(labels: np.ndarray, balance: float) -> np.ndarray:
    """Draw probabilities (n,) summing to 1: ``count(pattern) ** -balance`` per cell, where a cell's
    pattern is its row of head labels (1, 0 or unlabelled)."""
    if len(labels) == 0:
        return np.zeros(0)
    key = np.nan_to_num(labels, nan=2.0).astype(np.int8)
    _, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    w = counts[inv.reshape(-1)].astype(np.float64) ** -float(balance)
    return w / w.sum()


def head_labels(types: list[str], auer: np.ndarray, heads: tuple[str, ...],
                faggot: np.ndarray | None = None) -> np.ndarray:
    """(n, heads) float labels from the truth; NaN where a head has no label for a cell (faggot_cell
    without faggot flags)."""
    y = np.zeros((len(types), len(heads)), np.float32)
    for j, h in enumerate(heads):
        if h == "auer_rod":
            y[:, j] = auer.astype(np.float32)
        elif h == "faggot_cell":
            y[:, j] = np.nan if faggot is None else faggot.astype(np.float32)
        else:
            y[:, j] = np.array([t == h for t in types], np.float32)
    return y


@dataclass
class CellSet:
    """Cells of some areas: which area, centre (pixels of its image), labels; ``mpp``: the images'
    pixel size (1.0 where pictures have none and ``crop_um`` counts their pixels)."""

    images: list[np.ndarray]
    area_idx: np.ndarray
    centres: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    mpp: float
    sources: np.ndarray | None = None  # (n,) name of the set each cell comes from; None: one set

    def source_names(self) -> np.ndarray:
        """(n,) the set of each cell (``""`` where the cells came from one unnamed set)."""
        return self.sources if self.sources is not None else np.full(len(self), "", dtype=object)

    @classmethod
    def from_samples(cls, samples: list[AreaSample], heads: tuple[str, ...], area_mpp: float) -> "CellSet":
        """The truth cells of areas read at ``area_mpp``; the crops come from each area's
        ``cell_image`` where it has one (all or none of the samples), at its finer pixel size."""
        fine = [s.cell_image is not None for s in samples]
        if any(fine) and not all(fine):
            raise ValueError("some areas were read for finer cell crops and others not")
        scale = 1.0
        images, idx, centres, labels, patients = [], [], [], [], []
        for k, s in enumerate(samples):
            src = s.image if s.cell_image is None else s.cell_image
            images.append(src)
            c, scale = cell_centres(s.boxes, s.image.shape, src.shape)
            if len(c) == 0:
                continue
            centres.append(c)
            idx.append(np.full(len(c), k))
            labels.append(head_labels(s.types, s.auer, heads, s.faggot))
            patients += [s.patient] * len(c)
        mpp = float(area_mpp) / scale
        if not centres:
            return cls(images, np.zeros(0, int), np.zeros((0, 2)), np.zeros((0, len(heads))), np.zeros(0), mpp)
        return cls(images, np.concatenate(idx), np.concatenate(centres).astype(np.float32),
                   np.concatenate(labels), np.asarray(patients), mpp)

    @classmethod
    def join(cls, a: "CellSet", b: "CellSet") -> "CellSet":
        """The cells of both sets (same pixel size, up to the rounding of a resampled read: a slide at
        0.25 µm/px read for 0.1875-µm/px crops comes out at 0.18752, less than a pixel over a crop)."""
        if not a.images or not b.images:  # an empty set (a source with no validation slide) has no pixel size
            return b if not a.images else a
        if abs(a.mpp - b.mpp) > 5e-3 * a.mpp:
            raise ValueError(f"cells at {a.mpp} and {b.mpp} µm/px cannot be joined")
        sources = None
        if a.sources is not None or b.sources is not None:
            sources = np.concatenate([a.source_names().astype(object), b.source_names().astype(object)])
        return cls(a.images + b.images, np.concatenate([a.area_idx, b.area_idx + len(a.images)]),
                   np.concatenate([a.centres, b.centres]), np.concatenate([a.labels, b.labels]),
                   np.concatenate([a.patients.astype(object), b.patients.astype(object)]), a.mpp, sources)

    def __len__(self) -> int:
        return len(self.area_idx)

    def crops(self, cfg: CellConfig, rng: np.random.Generator | None = None, jitter_um: float = 0.0,
              scale_jitter: float = 0.0, indices: np.ndarray | None = None) -> np.ndarray:
        """Crops of ``cfg.crop_um`` around the cells at ``cfg.crop_px``; with ``rng`` their centres
        jittered by ``jitter_um`` and their context by a factor ``exp(N(0, scale_jitter))``."""
        context_px, out_px, jitter_px = cfg.crop_um / self.mpp, cfg.crop_px, jitter_um / self.mpp
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


def _augment_batch(crops: np.ndarray, rng: np.random.Generator, stain_aug: str = DEFAULT_STAIN_AUG) -> np.ndarray:
    """Flips, quarter turns and colour (``stain_aug``, one of :data:`STAIN_AUGMENTS`)."""
    out = np.empty_like(crops)
    for i in range(len(crops)):
        c = crops[i]
        if rng.integers(0, 2):
            c = c[:, ::-1]
        c = np.ascontiguousarray(np.rot90(c, int(rng.integers(0, 4))))
        if stain_aug == "hed":
            c = stain_jitter(hed_jitter(c, rng), rng, 0.5)
        elif stain_aug == "od":
            c = stain_jitter(c, rng, 0.8)
        out[i] = c
    return out


def train_cells(train: CellSet, val: CellSet, cfg: CellConfig, *, epochs: int = 30,
                time_budget_s: float | None = None, batch_size: int = 128, lr: float = 2e-3,
                weight_decay: float = 1e-4, patience: int = 6, seed: int = 0,
                log: Callable[[str], None] = print, device: str = "cpu",
                backbone_weights: Path | None = None,
                balance: float = BALANCE, stain_aug: str = DEFAULT_STAIN_AUG,
                ema: float = 0.0) -> tuple[CellClassifier, dict]:
    """Multi-label training with class balancing; keeps the epoch with the best mean validation AUROC.

    Labels may be NaN (not labelled): the loss ignores them. ``backbone_weights``: start the backbone
    from a file on disk (transfer learning, as in the paper) instead of from scratch.
    ``balance``: each epoch draws its cells with probability proportional to ``count ** -balance`` of
    their label pattern (e.g. myeloblast with Auer rods, promyelocyte without), so a rare combination
    is not learned as a shortcut of a common one (0: every cell once per epoch); the loss weights are
    set for the cells actually drawn. ``stain_aug``: the colour augmentation (:data:`STAIN_AUGMENTS`);
    ``cfg.stain_norm``: crops are stain-normalised to a reference fitted here on the training crops,
    and so wherever the heads run (:func:`workers.classifier.classify`). ``ema``: the decay of an
    exponential moving average of the weights, updated after every step, validated and kept instead
    of the raw weights (0: off); on a few thousand cells it evens out the epoch-to-epoch swings."""
    if stain_aug not in STAIN_AUGMENTS:
        raise ValueError(f"unknown stain augmentation {stain_aug!r}; choose one of {', '.join(STAIN_AUGMENTS)}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if cfg.stain_norm != "none" and not cfg.stain_target and len(train):
        from workers.stain import fit_stain_target

        sample = np.sort(rng.choice(len(train), min(len(train), 256), replace=False))
        cfg.stain_target = fit_stain_target(train.crops(cfg, indices=sample), cfg.stain_norm, seed)
    if cfg.backbone == "xception":
        batch_size = min(batch_size, 16)  # 299x299 inputs: activations of a larger batch do not fit a CPU's memory
    model = CellClassifier(cfg)
    if backbone_weights is not None:
        load_backbone_weights(model, backbone_weights)
    model = model.to(device)
    heads = cfg.heads
    draw = pattern_weights(train.labels, balance)
    pos = np.nansum(train.labels, axis=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    averaged = None
    if ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(ema)), use_buffers=True)
    kept = model if averaged is None else averaged.module  # the weights validated and kept
    val_crops = val.crops(cfg) if len(val) else None
    t0 = time.time()
    budget = Budget(time_budget_s, "cell heads")
    best_score, best_state, best_epoch = -1.0, copy.deepcopy(model.state_dict()), 0
    history = []
    stale = 0
    if len(train) == 0:
        raise ValueError("no labelled cells to train on")
    n = len(train)  # cells per epoch
    run = _EpochRunner(model, opt, averaged, train, cfg, draw, balance, _pos_weight(train.labels, draw, device),
                       rng, batch_size, lr, epochs * math.ceil(n / batch_size), stain_aug, device)
    for epoch in range(epochs):
        losses = run.epoch()
        aucs = _val_aurocs(kept, val, val_crops, heads, device)
        finite = [v for v in aucs.values() if v == v]
        score = float(np.mean(finite)) if finite else float("nan")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "auroc": aucs,
                        "seconds": round(time.time() - t0, 1)})
        log(f"  cells epoch {epoch + 1}: loss {np.mean(losses):.3f}, validation AUROC "
            + ", ".join(f"{h} {v:.3f}" for h, v in aucs.items())
            + f" ({time.time() - t0:.0f} s, {run.step * batch_size / max(1e-6, time.time() - t0):.0f} cells/s)")
        if val_crops is None or (score == score and score > best_score):
            best_score, best_state, best_epoch = score, copy.deepcopy(kept.state_dict()), epoch + 1
            stale = 0
        else:
            stale += 1
        if stale >= patience:
            log(f"  no improvement for {patience} epochs: stopping")
            break
        if epoch + 1 < epochs and budget.stop(epoch + 1, epochs, log):
            break
    model.load_state_dict(best_state)
    model.eval()
    thresholds, best_auc, threshold_source = _thresholds(model, train, val, val_crops, cfg, device)
    cfg.thresholds = thresholds
    return model, {"best_epoch": best_epoch, "val_auroc": best_auc, "history": history,
                   "train_cells": n, "val_cells": len(val), "seconds": round(time.time() - t0, 1),
                   "balance": balance, "stain_aug": stain_aug, "stain_norm": cfg.stain_norm, "threshold_source": threshold_source,
                   "positives": {h: int(pos[j]) for j, h in enumerate(heads)}, "budget": budget.record(epochs)}


def _pos_weight(y: np.ndarray, draw: np.ndarray, device: str) -> torch.Tensor:
    """Per head: negatives over positives among the cells an epoch draws (clipped to 1-30)."""
    w_pos = np.nansum(y * draw[:, None], axis=0)
    w_neg = np.nansum((1 - y) * draw[:, None], axis=0)
    return torch.tensor(np.clip(w_neg / np.maximum(w_pos, 1e-9), 1.0, 30.0), dtype=torch.float32, device=device)


class _EpochRunner:
    """One training epoch at a time: draw the cells, cut and augment their crops, step through the
    batches on a cosine schedule over the planned steps (never the clock), update the average."""

    def __init__(self, model, opt, averaged, train: CellSet, cfg: CellConfig, draw: np.ndarray, balance: float,
                 pos_weight: torch.Tensor, rng: np.random.Generator, batch_size: int, lr: float, steps_total: int,
                 stain_aug: str, device: str):
        self.model, self.opt, self.averaged, self.train, self.cfg = model, opt, averaged, train, cfg
        self.draw, self.balance, self.pos_weight, self.rng = draw, balance, pos_weight, rng
        self.batch_size, self.lr, self.steps_total, self.stain_aug, self.device = batch_size, lr, steps_total, stain_aug, device
        self.step = 0

    def epoch(self) -> list[float]:
        model, cfg, rng, n = self.model, self.cfg, self.rng, len(self.train)
        y = self.train.labels
        model.train()
        seen = rng.choice(n, n, p=self.draw) if self.balance else np.arange(n)
        crops = self.train.crops(cfg, rng, jitter_um=1.5, scale_jitter=0.06, indices=seen)
        if cfg.stain_norm != "none":
            from workers.stain import normalise_crops

            crops = normalise_crops(crops, cfg.stain_norm, cfg.stain_target)
        order = rng.permutation(n)
        losses = []
        for bi in range(0, n, self.batch_size):
            idx = order[bi:bi + self.batch_size]
            x = crops_to_tensor(_augment_batch(crops[idx], rng, self.stain_aug)).to(self.device)
            t = torch.from_numpy(y[seen[idx]]).to(self.device)
            frac = self.step / max(1, self.steps_total)  # the schedule follows the planned steps, never the clock
            for g in self.opt.param_groups:
                g["lr"] = self.lr * max(0.02, 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
            logits = model(x)
            mask = ~torch.isnan(t)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[mask], t[mask], pos_weight=self.pos_weight.expand_as(logits)[mask])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            if self.averaged is not None:
                self.averaged.update_parameters(model)
            losses.append(float(loss.detach()))
            self.step += 1
        return losses


def _val_aurocs(model, val: CellSet, val_crops, heads, device: str) -> dict[str, float]:
    if val_crops is None:
        return {}
    p = classify(model, val_crops, device)
    aucs = {}
    for j, h in enumerate(heads):
        ok = ~np.isnan(val.labels[:, j])
        aucs[h] = auroc(val.labels[ok, j], p[ok, j])
    return aucs


def _thresholds(model, train: CellSet, val: CellSet, val_crops, cfg: CellConfig,
                device: str) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Per head: the threshold at which the predicted prevalence on validation equals the true one
    (unbiased ratios; a head without positives among the validation cells takes it from the training
    cells), the validation AUROC, and where the threshold came from."""
    heads = cfg.heads
    thresholds, best_auc, threshold_source = {}, {}, {}
    p_val = classify(model, val_crops, device) if val_crops is not None else np.zeros((0, len(heads)))
    p_train = None
    for j, h in enumerate(heads):
        labels, p = val.labels[:, j] if len(val) else np.zeros(0), p_val[:, j]
        ok = ~np.isnan(labels)
        best_auc[h] = auroc(labels[ok], p[ok]) if ok.any() else float("nan")
        threshold_source[h] = "validation"
        if not (ok.any() and 0 < float(np.mean(labels[ok])) < 1):
            if p_train is None:
                p_train = classify(model, train.crops(cfg), device)
            labels, p = train.labels[:, j], p_train[:, j]
            ok = ~np.isnan(labels)
            threshold_source[h] = "training (no positive validation cell)"
        prev = float(np.mean(labels[ok])) if ok.any() else 0.0
        thresholds[h] = float(np.quantile(p[ok], 1.0 - prev)) if ok.any() and 0 < prev < 1 else 0.5
        thresholds[h] = float(np.clip(thresholds[h], 0.05, 0.95))
    return thresholds, (best_auc if val_crops is not None else {}), threshold_source


def subset(cells: CellSet, mask: np.ndarray) -> CellSet:
    """The cells where ``mask`` is true (pictures shared, not copied)."""
    return CellSet(cells.images, cells.area_idx[mask], cells.centres[mask], cells.labels[mask], cells.patients[mask],
                   cells.mpp, None if cells.sources is None else cells.sources[mask])


def split_cells(cells: CellSet, seed: int = 0, source: object = "the cells") -> tuple[CellSet, CellSet]:
    """(training, validation) cells with no patient in both: one of five patient folds (two with
    fewer than five patients) is the validation set."""
    n_pat = len(np.unique(cells.patients))
    if n_pat < 2:
        raise ValueError(f"{source}: the cells come from one picture/patient; a validation split needs two "
                         "(add a 'patient' column or more pictures)")
    mask = np.zeros(len(cells), bool)
    mask[patient_folds(cells.patients, 5 if n_pat >= 5 else 2, seed)[0]] = True
    return subset(cells, ~mask), subset(cells, mask)


def patient_folds(patients: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` folds of cell indices, no patient in two folds (scikit-learn's GroupKFold, shuffled)."""
    from .splits import group_folds

    return group_folds(patients, k, None, seed)


def cross_validate(cells: CellSet, cfg: CellConfig, *, folds: int = 3, epochs: int = 30,
                   time_budget_s: float | None = None, seed: int = 0, log: Callable[[str], None] = print,
                   **kw) -> dict:
    """Patient-grouped ``folds``-fold cross-validation: out-of-fold AUROC per head (and per fold)."""
    k = int(min(folds, len(np.unique(cells.patients))))
    if k < 2:
        raise ValueError("cross-validation needs cells of at least two patients")
    oof = np.full(cells.labels.shape, np.nan, np.float32)
    per_fold = []
    for f, test in enumerate(patient_folds(cells.patients, k, seed)):
        train_mask = np.ones(len(cells), bool)
        train_mask[test] = False
        tr, te = subset(cells, train_mask), subset(cells, ~train_mask)
        fcfg = copy.deepcopy(cfg)
        budget = time_budget_s / (k + 1) if time_budget_s else None
        model, info = train_cells(tr, te, fcfg, epochs=epochs, time_budget_s=budget, seed=seed + f,
                                  log=lambda s: None, **kw)
        oof[test] = classify(model, te.crops(fcfg), "cpu")
        per_fold.append(info["val_auroc"])
        log(f"  fold {f + 1}/{k}: " + ", ".join(f"{h} {v:.3f}" for h, v in info["val_auroc"].items()))
    out = {"folds": k, "per_fold": per_fold, "oof_auroc": {}}
    for j, h in enumerate(cfg.heads):
        ok = ~np.isnan(cells.labels[:, j])
        out["oof_auroc"][h] = auroc(cells.labels[ok, j], oof[ok, j]) if ok.any() else float("nan")
    return out


def search_heads(train: CellSet, val: CellSet, cfg: CellConfig, *, trials: int,
                 epochs: int = 30, time_budget_s: float | None = None, seed: int = 0,
                 log: Callable[[str], None] = print, **kw) -> tuple[CellClassifier, dict, CellConfig]:
    """Optuna search of head depth (1-3 layers, as in the paper), dropout and learning rate, scored by
    the mean validation AUROC; returns the best trial's model, info and config."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best: dict = {}
    budget = time_budget_s / trials if time_budget_s else None

    def objective(trial) -> float:
        c = copy.deepcopy(cfg)
        c.head_layers = trial.suggest_int("head_layers", 0, 2)  # hidden layers: 1-3 fully connected in all
        c.dropout = trial.suggest_float("dropout", 0.0, 0.6)
        lr = trial.suggest_float("lr", 3e-4, 1e-2, log=True)
        model, info = train_cells(train, val, c, epochs=epochs, time_budget_s=budget, lr=lr,
                                  seed=seed + trial.number, log=lambda s: None, **kw)
        score = float(np.nanmean(list(info["val_auroc"].values())))
        log(f"  trial {trial.number + 1}/{trials}: {c.head_layers + 1} FC layer(s), dropout {c.dropout:.2f}, "
            f"lr {lr:.4f}: mean validation AUROC {score:.3f}")
        if not best or score > best["score"]:
            best.update(score=score, model=model, info=info, cfg=c, params=dict(trial.params))
        return score

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({"head_layers": cfg.head_layers, "dropout": cfg.dropout, "lr": 2e-3})
    study.optimize(objective, n_trials=trials)
    info = dict(best["info"])
    info["search"] = {"best": best["params"], "trials": trials, "best_mean_auroc": best["score"]}
    return best["model"], info, best["cfg"]


def load_backbone_weights(model: CellClassifier, path: Path) -> str:
    """Start the backbone from weights the site has on disk (safetensors or a torch state dict; keys as
    in our backbone, with or without a ``backbone.`` prefix, e.g. the cells part of another bundle or
    an imported Keras Xception). Returns a note for the bundle's provenance."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    own = model.state_dict()
    mapped = {}
    for k, v in state.items():
        for cand in (k, f"backbone.{k}", k.removeprefix("module.")):
            if cand in own and cand.startswith("backbone") and own[cand].shape == v.shape:
                mapped[cand] = v
                break
    n_bb = sum(1 for k in own if k.startswith("backbone"))
    if not mapped or len(mapped) < 0.9 * n_bb:
        raise ValueError(f"{path}: only {len(mapped)} of the {n_bb} backbone tensors match this backbone "
                         f"({model.cfg.backbone}); give weights of the same architecture")
    model.load_state_dict(mapped, strict=False)
    return f"{path.name} ({len(mapped)} backbone tensors)"
