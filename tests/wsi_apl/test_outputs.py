"""Metrics, features, the ledger, the zarr store and the triage CSV."""

from __future__ import annotations

import csv
import multiprocessing

import numpy as np
import pytest
import zarr

from wsi_apl.features import slide_features
from wsi_apl.ledger import Ledger, LedgerLocked, fingerprint
from wsi_apl.metrics import auprc, auroc, bootstrap_ci, coco_metrics, threshold_for_sensitivity
from wsi_apl.pipeline import SlideResult
from wsi_apl.status import DECISION_SUPPORT
from wsi_apl.store import clean_staging, read_slide_group, slide_groups, write_slide_group
from wsi_apl.triage import COLUMNS, neutralise, write_triage


def test_auroc_auprc_known_values():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auroc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert auprc(y, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(1.0)
    assert np.isnan(auroc(np.array([1, 1]), np.array([0.2, 0.3])))
    lo, hi = bootstrap_ci(auroc, np.r_[np.zeros(50), np.ones(50)], np.r_[np.random.default_rng(0).random(50),
                                                                         np.random.default_rng(1).random(50) + 0.5])
    assert lo < hi <= 1.0


def test_metrics_do_not_depend_on_the_order_of_tied_scores():
    """Saturated float32 probabilities tie often: the order in which tied cells arrive must not
    change AUPRC (a hand-written step sum gave 1.0 for [1, 0] and 0.5 for [0, 1] at equal scores)."""
    assert auprc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert auprc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300) * 4) / 4 + 0.3 * y  # few distinct values: many ties
    for _ in range(5):
        p = rng.permutation(300)
        assert auprc(y[p], s[p]) == pytest.approx(auprc(y, s))
        assert auroc(y[p], s[p]) == pytest.approx(auroc(y, s))


def test_threshold_for_sensitivity():
    y = np.array([1] * 20 + [0] * 20)
    s = np.r_[np.linspace(0.5, 1.0, 20), np.linspace(0.0, 0.6, 20)]
    t = threshold_for_sensitivity(y, s, 0.95)
    assert (s[:20] >= t).mean() >= 0.95


def test_coco_metrics_perfect_and_missing():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    m = coco_metrics([(gt, np.array([0.9, 0.8]), gt)])
    assert m["AP50"] == pytest.approx(1.0) and m["AR"] == pytest.approx(1.0)
    m2 = coco_metrics([(gt[:1], np.array([0.9]), gt)])
    assert m2["AR50"] == pytest.approx(0.5)


def test_slide_features_ratios_and_ci():
    rng = np.random.default_rng(0)
    n = 400
    cols = {"area": np.repeat(np.arange(4), 100), "cut": np.zeros(n, bool),
            "p_promyelocyte": (rng.random(n) < 0.3).astype(float) * 0.9 + 0.05,
            "p_myeloblast": np.full(n, 0.1), "p_auer_rod": np.full(n, 0.01)}
    cols["cut"][:10] = True
    f = slide_features(cols, ["myeloblast", "promyelocyte", "auer_rod"], {"promyelocyte": 0.5})
    r = f["ratios"]["promyelocyte"]
    assert f["cells"] == 390
    assert r["ci_low"] <= r["value"] <= r["ci_high"]
    assert 0.2 < r["value"] < 0.4 and r["ci_high"] - r["ci_low"] < 0.2
    assert f["ratios"]["myeloblast"]["value"] == 0.0


def _result(name, status, suspicion):
    return SlideResult(slide=name, path=f"/x/{name}", status=status, suspicion=suspicion, cells=300, areas=5,
                       bundle="b (demo model trained on synthetic data — not for diagnosis)",
                       ratios={"promyelocyte": {"value": 0.3, "ci_low": 0.2, "ci_high": 0.4}}).to_json()


def test_ledger_resume_lock_and_triage(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    files = {}
    for name in ("a.tiff", "b.tiff", "c.tiff", "d.tiff"):
        (slides / name).write_bytes(name.encode() * 100)
        files[name] = fingerprint(slides / name)
    (slides / "=cmd.tiff").write_bytes(b"same as a" * 10)
    led = Ledger(tmp_path / "out")
    led.lock()
    with pytest.raises(LedgerLocked):
        other = Ledger(tmp_path / "out")
        try:
            other.lock()
        finally:
            other.db.close()
    for name, fp in files.items():
        led.see_file(str(slides / name), name, fp, case_id=f"C-{name[0]}")
        led.start(fp, "bundle1", 10)
    led.see_file(str(slides / "=cmd.tiff"), "=cmd.tiff", None, error="cannot read it")
    led.finish(files["a.tiff"], "not_flagged", _result("a.tiff", "not_flagged", 0.1), "a")
    led.finish(files["b.tiff"], "flagged", _result("b.tiff", "flagged", 0.9), "b")
    led.finish(files["c.tiff"], "inconclusive", _result("c.tiff", "inconclusive", 0.4), "c")
    # d stays "running": a crash; the triage list says not_analysed, never negative
    assert led.is_done(files["a.tiff"], "bundle1") and not led.is_done(files["a.tiff"], "bundle2")
    assert not led.is_done(files["d.tiff"], "bundle1")
    out = write_triage(tmp_path / "out", led)
    led.close()
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0].keys())[:len(COLUMNS)] == COLUMNS
    assert [r["status"] for r in rows] == ["flagged", "inconclusive", "failed", "not_analysed", "not_flagged"]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert all(r["note"] == DECISION_SUPPORT for r in rows)
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["slide"] == "'=cmd.tiff" and "cannot read" in failed["reason"]
    assert "synthetic" in rows[0]["bundle"]
    assert rows[0]["case"] == "C-b"


