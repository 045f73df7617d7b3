"""`wsi-apl export geojson|via`: QuPath GeoJSON in level-0 pixels, VIA 2 projects that the training readers take back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from wsi_apl.cli import main
from wsi_apl.export import OTHER, TYPE_HEADS, cell_class, export_geojson, find_slide
from wsi_apl.ledger import Ledger
from wsi_apl.store import read_slide_group, slide_groups, write_slide_group

HEADS = ("myeloblast", "promyelocyte", "auer_rod")


def test_cell_class_takes_the_highest_head_at_one_half():
    assert cell_class({"promyelocyte": 0.7, "myeloblast": 0.9, "auer_rod": 0.2}) == "myeloblast"
    assert cell_class({"promyelocyte": 0.5, "myeloblast": 0.49, "auer_rod": 0.1}) == "promyelocyte"
    assert cell_class({"promyelocyte": 0.4, "myeloblast": 0.3, "auer_rod": 0.45}) == OTHER
    assert cell_class({"promyelocyte": 0.6, "auer_rod": 0.95}) == "auer_rod"
    assert cell_class({"promyelocyte": 0.6, "auer_rod": 0.95}, TYPE_HEADS) == "promyelocyte"


def _hand_made(tmp_path):
    """A results folder with one stored slide: three cells, one area reaching past the slide's right edge."""
    res = tmp_path / "res"
    fp = "ab" * 32
    cols = {"area": np.zeros(3, np.int32), "box_l0": np.array([[10, 20, 30, 44], [990, 5, 1010, 25], [0, 0, 8, 8]],
                                                              np.float32),
            "box_px": np.array([[5, 10, 15, 22], [495, 2.5, 505, 12.5], [0, 0, 4, 4]], np.float32),
            "score": np.array([0.9, 0.8, 0.7], np.float32), "cut": np.array([False, True, False]),
            "p_promyelocyte": np.array([0.8, 0.1, 0.2], np.float32), "p_myeloblast": np.array([0.6, 0.2, 0.1], np.float32),
            "p_auer_rod": np.array([0.1, 0.7, 0.3], np.float32), "diameter_um": np.array([14.0, np.nan, 9.0], np.float32)}
    attrs = {"areas": [{"rank": 1, "box": [500, 0, 1012, 384], "mpp": 0.5, "size": [256, 192],
                        "scores": {"focus": 0.8, "cells": 3}, "why": "x"}],
             "slide": {"levels": [{"width": 1000, "height": 800, "downsample": 1.0}], "mpp": [0.25, 0.25]},
             "result": {"status": "flagged", "suspicion": 0.9}}
    write_slide_group(res, "s1-abababab", cols, attrs)
    led = Ledger(res)
    led.see_file("/lab/slides/Doe John.svs", "Doe John.svs", fp)
    led.start(fp, "b", 123)
    led.finish(fp, "flagged", {"status": "flagged"}, "s1-abababab")
    led.close()
    return res, fp


