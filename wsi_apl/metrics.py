"""Honest metrics: AUROC / AUPRC with bootstrap confidence intervals, detection AP (COCO style)."""

from __future__ import annotations

import numpy as np


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn; ties count half); NaN if one class is missing."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(s, np.float64)))


def auprc(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision (scikit-learn: tied scores form one step, so the order of the input does
    not matter); NaN without positives."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(y).astype(bool)
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, np.asarray(s, np.float64)))


def bootstrap_ci(fn, y: np.ndarray, s: np.ndarray, n: int = 1000, seed: int = 0, groups: np.ndarray | None = None,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of ``fn(y, s)``; resamples ``groups`` (e.g. patients) when given."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    s = np.asarray(s)
    vals = []
    if groups is None:
        idx_all = np.arange(len(y))
        for _ in range(n):
            idx = rng.choice(idx_all, len(idx_all), replace=True)
            v = fn(y[idx], s[idx])
            if np.isfinite(v):
                vals.append(v)
    else:
        groups = np.asarray(groups)
        uniq = np.unique(groups)
        members = {g: np.flatnonzero(groups == g) for g in uniq}
        for _ in range(n):
            pick = rng.choice(uniq, len(uniq), replace=True)
            idx = np.concatenate([members[g] for g in pick])
            v = fn(y[idx], s[idx])
            if np.isfinite(v):
                vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    return float(np.percentile(vals, 100 * alpha / 2)), float(np.percentile(vals, 100 * (1 - alpha / 2)))


def sens_spec(y: np.ndarray, s: np.ndarray, threshold: float) -> tuple[float, float]:
    y = np.asarray(y).astype(bool)
    pred = np.asarray(s) >= threshold
    sens = float(pred[y].mean()) if y.any() else float("nan")
    spec = float((~pred[~y]).mean()) if (~y).any() else float("nan")
    return sens, spec


def threshold_for_sensitivity(y: np.ndarray, s: np.ndarray, target: float) -> float:
    """A threshold on probabilities ``s`` whose sensitivity for positives ``y`` reaches ``target``.

    The lower of two estimates: the empirical one (the highest threshold that keeps ``target`` of
    the positives on this data) and a smoothed one (a normal fitted to the positives' logits, its
    ``1 - target`` quantile). With few positives the empirical quantile sits on the single lowest
    positive; the smoothed estimate keeps the threshold from hugging it.
    """
    from statistics import NormalDist

    y = np.asarray(y).astype(bool)
    pos = np.sort(np.asarray(s, np.float64)[y])
    if len(pos) == 0:
        return 0.5
    k = int(np.floor((1.0 - target) * len(pos) + 1e-9))  # positives allowed below the threshold
    k = min(max(k, 0), len(pos) - 1)
    empirical = float(pos[k])
    z = np.log(np.clip(pos, 1e-6, 1 - 1e-6) / (1 - np.clip(pos, 1e-6, 1 - 1e-6)))
    sd = max(float(z.std(ddof=1)) if len(z) > 1 else 0.0, 1.0)
    smoothed = float(1.0 / (1.0 + np.exp(-(z.mean() + NormalDist().inv_cdf(1.0 - target) * sd))))
    return min(empirical, smoothed)


def binary_summary(y: np.ndarray, s: np.ndarray, threshold: float | None = None, groups=None,
                   n_boot: int = 1000) -> dict:
    """AUROC and AUPRC with 95 % CIs; sensitivity, specificity and the confusion counts at ``threshold``
    if given."""
    out = {"n": int(len(y)), "positives": int(np.sum(y)),
           "auroc": auroc(y, s), "auroc_ci": list(bootstrap_ci(auroc, y, s, n_boot, groups=groups)),
           "auprc": auprc(y, s), "auprc_ci": list(bootstrap_ci(auprc, y, s, n_boot, groups=groups))}
    if threshold is not None:
        sens, spec = sens_spec(y, s, threshold)
        yb, pred = np.asarray(y).astype(bool), np.asarray(s) >= threshold
        out.update(threshold=float(threshold), sensitivity=sens, specificity=spec,
                   confusion={"tp": int((pred & yb).sum()), "fp": int((pred & ~yb).sum()),
                              "tn": int((~pred & ~yb).sum()), "fn": int((~pred & yb).sum())})
    return out


# -- detection --------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of boxes x0, y0, x1, y1."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float64)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_indices(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Greedy matching by score: for each prediction the index of the ground-truth box it matches
    (IoU >= ``iou``, each truth box matched once), or -1."""
    order = np.argsort(-scores)
    ious = box_iou(pred[order], gt)
    used = np.zeros(len(gt), bool)
    out = np.full(len(pred), -1, np.int64)
    for k, i in enumerate(order):
        if len(gt) == 0:
            break
        cand = np.where(used, -1.0, ious[k])
        j = int(np.argmax(cand))
        if cand[j] >= iou:
            used[j] = True
            out[i] = j
    return out


def match_detections(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Greedy matching by score: True for predictions that match an unmatched ground-truth box."""
    return match_indices(pred, scores, gt, iou) >= 0


def roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every threshold, from (0, 0) to (1, 1)
    (scikit-learn's ``roc_curve``: tied scores make one point, whatever their order)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():  # one class: no curve to draw
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    fpr, tpr, _ = roc_curve(y, np.asarray(s, np.float64), drop_intermediate=False)
    return fpr, tpr


def pr_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every threshold, highest threshold first (scikit-learn's
    ``precision_recall_curve``, without its closing point at recall 0)."""
    from sklearn.metrics import precision_recall_curve

    y = np.asarray(y).astype(bool)
    if not y.any():
        return np.array([0.0]), np.array([0.0])
    prec, rec, _ = precision_recall_curve(y, np.asarray(s, np.float64), drop_intermediate=False)
    return rec[-2::-1], prec[-2::-1]


def coco_metrics(images: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """COCO AP / AR (pycocotools) for one class over images of (pred_boxes, pred_scores, gt_boxes).

    Keys: ``AP`` (IoU .50:.95), ``AP50``, ``AP75``, ``AR`` (.50:.95), ``AR50``,
    ``images``. Every detection of an image counts (at least 1000, more where an image has more
    detections or cells), not COCO's default 100.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cell"}]}
    dets = []
    aid = 1
    for i, (pb, ps, gb) in enumerate(images):
        gt["images"].append({"id": i + 1, "width": 10000, "height": 10000})
        for b in gb:
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            gt["annotations"].append({"id": aid, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                      "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h})
            aid += 1
        for b, s in zip(pb, ps):
            dets.append({"image_id": i + 1, "category_id": 1, "score": float(s),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    if not gt["annotations"]:
        return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan"), "AR": float("nan"),
                "AR50": float("nan"), "images": len(images)}
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets) if dets else COCO()
        if not dets:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR": 0.0, "AR50": 0.0, "images": len(images)}
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        # COCO's caps (100 per image) would cut a dense area short: the last one fits the densest image
        most = max([1000] + [len(pb) for pb, _, _ in images] + [len(gb) for _, _, gb in images])
        ev.params.maxDets = [100, 300, most]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"]  # [T, R, K, A, M]
    r = ev.eval["recall"]     # [T, K, A, M]

    def _mean(x):
        x = x[x > -1]
        return float(x.mean()) if x.size else float("nan")

    return {"AP": _mean(p[:, :, 0, 0, -1]), "AP50": _mean(p[0, :, 0, 0, -1]), "AP75": _mean(p[5, :, 0, 0, -1]),
            "AR": _mean(r[:, 0, 0, -1]), "AR50": _mean(r[0, 0, 0, -1]), "images": len(images)}