def test_neutralise():
    assert neutralise("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert neutralise("+1+1") == "'+1+1"
    assert neutralise("@SUM") == "'@SUM"
    assert neutralise("\tx") == "'\tx"
    assert neutralise("-0.5") == "-0.5"
    assert neutralise(0.25) == "0.2500"
    assert neutralise(None) == ""


def test_triage_csv_quotes_as_the_csv_module_does(tmp_path):
    """The list is built as a DataFrame, yet the file is what csv.writer writes: the same quoting of
    commas, quotes and line breaks, formulas neutralised, None empty, floats with 4 decimals."""
    import csv
    import io

    rows = [{"rank": 1, "case": 'A,"B"', "slide": "s\nl.svs", "status": "flagged", "suspicion": 0.91234,
             "reason": "=cmd|' /C calc'!A0", "qc": "-0.5", "cells": 0, "note": "x"},
            {"rank": 2, "slide": "b.svs", "status": "failed", "suspicion": None, "reason": ""}]
    path = write_triage(tmp_path, rows=rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([neutralise(r.get(c)) for c in COLUMNS])
    assert path.read_text() == buf.getvalue()
    back = list(csv.DictReader(path.open()))
    assert back[0]["case"] == 'A,"B"' and back[0]["reason"].startswith("'=") and back[0]["suspicion"] == "0.9123"
    assert back[1]["suspicion"] == "" and list(back[0]) == COLUMNS
    assert write_triage(tmp_path, rows=[]).read_text() == ",".join(COLUMNS) + "\n"


def _write_group(results, name):
    cols = {"area": np.arange(5, dtype=np.int32), "score": np.ones(5, np.float32),
            "crops": np.zeros((5, 48, 48, 3), np.uint8)}
    write_slide_group(results, name, cols, {"result": {"status": "flagged"}})


def test_store_groups_are_whole_and_replaceable(tmp_path):
    _write_group(tmp_path, "s1")
    _write_group(tmp_path, "s1")  # replaced, not duplicated
    _write_group(tmp_path, "s2")
    assert slide_groups(tmp_path) == ["s1", "s2"]
    cols, attrs = read_slide_group(tmp_path, "s1")
    assert cols["crops"].shape == (5, 48, 48, 3) and attrs["result"]["status"] == "flagged"
    root = zarr.open_group(str(tmp_path / "cells.zarr"), mode="r")
    assert root["s2"]["score"][...].sum() == 5
    # a writer killed just before the rename leaves nothing visible in the store
    p = multiprocessing.get_context("fork").Process(target=_crash_while_writing, args=(tmp_path, "s3"))
    p.start()
    p.join()
    assert p.exitcode == 3
    assert (tmp_path / ".staging").exists() and any((tmp_path / ".staging").iterdir())
    assert slide_groups(tmp_path) == ["s1", "s2"]
    clean_staging(tmp_path)
    assert not (tmp_path / ".staging").exists()


def _crash_while_writing(results, name):
    import os

    import wsi_apl.store as store

    store._publish = lambda *a: os._exit(3)  # killed after writing everything, before the rename
    _write_group(results, name)


def test_coco_metrics_count_every_cell_of_a_dense_image():
    """1500 cells found exactly: AP and AR are 1 (COCO's default caps would stop at 100 or 1000)."""
    xs, ys = np.meshgrid(np.arange(50) * 20.0, np.arange(30) * 20.0)
    gt = np.stack([xs.ravel(), ys.ravel(), xs.ravel() + 12, ys.ravel() + 12], axis=1)
    m = coco_metrics([(gt, np.linspace(0.99, 0.5, len(gt)), gt)])
    assert m["AP50"] == pytest.approx(1.0) and m["AR50"] == pytest.approx(1.0)


def test_match_indices_and_curves():
    from wsi_apl.metrics import match_indices, pr_points, roc_points

    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    pred = np.array([[21, 21, 31, 31], [50, 50, 60, 60], [0, 0, 10, 11]], np.float32)
    assert match_indices(pred, np.array([0.9, 0.8, 0.7]), gt).tolist() == [1, -1, 0]
    y, s = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])
    fpr, tpr = roc_points(y, s)
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    np.testing.assert_allclose(pr_points(y, s)[1], [1.0, 0.5, 2 / 3, 0.5])
