"""Train the cell detector (Faster R-CNN) on area samples; early stopping on validation AP@0.5."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from workers.detector import DetectorConfig, build_detector, detect, to_tensor

from ..metrics import coco_metrics
from .augment import flip_rot, scale_jitter, stain_jitter
from .budget import Budget
from .data import AreaSample, median_box_size

SCHEDULES = ("cosine", "step", "constant")


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
                   crop: int | None = None, lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 1e-4,
                   schedule: str = "cosine", patience: int = 8, seed: int = 0, init_state: dict | None = None,
                   backbone_state: dict | None = None, log: Callable[[str], None] = print,
                   device: str = "cpu", trial=None) -> tuple[torch.nn.Module, dict]:
    """Train from scratch, from ``backbone_state`` (pretrained weights) or ``init_state`` (an earlier
    detector); keep the checkpoint with the best validation AP@0.5.

    A checkpoint is better when its validation AP@0.5 is higher, or equal with a higher AP@0.5:0.95
    (small validation sets saturate AP@0.5). Augmentation: random crops, scale jitter, flips and quarter turns, stain/colour/brightness jitter.
    ``schedule``: ``cosine`` (warm-up then cosine decay), ``step`` (x0.1 at 2/3 of the run) or
    ``constant``, over the planned steps. Stops at ``epochs`` or after ``patience`` epochs without
    improvement; ``time_budget_s`` is only an upper bound, checked between epochs (see :mod:`.budget`).
    ``trial``: an Optuna trial, told each epoch's AP@0.5 and able to prune.
    Returns (model with the best weights, history/metrics).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_detector(cfg).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    elif backbone_state is not None:
        model.load_state_dict(backbone_state, strict=False)
    if crop is None:
        crop = int(max(384, 4 * median_box_size(train, 20.0)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    usable = [s for s in train if len(s.boxes) > 0] or train
    if not usable:
        raise ValueError("no training areas with cells")
    steps_per_epoch = max(1, math.ceil(len(usable) / batch_size))
    total_steps = epochs * steps_per_epoch
    warmup = min(100, total_steps // 5 + 1)
    t0 = time.time()
    budget = Budget(time_budget_s, "detector")
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
            imgs, targets = _augmented_batch([usable[k] for k in order[bi:bi + batch_size]], crop, rng, device)
            for g in opt.param_groups:
                g["lr"] = lr * max(_lr_scale(step, total_steps, warmup, schedule), 0.02)
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
        model.eval()
        metrics = evaluate_detector(model, cfg, val, device) if val else {"AP50": float("nan")}
        elapsed = time.time() - t0
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                        "AP50": metrics.get("AP50"), "AP": metrics.get("AP"), "seconds": round(elapsed, 1)})
        log(f"  detector epoch {epoch + 1}: loss {history[-1]['loss']:.3f}, validation AP@0.5 "
            f"{metrics.get('AP50', float('nan')):.3f}, AP {metrics.get('AP', float('nan')):.3f} ({elapsed:.0f} s, "
            f"{step * batch_size / max(elapsed, 1e-6):.1f} areas/s)")
        ap = metrics.get("AP50", float("nan"))
        if trial is not None and ap == ap:
            _report_trial(trial, ap, epoch)
        ap_all = metrics.get("AP", float("nan"))
        key = (ap, ap_all if ap_all == ap_all else -1.0)
        if not val or (ap == ap and key > (best["AP50"], best.get("AP") if best.get("AP") is not None else -1.0)):
            best = {"AP50": ap, "AP": metrics.get("AP"), "AR50": metrics.get("AR50"), "epoch": epoch + 1}
            best_state = copy.deepcopy(model.state_dict())
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
    return model, {"best": best, "history": history, "steps": step, "seconds": round(time.time() - t0, 1),
                   "train_areas": len(usable), "val_areas": len(val), "budget": budget.record(epochs)}


def _augmented_batch(samples: list[AreaSample], crop: int, rng: np.random.Generator,
                     device: str) -> tuple[list[torch.Tensor], list[dict]]:
    """Training images and targets of one batch: scale jitter (half the time), a random crop, one of
    the eight flips and quarter turns, stain jitter."""
    imgs, targets = [], []
    for s in samples:
        img, boxes = s.image, s.boxes
        if rng.random() < 0.5:
            img, boxes = scale_jitter(img, boxes, rng)
        img, boxes = _random_crop(img, boxes, crop, rng)
        img, boxes = flip_rot(img, boxes, int(rng.integers(0, 4)), bool(rng.integers(0, 2)))
        img = stain_jitter(img, rng)
        imgs.append(to_tensor(img).to(device))
        targets.append({"boxes": torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)).to(device),
                        "labels": torch.ones(len(boxes), dtype=torch.int64, device=device)})
    return imgs, targets


