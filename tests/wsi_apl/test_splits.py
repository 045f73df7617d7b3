"""Patient splits (scikit-learn group splitters) and curves that do not depend on input order."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from wsi_apl.metrics import auprc, auroc, pr_points, roc_points
from wsi_apl.train.splits import group_folds, split_by_patient


def _cohort(per_dx: int = 5, slides_per_patient: int = 2):
    return [SimpleNamespace(patient=f"{dx}{p}", diagnosis=dx, slide=f"{dx}{p}_{s}")
            for dx in ("apl", "aml", "healthy", "reactive") for p in range(per_dx) for s in range(slides_per_patient)]


@pytest.mark.parametrize("fractions", [(0.4, 0.6), (0.75, 0.25), (0.7, 0.15, 0.15), (0.8, 0.2, 0.0)])
def test_split_by_patient_keeps_patients_whole_and_diagnoses_spread(fractions):
    entries = _cohort()
    parts = split_by_patient(entries, fractions, seed=3)
    assert sum(len(p) for p in parts) == len(entries)
    owners = [{e.patient for e in p} for p in parts]
    for i in range(len(owners)):
        for j in range(i + 1, len(owners)):
            assert not owners[i] & owners[j], "a patient on both sides of a split"
    for f, part in zip(fractions, parts):
        assert abs(len({e.patient for e in part}) / 20 - f) <= 0.1  # 20 patients
        if f >= 0.25:  # a part of at least 5 patients holds every diagnosis
            assert set(Counter(e.diagnosis for e in part)) == {"apl", "aml", "healthy", "reactive"}
    assert parts == split_by_patient(entries, fractions, seed=3), "the same seed gives the same split"


def test_split_of_one_patient_keeps_everything_for_training():
    entries = [SimpleNamespace(patient="P1", diagnosis="apl")] * 3
    tr, va = split_by_patient(entries, (0.8, 0.2))
    assert len(tr) == 3 and va == []


def test_group_folds_stratified_and_grouped():
    dx = np.array(["apl"] * 12 + ["aml"] * 12)
    pats = np.array([f"p{i // 2}" for i in range(24)])  # two slides per patient
    folds = group_folds(pats, 3, dx, seed=0)
    assert len(folds) == 3 and sorted(np.concatenate(folds).tolist()) == list(range(24))
    for f in folds:
        assert set(dx[f]) == {"apl", "aml"}
        assert not set(pats[f]) & set(pats[np.setdiff1d(np.arange(24), f)])
    with pytest.raises(ValueError, match="two patients"):
        group_folds(["p"] * 4, 2)


def test_curves_and_areas_do_not_depend_on_the_order_of_tied_scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 1).astype(np.float32)  # saturated probabilities: many ties
    s[:50] = 1.0
    ref = (roc_points(y, s), pr_points(y, s), auroc(y, s), auprc(y, s))
    for _ in range(5):
        o = rng.permutation(200)
        got = (roc_points(y[o], s[o]), pr_points(y[o], s[o]), auroc(y[o], s[o]), auprc(y[o], s[o]))
        for a, b in zip(ref[:2], got[:2]):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        assert ref[2:] == got[2:]
    assert pr_points([1, 0], [0.5, 0.5])[1].tolist() == pr_points([0, 1], [0.5, 0.5])[1].tolist() == [0.5]
