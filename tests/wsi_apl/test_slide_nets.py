"""The slide-level nets: cross-validation by patient, Optuna inside the training folds, thresholds."""

from __future__ import annotations

import numpy as np

from wsi_apl.features import feature_names
from wsi_apl.train import enn as enn_mod

HEADS = ["myeloblast", "promyelocyte", "auer_rod"]


def _cohort(n_per: int = 6, seed: int = 0):
    """Features like a scan's: APL has many promyelocytes, AML many myeloblasts."""
    rng = np.random.default_rng(seed)
    rows, dx, pats = [], [], []
    for d, (mb, pro) in {"apl": (0.08, 0.5), "aml": (0.5, 0.05), "healthy": (0.02, 0.04),
                         "reactive": (0.04, 0.08)}.items():
        for i in range(n_per):
            m, p = np.clip(rng.normal(mb, 0.06), 0, 1), np.clip(rng.normal(pro, 0.08), 0, 1)
            a = np.clip(rng.normal(0.1 if d == "apl" else 0.01, 0.03), 0, 1)
            rows.append([m, m * 0.9 + 0.02, p, p * 0.9 + 0.03, a, a + 0.01])
            dx.append(d)
            pats.append(f"{d}-{i}")
    return np.array(rows), dx, pats


def test_search_runs_inside_the_training_folds_only(monkeypatch):
    X, dx, pats = _cohort()
    seen = []
    real = enn_mod.search_params

    def spy(Z, y, groups, trials, seed=0):
        seen.append((len(Z), set(groups)))
        return real(Z, y, groups, trials, seed)

    monkeypatch.setattr(enn_mod, "search_params", spy)
    tensors, config, decision, metrics = enn_mod.train_enn(X, dx, pats, feature_names(HEADS), trials=2,
                                                           min_cells=50, log=lambda s: None)
    k = metrics["folds"]
    assert k == 3
    n_task = {"apl_vs_aml": 12, "apl_vs_healthy": 18}
    # k searches per task on training folds (fewer slides, never a test patient), then one on all slides
    assert len(seen) == 2 * k + 2
    tasks = ["apl_vs_aml", "apl_vs_healthy"] * (k + 1)
    for (n, groups), task in zip(seen[:2 * k], tasks):
        assert n < n_task[task] and len(groups) == n  # a training fold: some patients held out
    assert [n for n, _ in seen[2 * k:]] == [n_task["apl_vs_aml"], n_task["apl_vs_healthy"]]
    for task in ("apl_vs_aml", "apl_vs_healthy"):
        assert len(metrics[task]["fold_params"]) == k
        assert {"hidden", "lr", "weight_decay", "epochs"} <= set(metrics[task]["params"])
        assert config["hidden"][task] == metrics[task]["params"]["hidden"]
        assert metrics[task]["oof_auroc"] > 0.9  # separable features: the nets find it out of fold
        assert 0.0 <= decision["thresholds"][task] <= 1.0
    assert decision["apl_slides"] == 6 and decision["non_apl_slides"] == 18
    assert set(tensors) and all(k.split(".")[0] in ("apl_vs_aml", "apl_vs_healthy") for k in tensors)


def test_fewer_folds_said_aloud_with_two_patients():
    X, dx, pats = _cohort(n_per=2)
    said = []
    _, _, _, metrics = enn_mod.train_enn(X, dx, pats, feature_names(HEADS), log=said.append)
    assert metrics["folds"] == 2 and any("only 2 folds" in s for s in said)


def test_aml_like_apl_goes_to_the_blast_rule_not_to_the_threshold():
    """One APL slide that looks like AML (microgranular, to the cell models) must not drag the flag
    threshold down to the healthy marrows: it is left to the blast rule (inconclusive)."""
    X, dx, pats = _cohort(n_per=8, seed=2)
    blasts = np.where(np.isin(dx, ["apl", "aml"]), 60.0, 5.0)
    X[0] = X[len(dx) // 4 + 1]  # APL patient 0 with the features of an AML slide
    _, _, dec_plain, _ = enn_mod.train_enn(X, dx, pats, feature_names(HEADS), min_cells=50, log=lambda s: None)
    said = []
    _, _, dec, m = enn_mod.train_enn(X, dx, pats, feature_names(HEADS), min_cells=50, blasts=blasts, log=said.append)
    assert dec["apl_slides_caught_by_blast_rule"] == 1 and any("look like AML" in s for s in said)
    assert dec["threshold"] > dec_plain["threshold"]
    assert m["suspicion_oof"]["apl_flagged_or_blast_rule"] == 1.0


def test_decide_sends_blast_rich_slides_to_an_expert():
    import torch

    from wsi_apl.enn import SlideNets, decide

    net = enn_mod.SlideNet(6)
    with torch.no_grad():
        for prm in net.parameters():
            prm.zero_()
        net.net[0].bias.fill_(-8.0)  # every slide: very unlikely APL
    nets = SlideNets(feature_names(HEADS), np.zeros(6), np.ones(6), {"apl_vs_aml": net, "apl_vs_healthy": net},
                     {"apl_vs_aml": (1.0, 0.0), "apl_vs_healthy": (1.0, 0.0)})
    feats = {"features": np.full(6, 0.1), "cells": 400, "boot": None}
    rule = {"threshold": 0.5, "min_cells": 100}
    assert decide({**feats, "blast_percent": 5.0}, nets, rule).status == "not_flagged"
    d = decide({**feats, "blast_percent": 45.0}, nets, rule)
    assert d.status == "inconclusive" and "microgranular" in d.reasons[0]
    assert decide({**feats, "blast_percent": 45.0}, nets, {**rule, "blast_inconclusive_percent": 50}).status == "not_flagged"
