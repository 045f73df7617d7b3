"""Training is reproducible: fixed epochs, a schedule that follows the steps, a budget only as a bound.

The same seed gives bit-identical weights whether the machine is fast or slow (a clock that runs
fast stands in for a busy machine), and a budget that cuts a run is a warning recorded with the
model, never a silent change of the learning-rate schedule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.wsi_apl.test_detector_training import _pictures, _via
from workers.classifier import CellConfig
from workers.detector import DetectorConfig


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from wsi_apl.annotations import read_via
    from wsi_apl.train.data import image_samples

    d = tmp_path_factory.mktemp("repro")
    pics = _pictures(d / "imgs", n=4)
    _via(d / "a.json", pics)
    return image_samples(read_via(d / "a.json", d / "imgs"))


class _BusyClock:
    """time.time of a machine that is slow: every call is 7 s later than the one before."""

    def __init__(self):
        self.t = 1e9

    def __call__(self) -> float:
        self.t += 7.0
        return self.t


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _diff(a: dict, b: dict) -> str:
    """Which tensors differ, and by how much (the last bits: summation order; more: the schedule)."""
    d = [(k, float((a[k].double() - b[k].double()).abs().max())) for k in a if k in b and not torch.equal(a[k], b[k])]
    return f"{len(d)} of {len(a)} tensors differ, e.g. " + ", ".join(f"{k} by {v:.2e}" for k, v in d[:3])


def _detector(samples, **kw):
    from wsi_apl.train.detector import train_detector

    cfg = DetectorConfig(mpp=1.0, mpp_known=False, cell_diameters_um=(12.0, 24.0, 48.0, 96.0))
    return train_detector(samples[:3], samples[3:], cfg, epochs=2, seed=3, log=lambda _: None, **kw)


def test_detector_same_weights_on_a_busy_machine(samples, monkeypatch):
    quiet, _ = _detector(samples)
    again, _ = _detector(samples)
    assert _same(quiet.state_dict(), again.state_dict()), "the same seed must give the same detector: " + _diff(
        quiet.state_dict(), again.state_dict())
    import wsi_apl.train.detector as det

    monkeypatch.setattr(det.time, "time", _BusyClock())
    busy, info = _detector(samples, time_budget_s=10_000)  # never reached, however slow the clock
    assert _same(quiet.state_dict(), busy.state_dict()), "the schedule must not follow the clock"
    assert info["budget"] == {"epochs_planned": 2, "budget_s": 10_000.0, "budget_reached": False,
                              "stopped_at_epoch": None}


def _cells(samples, **kw):
    from wsi_apl.train.cells import CellSet, train_cells

    cfg = CellConfig(backbone="small", heads=("myeloblast",), crop_um=24.0, crop_px=32)
    cells = CellSet.from_samples(samples, ("myeloblast",), 1.0)
    rng = np.random.default_rng(0)
    cells.labels = rng.integers(0, 2, size=cells.labels.shape).astype(np.float32)
    cells.patients = np.array([f"p{i % 2}" for i in range(len(cells))])
    return train_cells(cells, cells, cfg, epochs=3, seed=5, batch_size=4, **kw)


def test_cell_heads_same_weights_and_a_reached_budget_is_recorded(samples, monkeypatch):
    quiet, _ = _cells(samples, log=lambda _: None)
    import wsi_apl.train.cells as cells_mod

    monkeypatch.setattr(cells_mod.time, "time", _BusyClock())
    busy, _ = _cells(samples, time_budget_s=10_000, log=lambda _: None)
    assert _same(quiet.state_dict(), busy.state_dict())
    said = []
    _, info = _cells(samples, time_budget_s=1e-9, log=said.append)  # spent at once: stops after epoch 1 of 3
    assert info["budget"]["budget_reached"] and info["budget"]["stopped_at_epoch"] == 1
    assert len(info["history"]) == 1
    assert any("WARNING" in s and "time budget" in s and "epoch 1 of 3" in s for s in said)


def test_session_bundle_records_fixed_epochs(trained):
    """The end-to-end bundle trained with fixed epochs and no budget: each part says so."""
    _, bundle = trained
    det = bundle.part("detector")["metrics"]["budget"]
    cells = bundle.part("cells")["metrics"]["budget"]
    assert det == {"epochs_planned": 6, "budget_s": None, "budget_reached": False, "stopped_at_epoch": None}
    assert cells["epochs_planned"] == 2 and not cells["budget_reached"]
