"""The slide-level "ensemble neural nets" of the paper and the triage decision built on them.

Two small nets turn a slide's features (ratios and mean probabilities of the cell heads) into
probabilities: APL vs non-APL AML, and APL vs healthy marrow (reactive marrows on the healthy side,
as its hardest negatives). As in the paper each is one fully connected layer (deeper only when a
search finds it better). Probabilities are calibrated on out-of-fold predictions.

The *suspicion* that ranks the triage list is the geometric mean of the two calibrated
probabilities: high only when the slide looks like APL against both comparisons. The decision rule
(stored in the bundle with the numbers it rests on):

- ``inconclusive`` when the selector found no usable area (with its reason), or fewer counted cells
  than ``min_cells``;
- ``flagged`` when each net's probability reaches that net's threshold (APL against AML *and*
  against healthy marrow; each threshold chosen on out-of-fold predictions for the target
  sensitivity, default 0.95). Bundles without per-net thresholds use one threshold on the suspicion.
  A slide not flagged whose bootstrap resamples are flagged in 2.5 % or more is ``inconclusive``
  (borderline);
- ``inconclusive`` also when the slide is not flagged but its blasts and blast equivalents (cells at
  the myeloblast or promyelocyte threshold) reach ``blast_inconclusive_percent`` (default 20 %, the
  WHO count for acute leukaemia): an acute leukaemia without the APL pattern, where the
  microgranular APL variant cannot be excluded by morphology;
- ``not_flagged`` otherwise. ``not_flagged`` never excludes APL: it is decision support.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .status import Status

#: Blasts and blast equivalents (per 100 counted cells) from which a slide that is not flagged is
#: inconclusive rather than not_flagged (WHO: 20 % blasts make an acute leukaemia).
DEFAULT_BLAST_CUTOFF = 20.0

TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "apl_vs_aml": (("apl",), ("aml",)),
    "apl_vs_healthy": (("apl",), ("healthy", "reactive")),
}


class SlideNet(nn.Module):
    """One fully connected layer (``hidden=0``), or one hidden layer of ``hidden`` units."""

    def __init__(self, n_in: int, hidden: int = 0):
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(n_in, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


@dataclass
class SlideNets:
    """Inference with the two nets: standardisation, logits, calibration, suspicion."""

    names: list[str]
    mean: np.ndarray
    std: np.ndarray
    nets: dict[str, SlideNet]
    calibration: dict[str, tuple[float, float]]

    @classmethod
    def from_bundle(cls, bundle) -> "SlideNets":
        bundle.require("slide_nets")
        part = bundle.part("slide_nets")
        cfg = part["config"]
        tensors = bundle.load_tensors("slide_nets")
        nets = {}
        for task in TASKS:
            net = SlideNet(len(cfg["features"]), int(cfg.get("hidden", {}).get(task, 0)))
            prefix = f"{task}."
            net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            net.eval()
            nets[task] = net
        return cls(list(cfg["features"]), np.asarray(cfg["mean"]), np.asarray(cfg["std"]), nets,
                   {t: tuple(cfg["calibration"][t]) for t in TASKS})

    def logits(self, X: np.ndarray) -> dict[str, np.ndarray]:
        X = np.nan_to_num((np.atleast_2d(X) - self.mean) / self.std)
        with torch.inference_mode():
            x = torch.as_tensor(X, dtype=torch.float32)
            return {t: n(x).numpy().astype(np.float64) for t, n in self.nets.items()}

    def predict(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Calibrated probabilities per task, arrays (n,)."""
        out = {}
        for t, z in self.logits(X).items():
            a, b = self.calibration[t]
            out[t] = 1.0 / (1.0 + np.exp(-np.clip(a * z + b, -60.0, 60.0)))
        return out


def suspicion(probs: dict[str, np.ndarray]) -> np.ndarray:
    """Geometric mean of the two calibrated probabilities."""
    return np.sqrt(np.clip(probs["apl_vs_aml"], 0, 1) * np.clip(probs["apl_vs_healthy"], 0, 1))


@dataclass
class Decision:
    status: str                 # flagged | not_flagged | inconclusive
    suspicion: float
    suspicion_ci: tuple[float, float]
    p_apl_vs_aml: float
    p_apl_vs_healthy: float
    reasons: list[str]


def flags(probs: dict[str, np.ndarray], rule: dict) -> np.ndarray:
    """Which slides the rule flags: each net at or above its own threshold (APL against AML *and*
    against healthy marrow); a bundle without per-net thresholds uses the suspicion threshold."""
    per_net = rule.get("thresholds")
    if per_net:
        return np.logical_and.reduce([np.asarray(probs[t]) >= float(per_net[t]) for t in TASKS])
    return suspicion(probs) >= float(rule["threshold"])


def decide(features: dict, nets: SlideNets, rule: dict) -> Decision:
    """Apply the bundle's decision ``rule`` to one slide's features (see the module docstring)."""
    X = features["features"][None, :]
    probs = nets.predict(X)
    s = float(suspicion(probs)[0])
    boot = features.get("boot")
    lo, hi = s, s
    boot_flagged = 0.0
    if boot is not None and len(boot):
        ok = np.all(np.isfinite(boot), axis=1)
        if ok.any():
            pb = nets.predict(boot[ok])
            sb = suspicion(pb)
            lo, hi = float(np.percentile(sb, 2.5)), float(np.percentile(sb, 97.5))
            boot_flagged = float(np.mean(flags(pb, rule)))
    p1, p2 = float(probs["apl_vs_aml"][0]), float(probs["apl_vs_healthy"][0])
    min_cells = max(1, int(rule.get("min_cells", 200)))
    reasons = []
    if features["cells"] == 0 or not np.all(np.isfinite(features["features"])):
        reasons.append("no counted cells in the chosen areas")
        return Decision(Status.INCONCLUSIVE, float("nan"), (float("nan"), float("nan")), float("nan"), float("nan"),
                        reasons)
    if features["cells"] < min_cells:
        reasons.append(f"too few counted cells ({features['cells']} < {min_cells})")
        return Decision(Status.INCONCLUSIVE, s, (lo, hi), p1, p2, reasons)
    if not np.isfinite(s):
        return Decision(Status.INCONCLUSIVE, s, (lo, hi), p1, p2, ["the slide-level nets gave no result"])
    if bool(flags(probs, rule)[0]):
        return Decision(Status.FLAGGED, s, (lo, hi), p1, p2, [])
    if boot_flagged >= 0.025:
        reasons.append(f"borderline: not flagged, but {100 * boot_flagged:.0f}% of the bootstrap resamples of its "
                       "cells would be (the 95% interval reaches the flag)")
        return Decision(Status.INCONCLUSIVE, s, (lo, hi), p1, p2, reasons)
    blasts = features.get("blast_percent")
    cutoff = float(rule.get("blast_inconclusive_percent", DEFAULT_BLAST_CUTOFF))
    if blasts is not None and blasts >= cutoff:
        reasons.append(f"{blasts:.0f}% blasts and blast equivalents (acute leukaemia?) without the APL pattern: "
                       "the microgranular APL variant cannot be excluded by morphology")
        return Decision(Status.INCONCLUSIVE, s, (lo, hi), p1, p2, reasons)
    return Decision(Status.NOT_FLAGGED, s, (lo, hi), p1, p2, [])
