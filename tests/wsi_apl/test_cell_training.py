"""Cell heads from a CSV of labelled cells: missing labels, patient-grouped CV, Optuna, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from workers.bundle import load_bundle
from workers.classifier import HEADS
from wsi_apl.cli import main
from wsi_apl.train.cell_labels import read_cells_csv
from wsi_apl.train.cells import patient_folds


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Four camera frames (one per diagnosis, four patients) and a CSV of their cells, some labels missing."""
    from wsi_apl.synth.cohort import synth_cohort

    root = tmp_path_factory.mktemp("cellcsv")
    synth_cohort(root, ["apl", "aml", "healthy", "reactive"], seed=51, mpp=0.5, size=(768, 576), plain=True)
    rows = []
    for t in sorted((root / "truth").glob("slide_*.json")):
        truth = json.loads(t.read_text())
        for i, c in enumerate(truth["cells"]):
            x0, y0, x1, y1 = c["box"]
            auer = "" if i % 3 == 0 else int(c["auer_rod"])  # every third cell: Auer rods not assessed
            rows.append({"image": truth["file"], "x0": x0, "y0": y0, "x1": x1, "y1": y1, "patient": truth["patient"],
                         "myeloblast": int(c["type"] == "myeloblast"),
                         "promyelocyte": "yes" if c["type"] == "promyelocyte" else "no", "auer_rod": auer})
    path = root / "cells.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root, path, rows


def test_csv_labels_missing_ones_are_nan(labelled):
    root, path, rows = labelled
    cells = read_cells_csv(path, None, HEADS, 0.5, 0.5)
    assert len(cells) == len(rows) and len(cells.images) == 4
    j = HEADS.index("auer_rod")
    assert np.isnan(cells.labels[:, j]).sum() == sum(r["auer_rod"] == "" for r in rows)
    assert not np.isnan(cells.labels[:, HEADS.index("promyelocyte")]).any()
    assert cells.labels[:, HEADS.index("promyelocyte")].sum() == sum(r["promyelocyte"] == "yes" for r in rows)
    folds = patient_folds(cells.patients, 2)
    assert not set(cells.patients[folds[0]]) & set(cells.patients[folds[1]])


def test_train_cells_from_csv_with_folds_and_trials(labelled, tmp_path):
    root, path, _ = labelled
    out = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["train", "cells", "--cells", str(path), "--out", str(out), "--mpp", "0.5",
                                  "--epochs", "2", "--folds", "2", "--trials", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    part = load_bundle(out).part("cells")
    cv = part["metrics"]["cross_validation"]
    assert cv["folds"] == 2 and set(cv["oof_auroc"]) == set(HEADS) and len(cv["per_fold"]) == 2
    assert part["metrics"]["search"]["trials"] == 2 and "head_layers" in part["metrics"]["search"]["best"]
    assert str(path) in part["provenance"]["source"] and part["provenance"]["backbone_weights"].startswith("none")
    # transfer learning from weights on disk: the backbone of the bundle just trained
    r = CliRunner().invoke(main, ["train", "cells", "--cells", str(path), "--out", str(tmp_path / "b2"), "--mpp", "0.5",
                                  "--epochs", "1", "--backbone-weights", str(out / "cells.safetensors")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert load_bundle(tmp_path / "b2").part("cells")["provenance"]["backbone_weights"] == "cells.safetensors"


def test_bad_cell_csv_names_the_line(labelled, tmp_path):
    root, path, rows = labelled
    bad = tmp_path / "bad.csv"
    text = path.read_text().splitlines()
    text[3] = text[3].replace(",yes,", ",maybe,").replace(",no,", ",maybe,")
    bad.write_text("\n".join(text) + "\n")
    r = CliRunner().invoke(main, ["train", "cells", "--cells", str(bad), "--images", str(root), "--out",
                                  str(tmp_path / "b"), "--epochs", "1"])
    assert r.exit_code == 2 and "line 4" in r.output and "maybe" in r.output
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("image,x0,y0,x1,y1\nx.png,1,2,3,4\n")
    r = CliRunner().invoke(main, ["train", "cells", "--cells", str(wrong), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "no label column" in r.output
