"""Detector training from pictures: VOC/VIA sources, propose -> edit -> train, evaluation, weights, search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.conftest import testdata
from workers.bundle import BundleError, load_bundle
from workers.detector import DetectorConfig, build_detector
from wsi_apl.cli import main


def _pictures(folder: Path, n: int = 6, seed: int = 0) -> list[tuple[str, list[list[int]]]]:
    """Small pictures of violet discs (cells) on a pale background, with their boxes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        h, w = 128, 160
        img = np.full((h, w, 3), 235, np.uint8)
        yy, xx = np.mgrid[0:h, 0:w]
        boxes = []
        for cx, cy in ((40, 40), (110, 50), (70, 95)):
            cx, cy, r = cx + int(rng.integers(-8, 9)), cy + int(rng.integers(-8, 9)), 12
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (95, 55, 150)
            boxes.append([cx - r, cy - r, cx + r, cy + r])
        name = f"pic_{i:02d}.png"
        Image.fromarray(img).save(folder / name)
        out.append((name, boxes))
    return out


def _via(path: Path, pics, label="cell") -> None:
    meta = {}
    for name, boxes in pics:
        regions = [{"shape_attributes": {"name": "rect", "x": b[0], "y": b[1], "width": b[2] - b[0],
                                         "height": b[3] - b[1]}, "region_attributes": {"label": label}}
                   for b in boxes]
        meta[name] = {"filename": name, "size": -1, "regions": regions, "file_attributes": {}}
    path.write_text(json.dumps(meta))


