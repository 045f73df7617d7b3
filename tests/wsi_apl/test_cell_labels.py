"""Cell labels from VIA region attributes, the faggot-cell head, evaluation on labelled pictures, and
the sampling that keeps rare findings from being learned as shortcuts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from workers.bundle import load_bundle
from workers.classifier import HEADS, KNOWN_HEADS
from wsi_apl.annotations import read_via
from wsi_apl.cli import main
from wsi_apl.train.cell_labels import head_key, read_via_cells
from wsi_apl.train.cells import pattern_weights


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Four camera frames (one per diagnosis) with the generator's VIA 2 project: each region has a
    ``type`` dropdown and ``auer_rod`` / ``faggot_cell`` checkboxes."""
    from wsi_apl.synth.cohort import synth_cohort

    root = tmp_path_factory.mktemp("viacells")
    synth_cohort(root, ["apl", "aml", "healthy", "reactive"], seed=51, mpp=0.5, size=(768, 576), plain=True)
    truth = {json.loads(t.read_text())["file"]: json.loads(t.read_text())
             for t in sorted((root / "truth").glob("slide_*.json"))}
    return root, root / "truth" / "via_project.json", truth


def test_via_region_attributes_are_the_labels(frames):
    root, via, truth = frames
    cells = read_via_cells(via, root, KNOWN_HEADS, None, None)
    # the regions as the annotation reader keeps them (boxes clipped to the frame, empty ones dropped)
    regions = [a for it in read_via(via, root) for a in it.attributes]
    assert len(cells) == len(regions) > 100 and len(cells.images) == 4
    assert not np.isnan(cells.labels).any()  # the type labels both type heads, unticked checkboxes say no
    col = {h: cells.labels[:, j] for j, h in enumerate(KNOWN_HEADS)}
    assert col["myeloblast"].sum() == sum(r["type"] == "myeloblast" for r in regions) > 0
    assert col["promyelocyte"].sum() == sum(r["type"] == "promyelocyte" for r in regions) > 0
    assert col["auer_rod"].sum() == sum(bool(r["auer_rod"]) for r in regions) > 0
    assert col["faggot_cell"].sum() == sum(bool(r["faggot_cell"]) for r in regions) > 0
    assert set(cells.patients) == {t["patient"] for t in truth.values()}


def test_via_export_text_attributes_and_bad_value(frames, tmp_path):
    """A VIA export without attribute definitions: 'Auer rods' yes/no/empty; an empty text value is not
    a label; a value that is no label names the picture and region."""
    root, _, truth = frames
    name = sorted(truth)[0]
    shutil.copy(root / name, tmp_path / name)
    regions = [
        {"shape_attributes": {"name": "rect", "x": 10, "y": 10, "width": 40, "height": 40},
         "region_attributes": {"cell type": "Promyelocyte", "Auer rods": "yes"}},
        {"shape_attributes": {"name": "circle", "cx": 200, "cy": 200, "r": 20},
         "region_attributes": {"cell type": "neutrophil", "Auer rods": "no"}},
        {"shape_attributes": {"name": "rect", "x": 300, "y": 100, "width": 40, "height": 40},
         "region_attributes": {"Auer rods": ""}},
    ]
    export = {f"{name}123": {"filename": name, "size": 123, "regions": regions, "file_attributes": {"patient": "P9"}}}
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    cells = read_via_cells(path, None, HEADS, None, None)
    y = cells.labels
    assert y[0].tolist() == [0.0, 1.0, 1.0]  # promyelocyte with Auer rods
    assert y[1].tolist() == [0.0, 0.0, 0.0]  # another type: no to both type heads
    assert np.isnan(y[2]).all()              # no type, empty text: not labelled
    assert list(cells.patients) == ["P9"] * 3
    regions[1]["region_attributes"]["Auer rods"] = "perhaps"
    path.write_text(json.dumps(export))
    with pytest.raises(ValueError, match=r"region 2.*perhaps"):
        read_via_cells(path, None, HEADS, None, None)
    assert head_key("Faggot cells") == "faggot_cell" and head_key("Auer-rod") == "auer_rod"


