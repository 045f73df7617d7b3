"""Train the cell detector (Faster R-CNN) on area samples; early stopping on validation AP@0.5."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from workers.detector import DetectorConfig, build_detector, detect, to_tensor

from ..metrics import coco_metrics
from .augment import flip_rot, stain_jitter
from .data import AreaSample


def _random_crop(img: np.ndarray, boxes: np.ndarray, size: int, rng: np.random.Generator):
    h, w = img.shape[:2]
    cw, ch = min(size, w), min(size, h)
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    crop = img[y0:y0 + ch, x0:x0 + cw]
    if len(boxes) == 0:
        return crop, boxes
    b = boxes - np.array([x0, y0, x0, y0], np.float32)
    full = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    c = np.stack([np.clip(b[:, 0], 0, cw), np.clip(b[:, 1], 0, ch), np.clip(b[:, 2], 0, cw),
                  np.clip(b[:, 3], 0, ch)], axis=1)
    vis = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    keep = vis >= 0.5 * np.maximum(full, 1e-6)
    return crop, c[keep]


def evaluate_detector(model, cfg: DetectorConfig, samples: list[AreaSample], device="cpu") -> dict:
    """COCO AP/AR of ``model`` on ``samples`` (all detections down to score 0.05)."""
    images = []
    for s in samples:
        boxes, scores, _ = detect(model, s.image, cfg, device, score_threshold=0.05)
        images.append((boxes, scores, s.boxes))
    return coco_metrics(images)


def best_score_threshold(model, cfg: DetectorConfig, samples: list[AreaSample], device="cpu") -> float:
    """The detection score threshold with the best F1 (IoU 0.5) on ``samples``."""
    from ..metrics import match_detections

    all_scores, all_tp, n_gt = [], [], 0
    for s in samples:
        boxes, scores, _ = detect(model, s.image, cfg, device, score_threshold=0.05)
        tp = match_detections(boxes, scores, s.boxes, 0.5)
        all_scores.append(scores)
        all_tp.append(tp)
        n_gt += len(s.boxes)
    if n_gt == 0 or not all_scores:
        return cfg.score_threshold
    sc = np.concatenate(all_scores)
    tp = np.concatenate(all_tp)
    best_t, best_f1 = cfg.score_threshold, -1.0
    for t in np.linspace(0.1, 0.9, 33):
        sel = sc >= t
        ntp = int(tp[sel].sum())
        prec = ntp / max(1, int(sel.sum()))
        rec = ntp / n_gt
        f1 = 2 * prec * rec / max(1e-9, prec + rec)
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    return best_t


def train_detector(train: list[AreaSample], val: list[AreaSample], cfg: DetectorConfig, *,
                   epochs: int = 50, time_budget_s: float | None = None, batch_size: int = 2,
                   crop: int = 384, lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 1e-4,
                   patience: int = 8, seed: int = 0, init_state: dict | None = None,
                   log: Callable[[str], None] = print, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Train from scratch (or ``init_state``); keep the checkpoint with the best validation AP@0.5.

    Stops at ``epochs``, at ``time_budget_s`` seconds, or after ``patience`` epochs without
    improvement. Returns (model with the best weights, history/metrics).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_detector(cfg).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    usable = [s for s in train if len(s.boxes) > 0] or train
    if not usable:
        raise ValueError("no training areas with cells")
    steps_per_epoch = max(1, math.ceil(len(usable) / batch_size))
    total_steps = epochs * steps_per_epoch
    warmup = min(100, total_steps // 5 + 1)
    t0 = time.time()
    best = {"AP50": -1.0, "epoch": -1}
    best_state = copy.deepcopy(model.state_dict())
    history = []
    step = 0
    stale = 0
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(usable))
        losses = []
        for bi in range(0, len(order), batch_size):
            imgs, targets = [], []
            for k in order[bi:bi + batch_size]:
                s = usable[k]
                img, boxes = _random_crop(s.image, s.boxes, crop, rng)
                img, boxes = flip_rot(img, boxes, int(rng.integers(0, 4)), bool(rng.integers(0, 2)))
                img = stain_jitter(img, rng)
                imgs.append(to_tensor(img).to(device))
                targets.append({"boxes": torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)).to(device),
                                "labels": torch.ones(len(boxes), dtype=torch.int64, device=device)})
            # learning rate: linear warm-up, then cosine over the planned steps (or the time budget)
            frac = step / max(1, total_steps)
            if time_budget_s:
                frac = max(frac, (time.time() - t0) / time_budget_s)
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            for g in opt.param_groups:
                g["lr"] = lr * max(scale, 0.02)
            loss_dict = model(imgs, targets)
            loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                log(f"  epoch {epoch + 1}: loss is not finite, skipping the batch")
                opt.zero_grad()
                continue
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if time_budget_s and time.time() - t0 > time_budget_s:
                break
        model.eval()
        metrics = evaluate_detector(model, cfg, val, device) if val else {"AP50": float("nan")}
        elapsed = time.time() - t0
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                        "AP50": metrics.get("AP50"), "AP": metrics.get("AP"), "seconds": round(elapsed, 1)})
        log(f"  detector epoch {epoch + 1}: loss {history[-1]['loss']:.3f}, validation AP@0.5 "
            f"{metrics.get('AP50', float('nan')):.3f}, AP {metrics.get('AP', float('nan')):.3f} ({elapsed:.0f} s, "
            f"{step * batch_size / max(elapsed, 1e-6):.1f} areas/s)")
        ap = metrics.get("AP50", float("nan"))
        if not val or (ap == ap and ap > best["AP50"]):
            best = {"AP50": ap, "AP": metrics.get("AP"), "AR50": metrics.get("AR50"), "epoch": epoch + 1}
            best_state = copy.deepcopy(model.state_dict())
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
    return model, {"best": best, "history": history, "steps": step, "seconds": round(time.time() - t0, 1),
                   "train_areas": len(usable), "val_areas": len(val)}