def _run(args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_propose_edit_train_round_trip(tmp_path):
    pics = _pictures(tmp_path / "imgs")
    _via(tmp_path / "round0.json", pics)
    bundle = tmp_path / "bundle"
    out = _run(["train", "detector", "--via", tmp_path / "round0.json", "--images", tmp_path / "imgs",
                "--out", bundle, "--epochs", "2", "--test-fraction", "0.2"])
    assert "18 boxes" in out
    b = load_bundle(bundle)
    assert not b.mpp_known and tuple(b.area_size) == (160, 128)
    with pytest.raises(BundleError, match="retrain with --mpp"):
        _ = b.mpp  # no physical scale: such a bundle cannot scan slides
    det = b.part("detector")
    assert det["config"]["mpp_known"] is False
    # anchors follow the annotated cells (24 px boxes) when the pictures have no pixel size
    assert det["config"]["cell_diameters_um"][1] == pytest.approx(25.0, abs=1.5)
    assert "test" in det["metrics"] and det["metrics"]["test"]["images"] >= 1
    assert det["provenance"]["init"] == "scratch"

    # propose: the detector's boxes as a VIA project a hematologist opens and corrects
    _run(["propose", tmp_path / "imgs", "--bundle", bundle, "--out", tmp_path / "proposed.json", "--score", "0.0"])
    project = json.loads((tmp_path / "proposed.json").read_text())
    assert "_via_img_metadata" in project and len(project["_via_img_metadata"]) == len(pics)

    # the hematologist's edit: every picture gets exactly the true cells, one picture loses one
    for entry in project["_via_img_metadata"].values():
        name = entry["filename"]
        boxes = dict(pics)[Path(name).name]
        if Path(name).name == "pic_00.png":
            boxes = boxes[:2]
        entry["regions"] = [{"shape_attributes": {"name": "rect", "x": b[0], "y": b[1], "width": 24, "height": 24},
                             "region_attributes": {"label": "cell", "score": ""}} for b in boxes]
    (tmp_path / "edited.json").write_text(json.dumps(project))
    out = _run(["train", "detector", "--via", tmp_path / "edited.json", "--images", tmp_path / "imgs",
                "--out", tmp_path / "bundle2", "--init", bundle, "--epochs", "1"])
    assert "17 boxes" in out
    assert load_bundle(tmp_path / "bundle2").part("detector")["provenance"]["init"] == str(bundle)
    # a round with a pixel size cannot continue from a detector that has none (its anchors are pixels)
    r = CliRunner().invoke(main, ["train", "detector", "--via", str(tmp_path / "edited.json"), "--images",
                                  str(tmp_path / "imgs"), "--out", str(tmp_path / "bundle3"), "--init", str(bundle),
                                  "--mpp", "0.5", "--epochs", "1"])
    assert r.exit_code == 2 and "train both rounds with --mpp or both without" in r.output

    # evaluation on annotated pictures: the contract's keys
    out = _run(["evaluate", "detector", "--bundle", tmp_path / "bundle2", "--via", tmp_path / "round0.json",
                "--images", tmp_path / "imgs", "--json"])
    m = json.loads(out)
    for k in ("AP50", "AP", "AR50", "AR", "images"):
        assert k in m
    assert m["images"] == len(pics) and len(m["per_image"]) == len(pics)


def test_bccd_white_cells_end_to_end(tmp_path):
    """Real photos with VOC boxes: --classes keeps the white cells, evaluation runs on the other pictures."""
    ann, jpg = testdata("bccd", "Annotations"), testdata("bccd", "JPEGImages")
    sub_ann, sub_img = tmp_path / "ann", tmp_path / "img"
    sub_ann.mkdir()
    sub_img.mkdir()
    for xml in sorted(ann.glob("*.xml"))[:5]:
        (sub_ann / xml.name).write_text(xml.read_text())
        name = xml.stem + ".jpg"
        (sub_img / name).write_bytes((jpg / name).read_bytes())
    out = _run(["train", "detector", "--voc", sub_ann, "--images", sub_img, "--classes", "WBC", "--out",
                tmp_path / "b", "--epochs", "1", "--test-fraction", "0"])
    assert "5 pictures" in out and "(classes WBC)" in out
    r = CliRunner().invoke(main, ["train", "detector", "--voc", str(sub_ann), "--images", str(sub_img),
                                  "--classes", "Neutrophil", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "labels found: Platelets, RBC, WBC" in r.output
    m = json.loads(_run(["evaluate", "detector", "--bundle", tmp_path / "b", "--voc", ann, "--images", jpg,
                         "--classes", "WBC", "--json"]))
    assert m["images"] == 60 and sum(p["truth"] for p in m["per_image"]) == 65


def test_backbone_weights_from_a_torchvision_file(tmp_path):
    from torchvision.models import mobilenet_v3_large

    from wsi_apl.train.detector import backbone_state_from_file

    ref = mobilenet_v3_large(weights=None)
    torch.save(ref.state_dict(), tmp_path / "mobilenet_v3_large-test.pth")
    cfg = DetectorConfig()
    state, note = backbone_state_from_file(cfg, tmp_path / "mobilenet_v3_large-test.pth")
    model = build_detector(cfg)
    model.load_state_dict(state, strict=False)
    assert torch.equal(model.backbone.body["0"][0].weight, ref.features[0][0].weight)
    assert "in the backbone body" in note and len(state) > 100
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="junk.pth"):
        backbone_state_from_file(cfg, tmp_path / "junk.pth")


def test_optuna_search_keeps_the_best_trial(tmp_path):
    from wsi_apl.annotations import read_via
    from wsi_apl.train.data import image_samples
    from wsi_apl.train.detector import search_detector

    pics = _pictures(tmp_path / "imgs", n=4)
    _via(tmp_path / "a.json", pics)
    s = image_samples(read_via(tmp_path / "a.json", tmp_path / "imgs"))
    cfg = DetectorConfig(mpp=1.0, mpp_known=False, cell_diameters_um=(12.0, 24.0, 48.0, 96.0))
    model, info = search_detector(s[:3], s[3:], cfg, trials=2, epochs=1, time_budget_s=None, log=lambda _: None)
    assert len(info["search"]) == 2 and set(info["params"]) == {"lr", "momentum", "weight_decay", "schedule"}
    assert info["best"]["AP50"] == max(t["AP50"] for t in info["search"] if t["AP50"] is not None)


def test_area_input_is_not_downscaled_at_the_paper_size():
    """A 2560x1920 area reaches the backbone at 2560x1920 (torchvision would shrink it to ~1067x800)."""
    cfg = DetectorConfig(mpp=0.125)
    model = build_detector(cfg).eval()
    images, _ = model.transform([torch.zeros(3, 1920, 2560)])
    assert tuple(images.tensors.shape[-2:]) == (1920, 2560) and images.image_sizes[0] == (1920, 2560)


def test_detection_capacity_grows_with_large_pictures():
    """An area keeps the >= 1000 cap; a picture 25x larger may hold more cells than that."""
    from workers.detector import capacity, set_capacity

    cfg = DetectorConfig(mpp=0.5)
    assert capacity(cfg, (384, 512)) == 1000
    model = build_detector(cfg)
    set_capacity(model, cfg, (1920, 2560))
    assert model.roi_heads.detections_per_img > 3000
    assert model.rpn._post_nms_top_n["testing"] >= 2 * model.roi_heads.detections_per_img