def test_geojson_of_a_stored_slide(tmp_path):
    res, fp = _hand_made(tmp_path)
    (path,) = export_geojson(res, tmp_path / "out")
    g = json.loads(path.read_text())
    assert path.name == "s1-abababab.geojson" and g["type"] == "FeatureCollection"
    det = [f for f in g["features"] if f["properties"]["objectType"] == "detection"]
    ann = [f for f in g["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(det) == 3 and len(ann) == 1
    assert [f["properties"]["classification"]["name"] for f in det] == ["promyelocyte", "auer_rod", OTHER]
    assert det[0]["geometry"] == {"type": "Polygon", "coordinates": [[[10, 20], [30, 20], [30, 44], [10, 44], [10, 20]]]}
    # clipped to the slide (1000 x 800): the cell and the area past the right edge end at x = 1000
    assert det[1]["geometry"]["coordinates"][0][1] == [1000, 5]
    assert ann[0]["geometry"]["coordinates"][0] == [[500, 0], [1000, 0], [1000, 384], [500, 384], [500, 0]]
    assert ann[0]["properties"]["classification"]["name"] == "wsi-apl area 1" and ann[0]["properties"]["isLocked"]
    m = det[0]["properties"]["measurements"]
    assert m["p_promyelocyte"] == pytest.approx(0.8) and m["detector_score"] == pytest.approx(0.9)
    assert m["diameter_um"] == pytest.approx(14.0) and m["area_rank"] == 1.0 and m["touches_area_border"] == 0.0
    assert "diameter_um" not in det[1]["properties"]["measurements"]  # NaN is left out, never written
    assert len({f["id"] for f in g["features"]}) == 4
    text = path.read_text()
    assert g["wsi_apl"]["slide"] == "Doe John.svs" and "/lab/slides" not in text  # the name as listed, never the path
    # the slide by file name or fingerprint prefix
    assert find_slide(res, "Doe John.svs").fingerprint == fp == find_slide(res, "ababab").fingerprint
    with pytest.raises(ValueError, match="at least 6"):
        find_slide(res, "abab")


def test_cell_tables_in_parquet_and_csv(tmp_path):
    import pandas as pd

    res, _fp = _hand_made(tmp_path)
    r = CliRunner().invoke(main, ["export", "cells", str(res), "--out", str(tmp_path / "pq")])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "pq" / "s1-abababab.cells.parquet")
    assert len(df) == 3 and "crops" not in df
    assert list(df["slide"]) == ["Doe John.svs"] * 3 and list(df["cell"]) == [0, 1, 2]
    assert list(df["area"]) == [1, 1, 1]                       # numbered from 1, as the report and QuPath do
    assert df["box_l0_x1"].tolist() == [30, 1010, 8] and df["box_px_y1"].tolist() == [22, 12.5, 4]
    assert df["p_auer_rod"].tolist() == pytest.approx([0.1, 0.7, 0.3]) and df["cut"].tolist() == [False, True, False]
    assert np.isnan(df["diameter_um"][1])
    r = CliRunner().invoke(main, ["export", "cells", str(res), "--slide", "ababab", "--format", "csv",
                                  "--out", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    back = pd.read_csv(tmp_path / "csv" / "s1-abababab.cells.csv")
    assert back.columns.tolist() == df.columns.tolist() and back["score"].tolist() == pytest.approx([0.9, 0.8, 0.7])
    r = CliRunner().invoke(main, ["export", "cells", str(res), "--slide", "nobody", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no slide 'nobody'" in r.output


def test_geojson_of_a_scan(scanned, tmp_path):
    res = scanned.results
    r = CliRunner().invoke(main, ["export", "geojson", str(res), "--out", str(tmp_path / "all")])
    assert r.exit_code == 0, r.output
    groups = slide_groups(res)
    assert len(groups) == 2 and "2 slide(s) exported" in r.output
    total = 0
    for group in groups:
        cols, attrs = read_slide_group(res, group)
        g = json.loads((tmp_path / "all" / f"{group}.geojson").read_text())
        assert g["type"] == "FeatureCollection"
        det = [f for f in g["features"] if f["properties"]["objectType"] == "detection"]
        ann = [f for f in g["features"] if f["properties"]["objectType"] == "annotation"]
        assert len(det) == len(cols["box_l0"]) and len(ann) == len(attrs["areas"])
        total += len(det)
        w, h = attrs["slide"]["levels"][0]["width"], attrs["slide"]["levels"][0]["height"]
        for f in g["features"]:
            ring = f["geometry"]["coordinates"][0]
            assert f["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
            assert all(0 <= x <= w and 0 <= y <= h for x, y in ring), (group, ring)
        for i, f in enumerate(det):
            probs = {hd: float(cols[f"p_{hd}"][i]) for hd in HEADS}
            assert f["properties"]["classification"]["name"] == cell_class(probs)
            assert f["properties"]["measurements"]["p_promyelocyte"] == pytest.approx(probs["promyelocyte"], abs=1e-6)
            _, _, x1, y1 = (float(v) for v in cols["box_l0"][i])
            assert f["geometry"]["coordinates"][0][2] == pytest.approx([min(x1, w), min(y1, h)], abs=0.01)
        assert str(scanned.slides) not in json.dumps(g)
    assert total > 0
    # one slide, by file name or by the first digits of its fingerprint (as triage.csv lists them)
    name = next(n for n, d in scanned.diagnosis.items() if d == "apl")
    ref = find_slide(res, name)
    r1 = CliRunner().invoke(main, ["export", "geojson", str(res), "--slide", name, "--out", str(tmp_path / "one")])
    r2 = CliRunner().invoke(main, ["export", "geojson", str(res), "--slide", ref.fingerprint[:10],
                                   "--out", str(tmp_path / "two")])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert [p.name for p in (tmp_path / "one").iterdir()] == [f"{ref.group}.geojson"]
    assert (tmp_path / "one" / f"{ref.group}.geojson").read_text() == (tmp_path / "two" / f"{ref.group}.geojson").read_text()
    r3 = CliRunner().invoke(main, ["export", "geojson", str(res), "--slide", "nope.svs", "--out", str(tmp_path / "x")])
    assert r3.exit_code == 2 and "'nope.svs'" in r3.output and "triage.csv" in r3.output and "fingerprint" in r3.output


def test_via_round_trip(scanned, tmp_path):
    """The areas as pictures and the cells as a VIA project, read back by the readers of `train ... --via`."""
    from wsi_apl.annotations import read_via
    from wsi_apl.train.cell_labels import read_via_cells
    from wsi_apl.train.steps import picture_samples

    res = scanned.results
    name = next(n for n, d in scanned.diagnosis.items() if d == "apl")
    ref = find_slide(res, name)
    cols, attrs = read_slide_group(res, ref.group)
    out = tmp_path / "via"
    r = CliRunner().invoke(main, ["export", "via", str(res), "--slide", name, "--out", str(out)])
    assert r.exit_code == 0, r.output
    project = out / f"{ref.group}.via.json"
    areas = attrs["areas"]
    assert sorted(p.name for p in out.glob("*.png")) == [f"{ref.group}_area{a['rank']:02d}.png" for a in areas]
    text = project.read_text()
    assert str(scanned.slides) not in text  # the slide's name, never its path
    items = read_via(project)
    assert [it.image.name for it in items] == [f"{ref.group}_area{a['rank']:02d}.png" for a in areas]
    mpp = float(areas[0]["mpp"])
    expect_types, expect_auer, n = [], [], 0
    for it, a in zip(items, areas, strict=True):
        from PIL import Image

        with Image.open(it.image) as im:
            assert im.size == tuple(a["size"])
        rows = np.flatnonzero(cols["area"] == a["rank"] - 1)
        want = np.clip(cols["box_px"][rows], 0, [a["size"][0], a["size"][1]] * 2)
        assert it.boxes.shape == (len(rows), 4)
        np.testing.assert_allclose(it.boxes, want[((want[:, 2] - want[:, 0]) >= 1) & ((want[:, 3] - want[:, 1]) >= 1)],
                                   atol=0.06)
        types = [cell_class({h: float(cols[f"p_{h}"][i]) for h in TYPE_HEADS}, TYPE_HEADS) for i in rows]
        assert it.labels == types and it.group == name  # no case: the slide's name groups its pictures
        expect_types += types
        expect_auer += [float(cols["p_auer_rod"][i] >= 0.5) for i in rows]
        n += len(rows)
    assert n == len(cols["box_l0"]) and n > 0
    cells = read_via_cells(project, None, HEADS, mpp, mpp, log=lambda s: None)
    assert len(cells) == n
    y = {h: cells.labels[:, j] for j, h in enumerate(HEADS)}
    np.testing.assert_array_equal(y["promyelocyte"], [float(t == "promyelocyte") for t in expect_types])
    np.testing.assert_array_equal(y["myeloblast"], [float(t == "myeloblast") for t in expect_types])
    np.testing.assert_array_equal(y["auer_rod"], expect_auer)
    samples = picture_samples(project, None, None, None, mpp, mpp, log=lambda s: None)
    assert len(samples) == len(areas) and sum(len(s.boxes) for s in samples) == n
    # a slide without stored cells cannot be exported; a slide that is not there is named
    r = CliRunner().invoke(main, ["export", "via", str(res), "--slide", "0000000000", "--out", str(out)])
    assert r.exit_code == 2 and "'0000000000'" in r.output