def _lr_scale(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then the schedule over the planned steps (never the clock)."""
    frac = min(1.0, step / max(1, total_steps))
    if schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * frac))
    elif schedule == "step":
        decay = 1.0 if frac < 2.0 / 3.0 else 0.1
    else:
        decay = 1.0
    return min(1.0, (step + 1) / warmup) * decay


def _report_trial(trial, ap: float, epoch: int) -> None:
    """Tell an Optuna trial the epoch's AP@0.5; it may prune the run."""
    import optuna

    trial.report(ap, epoch)
    if trial.should_prune():
        raise optuna.TrialPruned()


# -- starting weights ------------------------------------------------------------------------------

#: File name patterns of torchvision's weights in a torch hub cache, best first, per backbone.
HUB_PATTERNS = {
    "mobilenet_v3": ("fasterrcnn_mobilenet_v3_large_fpn-*.pth", "mobilenet_v3_large-*.pth"),
    "resnet50_fpn_v2": ("fasterrcnn_resnet50_fpn_v2_coco-*.pth", "resnet50-*.pth"),
}


def find_hub_weights(backbone: str) -> Path | None:
    """Weights for ``backbone`` already in the torch hub cache (``$TORCH_HOME/hub/checkpoints``), if any."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for pattern in HUB_PATTERNS.get(backbone, ()):
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"{path}: not a PyTorch or safetensors weight file ({exc}); pass torchvision's "
                         "ImageNet or COCO weights (.pth / .safetensors)") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


def backbone_state_from_file(cfg: DetectorConfig, path: str | Path) -> tuple[dict, str]:
    """Tensors of a weight file that fit this detector, by name and shape.

    Accepts torchvision ImageNet classification weights (``features.*`` of MobileNetV3-Large,
    ``conv1/layer*`` of ResNet-50: mapped onto the backbone body) and Faster R-CNN checkpoints
    (COCO: backbone, FPN, RPN and box head; the 91-class predictor does not fit and is skipped).
    Returns (state dict to load non-strictly, a description for the bundle's provenance).
    """
    path = Path(path)
    src = _read_state(path)
    target = build_detector(cfg).state_dict()
    out = {}
    for k, v in src.items():
        for name in (k, f"backbone.body.{k[len('features.'):]}" if k.startswith("features.") else None,
                     f"backbone.body.{k}", k[len("module."):] if k.startswith("module.") else None):
            if name and name in target and target[name].shape == v.shape:
                out[name] = v
                break
    if not out:
        raise ValueError(f"{path}: no tensor fits the {cfg.backbone} detector (expected torchvision weights for "
                         f"{'MobileNetV3-Large' if cfg.backbone == 'mobilenet_v3' else 'ResNet-50'} "
                         "or a Faster R-CNN checkpoint of the same backbone)")
    body = sum(1 for k in out if k.startswith("backbone.body."))
    return out, f"{path.name}: {len(out)} of {len(target)} tensors ({body} in the backbone body)"


# -- hyper-parameter search ------------------------------------------------------------------------


def search_detector(train: list[AreaSample], val: list[AreaSample], cfg: DetectorConfig, *, trials: int,
                    epochs: int, time_budget_s: float | None, seed: int = 0, log: Callable[[str], None] = print,
                    **kw) -> tuple[torch.nn.Module, dict]:
    """Optuna search over learning rate, momentum, weight decay and schedule (validation AP@0.5).

    Each trial trains with a share of the time budget; the best trial's model is returned, with the
    trials in ``info["search"]``. Unpromising trials are pruned by the median rule.
    """
    import optuna

    if not val:
        raise ValueError("a hyper-parameter search needs validation images (more than one patient/group)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    per_trial = time_budget_s / trials if time_budget_s else None
    best: dict = {"ap": -1.0}

    def objective(trial: optuna.Trial) -> float:
        params = {"lr": trial.suggest_float("lr", 0.002, 0.05, log=True),
                  "momentum": trial.suggest_float("momentum", 0.8, 0.95),
                  "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-3, log=True),
                  "schedule": trial.suggest_categorical("schedule", list(SCHEDULES))}
        log(f"  trial {trial.number + 1}/{trials}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                                                 f"{k} {v}" for k, v in params.items()))
        model, info = train_detector(train, val, cfg, epochs=epochs, time_budget_s=per_trial, seed=seed + trial.number,
                                     log=log, trial=trial, **params, **kw)
        ap = float(info["best"]["AP50"])
        if ap > best["ap"]:
            best.update(ap=ap, model=model, info=info, params=params)
        return ap

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2))
    study.optimize(objective, n_trials=trials)
    if "model" not in best:
        raise RuntimeError("every search trial was pruned or failed; run without --trials")
    info = dict(best["info"])
    info["params"] = best["params"]
    info["search"] = [{"number": t.number, "state": t.state.name, "AP50": t.value, **t.params} for t in study.trials]
    log(f"  best trial: AP@0.5 {best['ap']:.3f} with " + ", ".join(f"{k} {v}" for k, v in best["params"].items()))
    return best["model"], info
