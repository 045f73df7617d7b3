"""Patient splits: scikit-learn's group splitters, so that no patient's slides or cells sit on both
sides of a split.

``StratifiedGroupKFold`` keeps each diagnosis spread over the folds where a stratum is known;
``GroupKFold`` (shuffled) balances the folds' sizes where it is not (cells and pictures carry no
diagnosis). A split into fractions (training/validation/test) takes whole folds of a k chosen so that
the fraction is a whole number of folds (0.25 of 4 folds, 0.4 as 2 of 5, 0.15 as 1 of 7).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np


def group_folds(groups: Sequence, k: int, strata: Sequence | None = None, seed: int = 0) -> list[np.ndarray]:
    """Up to ``k`` folds of indices, no group in two folds (fewer folds where there are fewer groups;
    an empty fold is dropped). ``strata``: a class per index to spread evenly over the folds."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    groups = np.asarray([str(g) for g in groups])
    n_groups = len(np.unique(groups))
    k = int(min(k, n_groups))
    if k < 2:
        raise ValueError(f"a split by patient needs at least two patients or pictures; found {n_groups}")
    X = np.zeros((len(groups), 1))
    strata = None if strata is None else np.asarray([str(s) for s in strata])
    with warnings.catch_warnings():
        # "The least populated class in y has only n members": expected on small cohorts
        warnings.simplefilter("ignore", UserWarning)
        # one stratum, or every stratum smaller than k (StratifiedGroupKFold refuses): size-balanced groups
        if strata is None or len(np.unique(strata)) < 2 or np.unique(strata, return_counts=True)[1].max() < k:
            splits = GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(X, groups=groups)
        else:
            splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(X, strata, groups)
        folds = [np.sort(test) for _, test in splits]
    return [f for f in folds if len(f)]


def _folds_for(fraction: float) -> tuple[int, int]:
    """(k, m): ``m`` of ``k`` folds make ``fraction`` (to within 0.05 of a fold; at most 10 folds)."""
    for k in range(2, 11):
        m = round(fraction * k)
        if 1 <= m < k and abs(fraction * k - m) <= 0.05:
            return k, m
    k = 10
    return k, min(k - 1, max(1, round(fraction * k)))


def split_fraction(groups: Sequence, fraction: float, strata: Sequence | None = None, seed: int = 0) -> np.ndarray:
    """A mask of about ``fraction`` of the indices, made of whole groups (stratified where ``strata``).

    Fewer than two groups: nothing is split off (all stay on the other side)."""
    groups = np.asarray([str(g) for g in groups])
    mask = np.zeros(len(groups), bool)
    n_groups = len(np.unique(groups))
    if fraction <= 0 or n_groups < 2:
        return mask
    if fraction >= 1:
        return ~mask
    k, m = _folds_for(fraction)
    if k > n_groups:  # fewer groups than folds: one group per fold, as many as the fraction asks
        k, m = n_groups, min(n_groups - 1, max(1, round(fraction * n_groups)))
    folds = group_folds(groups, k, strata, seed)
    mask[np.concatenate(folds[:m])] = True
    return mask


def split_by_patient(entries: list, fractions: tuple[float, ...], seed: int = 0,
                     key: Callable = lambda e: e.patient, stratify: Callable = lambda e: e.diagnosis) -> list[list]:
    """Entries in ``len(fractions)`` groups by patient (no patient in two groups), stratified by
    diagnosis, each of about its fraction of the patients. The last groups are split off first; with a
    single patient everything lands in the first group."""
    groups = np.asarray([str(key(e)) for e in entries])
    strata = np.asarray([str(stratify(e)) for e in entries])
    assign = np.zeros(len(entries), int)
    left = np.arange(len(entries))
    share_left = float(sum(fractions))
    for g in range(len(fractions) - 1, 0, -1):
        if share_left <= 0 or not len(left):
            break
        part = split_fraction(groups[left], fractions[g] / share_left, strata[left], seed + g)
        assign[left[part]] = g
        left = left[~part]
        share_left -= fractions[g]
    return [[e for e, a in zip(entries, assign) if a == g] for g in range(len(fractions))]
