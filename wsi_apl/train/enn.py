"""Train the two slide-level nets with patient-grouped cross-validation and calibrated thresholds."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ..enn import DEFAULT_BLAST_CUTOFF, TASKS, SlideNet, flags, suspicion
from ..metrics import auprc, auroc, binary_summary, threshold_for_sensitivity


def fit_net(X: np.ndarray, y: np.ndarray, hidden: int = 0, epochs: int = 600, lr: float = 0.05,
            weight_decay: float = 1e-3, seed: int = 0) -> SlideNet:
    """Full-batch Adam on class-balanced BCE; X is already standardised."""
    torch.manual_seed(seed)
    net = SlideNet(X.shape[1], hidden)
    x = torch.as_tensor(X, dtype=torch.float32)
    t = torch.as_tensor(y, dtype=torch.float32)
    pos = max(1.0, float(t.sum()))
    neg = max(1.0, float(len(t) - t.sum()))
    w = torch.where(t > 0.5, torch.tensor(len(t) / (2 * pos)), torch.tensor(len(t) / (2 * neg)))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), t, weight=w)
        loss.backward()
        opt.step()
    net.eval()
    return net


def _logits(net: SlideNet, X: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.as_tensor(X, dtype=torch.float32)).numpy().astype(np.float64)


def platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Calibration ``sigmoid(a z + b)`` fitted on out-of-fold logits (slightly regularised)."""
    if len(np.unique(y)) < 2:
        return 1.0, 0.0
    a = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(0.0, requires_grad=True)
    zt = torch.as_tensor(z, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.LBFGS([a, b], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a * zt + b, yt) + 1e-3 * (a - 1) ** 2
        loss.backward()
        return loss

    opt.step(closure)
    return float(a.detach()), float(b.detach())


def grouped_folds(diagnoses: np.ndarray, patients: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """Folds of slide indices: patients kept together, each diagnosis spread over the folds
    (scikit-learn's StratifiedGroupKFold)."""
    from .splits import group_folds

    return group_folds(patients, k, diagnoses, seed)


DEFAULT_PARAMS = {"hidden": 0, "lr": 0.05, "weight_decay": 1e-3, "epochs": 600}


def _fit(Z: np.ndarray, y: np.ndarray, params: dict, seed: int) -> SlideNet:
    return fit_net(Z, y, int(params["hidden"]), epochs=int(params["epochs"]), lr=float(params["lr"]),
                   weight_decay=float(params["weight_decay"]), seed=seed)


def search_params(Z: np.ndarray, y: np.ndarray, groups: np.ndarray, trials: int, seed: int = 0) -> dict:
    """Optuna search of one net's depth, learning rate, weight decay and epochs, scored by the AUROC of
    patient-grouped inner cross-validation on the slides given (the training folds only)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    k = int(min(3, len(set(groups[y > 0.5])), len(set(groups[y < 0.5]))))
    if k < 2 or trials < 1:
        return dict(DEFAULT_PARAMS)
    folds = grouped_folds(np.where(y > 0.5, "pos", "neg"), groups, k, seed)

    def objective(trial) -> float:
        params = {"hidden": trial.suggest_categorical("hidden", [0, 4, 16]),
                  "lr": trial.suggest_float("lr", 3e-3, 0.2, log=True),
                  "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True),
                  "epochs": trial.suggest_int("epochs", 100, 700, step=100)}
        z = np.full(len(y), np.nan)
        for f, test in enumerate(folds):
            train = np.setdiff1d(np.arange(len(y)), test)
            if len(np.unique(y[train])) < 2:
                continue
            z[test] = _logits(_fit(Z[train], y[train], params, seed + f), Z[test])
        ok = np.isfinite(z)
        return auroc(y[ok] > 0.5, z[ok]) if len(np.unique(y[ok])) == 2 else 0.5

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial(dict(DEFAULT_PARAMS))  # the paper's net is always among the candidates
    study.optimize(objective, n_trials=trials)
    return {**DEFAULT_PARAMS, **study.best_params, "inner_auroc": float(study.best_value)}


class SlideNetsFit(NamedTuple):
    """What :func:`train_enn` gives the bundle's slide_nets part."""

    tensors: dict      # both nets' weights, "<task>.<name>"
    config: dict       # features, standardisation, hidden sizes, calibration
    decision: dict     # thresholds and the flag rule
    metrics: dict      # out-of-fold figures, the reference for drift checks


def train_enn(X: np.ndarray, diagnoses: list[str], patients: list[str], names: list[str], *,
              target_sensitivity: float = 0.95, min_cells: int = 200, hidden: int = 0, seed: int = 0,
              trials: int = 0, blasts: np.ndarray | None = None, blast_cutoff: float = DEFAULT_BLAST_CUTOFF,
              log: Callable[[str], None] = print) -> SlideNetsFit:
    """Fit both nets for the bundle's slide_nets part (:class:`SlideNetsFit`).

    Patient-grouped stratified cross-validation gives out-of-fold predictions, on which the
    calibration and the thresholds are chosen. With ``trials``, an Optuna search runs inside each
    training fold (never seeing that fold's test slides) and once more on all slides for the final nets.

    ``blasts`` (per slide, % of counted cells at the myeloblast or promyelocyte threshold): APL slides
    that the APL-vs-AML net takes for AML out of fold (p < 0.5) and whose blasts reach ``blast_cutoff``
    are sent to an expert by the blast rule (inconclusive) whatever the threshold; the flag threshold
    is chosen for the target sensitivity on the other APL slides, so that a few AML-like APL slides
    (the microgranular variant, to cell models that cannot see it) do not drag it down to where most
    healthy marrows would be flagged.
    """
    dx = np.asarray(diagnoses)
    pats = np.asarray(patients)
    X = np.asarray(X, np.float64)
    ok = np.all(np.isfinite(X), axis=1)
    if not ok.all():
        log(f"  {int((~ok).sum())} slide(s) without features (no cells) left out of training")
    X, dx, pats = X[ok], dx[ok], pats[ok]
    blasts = np.asarray(blasts, np.float64)[ok] if blasts is not None else np.zeros(len(X))
    is_apl = dx == "apl"
    n_apl_pat = len(set(pats[is_apl]))
    n_neg_pat = min(len(set(pats[np.isin(dx, neg)])) for _, neg in TASKS.values())
    k = int(min(3, n_apl_pat, n_neg_pat))
    if k < 2:
        raise ValueError(f"too few patients to train the slide-level nets ({n_apl_pat} APL; need at least 2 "
                         "APL patients and 2 of each comparison group)")
    if k < 3:
        log(f"  only {k} folds: a class has fewer than three patients")
    mean = X.mean(axis=0)
    std = np.where(X.std(axis=0) > 1e-9, X.std(axis=0), 1.0)
    Z = (X - mean) / std
    base = {**DEFAULT_PARAMS, "hidden": hidden}
    oof, fold_params = _out_of_fold(Z, dx, pats, grouped_folds(dx, pats, k, seed), trials, seed, base)
    metrics = {"folds": k, "slides": int(len(X)), "apl_slides": int(is_apl.sum()),
               "apl_patients": n_apl_pat, "trials": trials}
    calibration, oof_prob = _calibrate(oof, dx, fold_params, metrics, log)
    net_thresholds = {}
    s = suspicion({t: np.nan_to_num(oof_prob[t], nan=0.0) for t in TASKS})
    caught = is_apl & (np.nan_to_num(oof_prob["apl_vs_aml"], nan=0.0) < 0.5) & (blasts >= blast_cutoff)
    if not is_apl[~caught].any():  # every APL slide AML-like: choose on all of them
        caught[:] = False
    if caught.any():
        log(f"  {int(caught.sum())} APL slide(s) look like AML to the cell models (blast rule: inconclusive); "
            "the flag threshold is chosen on the other APL slides")
    thr = threshold_for_sensitivity(is_apl[~caught], s[~caught], target_sensitivity)
    # the rule: each net at its own threshold, chosen on its out-of-fold probabilities (AML-like APL
    # slides left to the blast rule, as above)
    for task, (pos, neg) in TASKS.items():
        m = np.isin(dx, pos + neg) & np.isfinite(oof_prob[task]) & ~caught
        net_thresholds[task] = threshold_for_sensitivity(np.isin(dx[m], pos), oof_prob[task][m], target_sensitivity)
        metrics[task]["threshold"] = float(net_thresholds[task])
    flagged = flags({t: np.nan_to_num(oof_prob[t], nan=0.0) for t in TASKS}, {"thresholds": net_thresholds})
    summary = binary_summary(is_apl, s, thr, groups=pats, n_boot=500)
    summary["rule_sensitivity"] = float(flagged[is_apl].mean()) if is_apl.any() else None
    summary["rule_specificity"] = float((~flagged[~is_apl]).mean()) if (~is_apl).any() else None
    triage_hit = flagged | (blasts >= blast_cutoff)
    summary["apl_flagged_or_blast_rule"] = float(triage_hit[is_apl].mean()) if is_apl.any() else None
    metrics["suspicion_oof"] = summary
    # the distribution a scan of similar slides should show (wsi-apl verify compares a lab's results with
    # it): out-of-fold, as for slides the nets never saw; sorted, so no value points back to a slide
    metrics["reference"] = {"suspicion_oof": [round(float(v), 4) for v in np.sort(s)]}
    log(f"  suspicion (APL vs all others), out-of-fold: AUROC {summary['auroc']:.3f}; the rule (each net at its "
        f"threshold: " + ", ".join(f"{t} {v:.3f}" for t, v in net_thresholds.items())
        + f") flags {summary['rule_sensitivity']:.2f} of APL and {1 - summary['rule_specificity']:.2f} of the others")
    tensors, hidden_of = _final_nets(Z, dx, pats, trials, seed, base, metrics, log)
    config = {"features": list(names), "mean": mean.tolist(), "std": std.tolist(),
              "hidden": hidden_of, "calibration": calibration}
    decision = {"threshold": float(thr), "thresholds": {t: float(v) for t, v in net_thresholds.items()},
                "blast_inconclusive_percent": float(blast_cutoff), "apl_slides_caught_by_blast_rule": int(caught.sum()),
                "target_sensitivity": target_sensitivity, "min_cells": int(min_cells),
                "apl_slides": int(is_apl.sum()), "non_apl_slides": int((~is_apl).sum()),
                "oof_sensitivity": summary["rule_sensitivity"], "oof_specificity": summary["rule_specificity"],
                "rule": "flagged if each net's probability reaches its threshold (thresholds); inconclusive if too "
                        "few cells, if 2.5% or more of the bootstrap resamples would be flagged, or if blasts and "
                        "blast equivalents reach blast_inconclusive_percent; otherwise not_flagged (which never "
                        "excludes APL). The suspicion ranks the list."}
    return SlideNetsFit(tensors, config, decision, metrics)


def _out_of_fold(Z: np.ndarray, dx: np.ndarray, pats: np.ndarray, folds: list[np.ndarray], trials: int, seed: int,
                 base: dict) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Each task's logits on every slide from nets that never saw its patients, and each fold's params."""
    oof = {t: np.full(len(Z), np.nan) for t in TASKS}
    fold_params: dict[str, list] = {t: [] for t in TASKS}
    for f, test_idx in enumerate(folds):
        train_mask = np.ones(len(Z), bool)
        train_mask[test_idx] = False
        for task, (pos, neg) in TASKS.items():
            m = train_mask & np.isin(dx, pos + neg)
            y = np.isin(dx[m], pos).astype(np.float32)
            if len(np.unique(y)) < 2:
                continue
            params = search_params(Z[m], y, pats[m], trials, seed + f) if trials else base
            fold_params[task].append(params)
            net = _fit(Z[m], y, params, seed + f)
            oof[task][test_idx] = _logits(net, Z[test_idx])
    return oof, fold_params


def _calibrate(oof: dict[str, np.ndarray], dx: np.ndarray, fold_params: dict[str, list], metrics: dict,
               log: Callable[[str], None]) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Platt calibration of each task's out-of-fold logits; records their AUROC and AUPRC in ``metrics``."""
    calibration, oof_prob = {}, {}
    for task, (pos, neg) in TASKS.items():
        m = np.isin(dx, pos + neg) & np.isfinite(oof[task])
        y = np.isin(dx[m], pos)
        a, b = platt(oof[task][m], y.astype(np.float32))
        calibration[task] = [a, b]
        oof_prob[task] = 1.0 / (1.0 + np.exp(-(a * oof[task] + b)))
        metrics[task] = {"oof_auroc": auroc(y, oof[task][m]), "oof_auprc": auprc(y, oof[task][m]),
                         "slides": int(m.sum()), "positives": int(y.sum()), "fold_params": fold_params[task]}
        log(f"  {task}: out-of-fold AUROC {metrics[task]['oof_auroc']:.3f} on {int(m.sum())} slides")
    return calibration, oof_prob


def _final_nets(Z: np.ndarray, dx: np.ndarray, pats: np.ndarray, trials: int, seed: int, base: dict, metrics: dict,
                log: Callable[[str], None]) -> tuple[dict, dict[str, int]]:
    """Both nets fitted on every slide (the bundle's weights), with their params in ``metrics``."""
    tensors, hidden_of = {}, {}
    for task, (pos, neg) in TASKS.items():
        m = np.isin(dx, pos + neg)
        y = np.isin(dx[m], pos).astype(np.float32)
        params = search_params(Z[m], y, pats[m], trials, seed) if trials else base
        if trials:
            log(f"  {task}: search chose {json.dumps({k: round(v, 5) for k, v in params.items()})}")
        metrics[task]["params"] = params
        hidden_of[task] = int(params["hidden"])
        net = _fit(Z[m], y, params, seed)
        for kname, v in net.state_dict().items():
            tensors[f"{task}.{kname}"] = v
    return tensors, hidden_of
