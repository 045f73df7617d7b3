"""Cell box annotations: VIA 2 / VIA 3 / Pascal VOC readers, class filter and the VIA 2 writer."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tests.conftest import testdata
from wsi_apl.annotations import ImageAnnotation, filter_classes, read_via, read_voc, write_via

ELLIPSE_THETA = math.pi / 6  # rx=20, ry=10 rotated 30 deg: half-widths sqrt(325), sqrt(175)
HX, HY = math.sqrt(400 * 0.75 + 100 * 0.25), math.sqrt(400 * 0.25 + 100 * 0.75)


def _png(path, w=200, h=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), "white").save(path)
    return path


def _rect(x, y, w, h, **attrs):
    return {"shape_attributes": {"name": "rect", "x": x, "y": y, "width": w, "height": h},
            "region_attributes": attrs}


def _via2_export(name_a="a.png", name_b="b.png"):
    """Image a: list regions of every shape; image b: VIA 1.x dict regions."""
    a_regions = [
        _rect(10, 20, 30, 40, **{"class": "blast", "auer_rod": "0"}),
        {"shape_attributes": {"name": "circle", "cx": 50, "cy": 50, "r": 10},
         "region_attributes": {"note": "x", "Type": "promyelocyte"}},
        {"shape_attributes": {"name": "ellipse", "cx": 100, "cy": 50, "rx": 20, "ry": 10, "theta": ELLIPSE_THETA},
         "region_attributes": {"label": "myelocyte"}},
        {"shape_attributes": {"name": "polygon", "all_points_x": [150, 170, 160], "all_points_y": [10, 30, 50]},
         "region_attributes": {"findings": {"auer_rod": True, "faggot": True, "granules": False}}},
        {"shape_attributes": {"name": "point", "cx": 5, "cy": 5}, "region_attributes": {"label": "blast"}},
        _rect(190, 90, 30, 30, label="clipped"),  # runs off the 200 x 100 image
        _rect(199.5, 10, 5, 5, label="sliver"),  # 0.5 px wide after clipping: dropped
    ]
    b_regions = {str(i): _rect(10 * i, 5, 8, 8, a="1", b="2") for i in (0, 1, 10, 2)}
    return {
        f"{name_a}123": {"filename": name_a, "size": 123, "regions": a_regions,
                         "file_attributes": {"Patient_ID": "P7", "stain": "MGG"}},
        f"{name_b}45": {"filename": name_b, "size": 45, "regions": b_regions, "file_attributes": {}},
    }


def _check_image_a(a):
    assert a.labels == ["blast", "promyelocyte", "myelocyte", "auer_rod+faggot", "clipped"]
    assert a.boxes.dtype == np.float32 and a.boxes.shape == (5, 4)
    np.testing.assert_allclose(a.boxes[0], [10, 20, 40, 60])
    np.testing.assert_allclose(a.boxes[1], [40, 40, 60, 60])
    np.testing.assert_allclose(a.boxes[2], [100 - HX, 50 - HY, 100 + HX, 50 + HY], atol=1e-4)
    np.testing.assert_allclose(a.boxes[3], [150, 10, 170, 50])
    np.testing.assert_allclose(a.boxes[4], [190, 90, 200, 100])
    assert a.attributes[0] == {"class": "blast", "auer_rod": "0"}
    assert a.attributes[3] == {"findings": "auer_rod+faggot"}
    assert a.group == "P7" and a.file_attributes == {"Patient_ID": "P7", "stain": "MGG"}


def test_via2_export_all_shapes_relative_to_json(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "export.json").write_text(json.dumps(_via2_export()))
    with pytest.warns(UserWarning, match=r"1 x point shape.*1 x degenerate|1 x degenerate.*1 x point"):
        a, b = read_via(tmp_path / "export.json")
    assert a.image == (tmp_path / "a.png").resolve()
    _check_image_a(a)
    # dict regions keep numeric order "0", "1", "2", "10"; two non-label attributes: no label
    np.testing.assert_allclose(b.boxes[:, 0], [0, 10, 20, 100])
    assert b.labels == [""] * 4 and b.attributes[0] == {"a": "1", "b": "2"}
    assert b.group == "b" and b.file_attributes == {}


def test_via2_project_images_dir_and_basename(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    meta = _via2_export("scans/a.png", "b.png")  # stored with a folder that does not exist
    project = {"_via_settings": {}, "_via_img_metadata": meta, "_via_attributes": {"region": {}, "file": {}},
               "_via_data_format_version": "2.0.10", "_via_image_id_list": list(meta)[::-1]}
    (tmp_path / "ann" / "project.json").parent.mkdir()
    (tmp_path / "ann" / "project.json").write_text(json.dumps(project))
    with pytest.warns(UserWarning):
        b, a = read_via(tmp_path / "ann" / "project.json", images_dir=tmp_path / "imgs")
    assert a.image == (tmp_path / "imgs" / "a.png").resolve() and b.image.name == "b.png"
    _check_image_a(a)


def test_via3_project(tmp_path):
    _png(tmp_path / "c.png")
    project = {
        "project": {"pid": "__VIA_PROJECT_ID__", "pname": "cells", "vid_list": ["1"]},
        "config": {"file": {"loc_prefix": {"1": "", "2": "", "3": "", "4": ""}}, "ui": {}},
        "attribute": {
            "1": {"aname": "cell_type", "anchor_id": "FILE1_Z0_XY1", "type": 4,
                  "options": {"1": "blast", "2": "promyelocyte"}, "default_option_id": ""},
            "2": {"aname": "findings", "anchor_id": "FILE1_Z0_XY1", "type": 2,
                  "options": {"a": "auer rod", "f": "faggot"}, "default_option_id": ""},
            "3": {"aname": "Patient", "anchor_id": "FILE1_Z0_XY0", "type": 1, "options": {}},
        },
        "file": {"1": {"fid": 1, "fname": "c.png", "type": 2, "loc": 1, "src": ""}},
        "view": {"1": {"fid_list": [1]}},
        "metadata": {
            "m1": {"vid": "1", "flg": 0, "z": [], "xy": [2, 10, 10, 20, 20], "av": {"1": "2"}},
            "m2": {"vid": "1", "flg": 0, "z": [], "xy": [3, 50, 50, 5], "av": {"1": "1", "2": "a,f"}},
            "m3": {"vid": "1", "flg": 0, "z": [], "xy": [4, 100, 50, 20, 10], "av": {"1": "1"}},
            "m4": {"vid": "1", "flg": 0, "z": [], "xy": [4, 100, 50, 20, 10, ELLIPSE_THETA], "av": {}},
            "m5": {"vid": "1", "flg": 0, "z": [], "xy": [7, 150, 10, 170, 30, 160, 50], "av": {"2": "f"}},
            "m6": {"vid": "1", "flg": 0, "z": [], "xy": [], "av": {"3": "P9"}},
            "m7": {"vid": "1", "flg": 0, "z": [], "xy": [1, 5, 5], "av": {"1": "1"}},
            "m8": {"vid": "1", "flg": 0, "z": [], "xy": [9, 0, 10, 10, 0, 20, 10], "av": {"1": "1"}},
        },
    }
    (tmp_path / "via3.json").write_text(json.dumps(project))
    with pytest.warns(UserWarning, match="1 x point shape"):
        (c,) = read_via(tmp_path / "via3.json")
    assert c.image == (tmp_path / "c.png").resolve()
    assert c.labels == ["promyelocyte", "blast", "blast", "", "faggot", "blast"]
    assert c.attributes[1] == {"cell_type": "blast", "findings": "auer rod+faggot"}
    np.testing.assert_allclose(c.boxes, [[10, 10, 30, 30], [45, 45, 55, 55], [80, 40, 120, 60],
                                         [100 - HX, 50 - HY, 100 + HX, 50 + HY], [150, 10, 170, 50],
                                         [0, 0, 20, 20]], atol=1e-4)
    assert c.file_attributes == {"Patient": "P9"} and c.group == "P9"


def test_voc_bccd_counts_and_filter():
    ann = testdata("bccd", "Annotations")
    items = read_voc(ann)  # images found in the sibling JPEGImages folder
    assert len(items) == 60
    assert Counter(lab for it in items for lab in it.labels) == {"RBC": 947, "WBC": 65, "Platelets": 81}
    first = items[0]
    assert first.image == (ann.parent / "JPEGImages" / "BloodImage_00000.jpg").resolve()
    assert first.group == "BloodImage_00000"
    np.testing.assert_array_equal(first.boxes[0], [260, 177, 491, 376])  # kept 1-based, as given
    assert first.labels[0] == "WBC" and first.attributes[0]["difficult"] == "0"
    assert all(it.boxes.shape == (len(it.labels), 4) for it in items)
    wbc = filter_classes(items, ["wbc"])
    assert len(wbc) == 60 and sum(len(it.boxes) for it in wbc) == 65
    assert {lab for it in wbc for lab in it.labels} == {"WBC"}
    assert sum(len(it.boxes) for it in filter_classes(items, None)) == 947 + 65 + 81
    assert read_voc(ann, images_dir=ann.parent / "JPEGImages")[0].image == first.image


def test_missing_image_and_bad_files(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps({"x.png1": {"filename": "nope.png", "size": 1, "regions": []}}))
    with pytest.raises(FileNotFoundError) as e:
        read_via(tmp_path / "ann.json")
    assert "ann.json" in str(e.value) and "nope.png" in str(e.value) and "--images" in str(e.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_via(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json.*expected"):
        read_via(tmp_path / "list.json")
    _png(tmp_path / "p.png")
    (tmp_path / "rect.json").write_text(json.dumps({"k": {"filename": "p.png", "regions": [
        {"shape_attributes": {"name": "rect", "x": 1}, "region_attributes": {}}]}}))
    with pytest.raises(ValueError, match="rect.json"):
        read_via(tmp_path / "rect.json")
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "x.xml").write_text("<annotation><filename>p.png</filename><object>")
    with pytest.raises(ValueError, match="x.xml"):
        read_voc(tmp_path / "voc")


def test_write_via_round_trip_with_scores(tmp_path):
    img = _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png", 50, 40)
    items = [
        ImageAnnotation(img, np.array([[10.4, 20.6, 40.2, 60.5], [1.5, 2.5, 2.5, 3.5]], np.float32),
                        ["blast", "promyelocyte"], [{"Type": "old", "auer_rod": "1"}, {}], "P1", {"patient": "P1"}),
        ImageAnnotation(tmp_path / "imgs" / "b.png", np.zeros((0, 4), np.float32), [], [], "b", {}),
    ]
    out = tmp_path / "out" / "pred.json"
    write_via(out, items, scores=[np.array([0.91234, 0.5]), np.zeros(0)])
    project = json.loads(out.read_text())
    assert project["_via_data_format_version"] == "2.0.10"
    key = f"a.png{img.stat().st_size}"
    assert project["_via_image_id_list"][0] == key
    reg = project["_via_img_metadata"][key]["regions"]
    assert reg[0]["shape_attributes"] == {"name": "rect", "x": 10, "y": 21, "width": 30, "height": 40}
    assert reg[1]["shape_attributes"] == {"name": "rect", "x": 2, "y": 3, "width": 1, "height": 1}  # half-up
    assert set(project["_via_attributes"]["region"]) >= {"label", "score"}
    back = read_via(out, images_dir=tmp_path / "imgs")
    assert [b.image for b in back] == [img.resolve(), (tmp_path / "imgs" / "b.png").resolve()]
    np.testing.assert_allclose(back[0].boxes, items[0].boxes, atol=0.5 + 1e-6)
    assert back[0].labels == ["blast", "promyelocyte"] and back[1].boxes.shape == (0, 4)
    assert back[0].attributes[0] == {"label": "blast", "Type": "old", "auer_rod": "1", "score": "0.9123"}
    assert back[0].group == "P1"
    # JSON beside the images: filenames relative to it, no images_dir needed
    write_via(tmp_path / "pred2.json", items)
    assert json.loads((tmp_path / "pred2.json").read_text())["_via_image_id_list"][0].startswith("imgs/a.png")
    assert read_via(tmp_path / "pred2.json")[0].labels == ["blast", "promyelocyte"]
    with pytest.raises(ValueError, match="scores"):
        write_via(out, items, scores=[np.zeros(1), np.zeros(0)])


def test_image_size_survives_pil_bomb_limit(tmp_path, monkeypatch):
    _png(tmp_path / "a.png")
    (tmp_path / "a.json").write_text(json.dumps({"k": {"filename": "a.png", "regions": [_rect(150, 50, 100, 100)]}}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # like a 20000 x 15000 px slide
    (a,) = read_via(tmp_path / "a.json")
    np.testing.assert_allclose(a.boxes, [[150, 50, 200, 100]])
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_reads_synthetic_cohort_via_project(tmp_path):
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["apl"], seed=1, mpp=0.25, size=(1200, 900))
    via = tmp_path / "truth" / "via_project.json"
    with pytest.raises(FileNotFoundError, match="--images"):  # the project sits in truth/, the slides one up
        read_via(via)
    (item,) = read_via(via, images_dir=tmp_path)
    truth = json.loads((tmp_path / "truth" / "slide_0001_000.json").read_text())
    assert item.image == (tmp_path / "slide_0001_000.tiff").resolve()
    assert item.labels == [c["type"] for c in truth["cells"]]
    np.testing.assert_allclose(item.boxes, [c["box"] for c in truth["cells"]], atol=0.1)
    assert [a["auer_rod"] == "1" for a in item.attributes] == [bool(c["auer_rod"]) for c in truth["cells"]]
    assert item.file_attributes == {"patient": truth["patient"], "diagnosis": "apl"}
    assert item.group == truth["patient"]