def test_train_faggot_head_from_via_then_evaluate(frames, tmp_path):
    """``train cells --via --heads ...,faggot_cell`` adds the head to the bundle; ``evaluate cells --via``
    scores every head the labels have; bad arguments are refused in words."""
    root, via, truth = frames
    out = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["train", "cells", "--via", str(via), "--images", str(root), "--out", str(out),
                                  "--mpp", "0.5", "--epochs", "1", "--heads",
                                  "myeloblast,promyelocyte,Auer rod,faggot_cell"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "faggot_cell" in r.output and "positive" in r.output
    b = load_bundle(out)
    assert b.heads == [*HEADS, "faggot_cell"]
    assert tuple(b.part("cells")["config"]["heads"]) == (*HEADS, "faggot_cell")
    r = CliRunner().invoke(main, ["evaluate", "cells", "--bundle", str(out), "--via", str(via), "--images", str(root),
                                  "--image-mpp", "0.5", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert set(m["heads"]) == {*HEADS, "faggot_cell"}
    regions = [a for it in read_via(via, root) for a in it.attributes]
    assert m["heads"]["faggot_cell"]["positives"] == sum(bool(r["faggot_cell"]) for r in regions) > 0
    assert m["cells"] == len(regions)
    r = CliRunner().invoke(main, ["train", "cells", "--via", str(via), "--out", str(tmp_path / "x"),
                                  "--heads", "myeloblast,eosinophil"])
    assert r.exit_code == 2 and "eosinophil" in r.output
    r = CliRunner().invoke(main, ["evaluate", "cells", "--bundle", str(out), "--via", str(via), "--cells", str(via)])
    assert r.exit_code == 2 and "not both" in r.output


def test_evaluate_cells_from_csv(frames, tmp_path):
    """``evaluate cells --cells CSV --images DIR``: the heads a CSV labels, with patient-bootstrap CIs."""
    import csv

    root, via, truth = frames
    rows = []
    for name, t in sorted(truth.items()):
        for c in t["cells"]:
            x0, y0, x1, y1 = c["box"]
            rows.append({"image": name, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "patient": t["patient"],
                         "Promyelocyte": int(c["type"] == "promyelocyte"), "auer rods": int(c["auer_rod"])})
    path = tmp_path / "cells.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["train", "cells", "--cells", str(path), "--images", str(root), "--out", str(out),
                                  "--mpp", "0.5", "--epochs", "1", "--heads", "promyelocyte,auer_rod"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["evaluate", "cells", "--bundle", str(out), "--cells", str(path), "--images",
                                  str(root), "--image-mpp", "0.5", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert set(m["heads"]) == {"promyelocyte", "auer_rod"}
    s = m["heads"]["promyelocyte"]
    assert s["positives"] == sum(row["Promyelocyte"] for row in rows)
    # the Auer-rod head among promyelocytes only: does it see rods, or the cell type?
    within = m["heads"]["auer_rod"]["auroc_within"]["promyelocyte"]
    assert within["n"] == s["positives"]
    assert within["positives"] == sum(row["Promyelocyte"] and row["auer rods"] for row in rows) > 0
    assert "myeloblast" not in m["heads"]["auer_rod"]["auroc_within"]  # not a head of this bundle
    assert 0.0 <= s["auroc_ci"][0] <= s["auroc"] <= s["auroc_ci"][1] <= 1.0


def test_pattern_weights_balance_label_combinations():
    # 90 cells negative for all, 8 promyelocytes with rods, 2 blasts with rods
    y = np.zeros((100, 3), np.float32)
    y[90:98, 1] = 1
    y[90:, 2] = 1
    y[98:, 0] = 1
    w = pattern_weights(y, 0.5)
    assert w.sum() == pytest.approx(1.0)
    share = {"none": w[:90].sum(), "pro+rod": w[90:98].sum(), "blast+rod": w[98:].sum()}
    # square-root sampling: shares proportional to sqrt(count) = 9.49 : 2.83 : 1.41
    assert share["blast+rod"] / share["pro+rod"] == pytest.approx(np.sqrt(2 / 8))
    assert share["blast+rod"] > 0.02 * 5  # 2 % of the cells, more than 10 % of the draws
    assert np.allclose(pattern_weights(y, 0.0), 0.01)
    # an unlabelled head is its own pattern value, not a negative
    y[0, 2] = np.nan
    assert pattern_weights(y, 1.0)[0] == pytest.approx(pattern_weights(y, 1.0)[98] * 2)


def test_head_without_validation_positives_takes_its_threshold_from_training(frames):
    """Validation cells of a healthy marrow have no Auer rods: that head's threshold comes from the
    training cells (predicted prevalence = training prevalence), not a fixed 0.5, and says so."""
    from workers.classifier import CellConfig
    from wsi_apl.train.cells import subset, train_cells

    root, via, truth = frames
    cells = read_via_cells(via, root, HEADS, None, None)
    healthy = next(t["patient"] for t in truth.values() if t["diagnosis"] == "healthy")
    val = cells.patients == healthy
    cfg = CellConfig()
    model, info = train_cells(subset(cells, ~val), subset(cells, val), cfg, epochs=1, log=lambda s: None)
    src = info["threshold_source"]
    assert src["auer_rod"].startswith("training") and src["promyelocyte"] in ("validation", src["auer_rod"])
    assert info["balance"] == 0.5 and 0.05 <= cfg.thresholds["auer_rod"] <= 0.95
