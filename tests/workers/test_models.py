"""Bundles, detector, classifier, crops and morphometrics (tiny, CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from workers.bundle import BundleError, create_bundle, load_bundle, save_part
from workers.classifier import CellClassifier, CellConfig, classify
from workers.crops import extract_crops, morphometrics
from workers.detector import DetectorConfig, build_detector, detect


def _disc_image(size=(240, 320), centres=((100, 80), (200, 150)), radius_px=12, colour=(90, 50, 140)):
    h, w = size
    img = np.full((h, w, 3), 240, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for cx, cy in centres:
        m = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius_px ** 2
        img[m] = colour
    return img


def test_bundle_parts_hashes_and_verify(tmp_path):
    b = create_bundle(tmp_path / "b", name="t", mpp=0.5, area_size=(64, 48), heads=["x"], synthetic=True)
    b = save_part(b, "cells", {"w": torch.arange(4.0)}, config={"a": 1}, metrics={"auroc": 0.9})
    b2 = load_bundle(tmp_path / "b")
    assert b2.synthetic and "synthetic" in b2.label
    assert b2.part("cells")["sha256"] == b.part("cells")["sha256"]
    assert torch.equal(b2.load_tensors("cells")["w"], torch.arange(4.0))
    id_before = b2.id
    # changing a weight file is detected; the id follows the weights
    f = tmp_path / "b" / "cells.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(tmp_path / "b")
    assert load_bundle(tmp_path / "b", verify=False).verify()
    save_part(load_bundle(tmp_path / "b", verify=False), "cells", {"w": torch.ones(4)}, config={"a": 1})
    assert load_bundle(tmp_path / "b").id != id_before
    with pytest.raises(BundleError, match="no detector"):
        load_bundle(tmp_path / "b").require("detector")
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["parts"]["cells"]["file"] == "cells.safetensors"


def test_a_failed_save_leaves_the_bundle_as_it_was(tmp_path, monkeypatch):
    """Weights and bundle.json go through unique temporary files, fsync'd and renamed: a save that
    fails half-way leaves the old weights, the old bundle.json and no temporary file."""
    import os

    import workers.bundle as wb

    b = create_bundle(tmp_path / "b", name="t", mpp=0.5, area_size=(64, 48), heads=["x"], synthetic=False)
    b = save_part(b, "cells", {"w": torch.arange(4.0)}, config={"a": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(wb.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wb.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_part(b, "cells", {"w": torch.ones(4)}, config={"a": 2})
    assert synced, "the weights must reach the disk before they are renamed into place"
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before
    monkeypatch.undo()
    assert torch.equal(load_bundle(tmp_path / "b").load_tensors("cells")["w"], torch.arange(4.0))


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_detector_sees_the_area_at_native_resolution():
    cfg = DetectorConfig(mpp=0.5, max_detections=1000)
    model = build_detector(cfg).eval()
    seen = {}

    def hook(module, inputs, output):
        seen["shape"] = tuple(inputs[0].shape)

    model.backbone.register_forward_hook(hook)
    img = _disc_image((480, 640))
    boxes, scores, cut = detect(model, img, cfg, score_threshold=0.0)
    # no resize: the network's input is the area itself (padded to a multiple of 32 only)
    assert seen["shape"][-2:] == (480, 640)
    assert model.roi_heads.detections_per_img >= 1000
    assert boxes.shape[1] == 4 and len(scores) == len(boxes) == len(cut)
    # anchors are cell diameters at the bundle mpp: 6 µm at 0.5 µm/px = 12 px
    sizes = model.rpn.anchor_generator.sizes
    assert sizes[0][0] == pytest.approx(12.0) and sizes[1][0] == pytest.approx(24.0)


def test_detector_learns_discs_quickly():
    """A few dozen steps on tiny images: the loss must fall (the training loop really trains)."""
    torch.manual_seed(0)
    cfg = DetectorConfig(mpp=0.5)
    model = build_detector(cfg)
    rng = np.random.default_rng(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(25):
        cs = [(int(rng.integers(20, 140)), int(rng.integers(20, 100))) for _ in range(3)]
        img = _disc_image((128, 160), cs, radius_px=10)
        boxes = torch.tensor([[x - 10, y - 10, x + 10, y + 10] for x, y in cs], dtype=torch.float32)
        x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
        loss = sum(model([x], [{"boxes": boxes, "labels": torch.ones(3, dtype=torch.int64)}]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_classifier_heads_and_batches():
    cfg = CellConfig(crop_px=32, width=8)
    model = CellClassifier(cfg)
    crops = np.random.default_rng(0).integers(0, 255, (70, 32, 32, 3), dtype=np.uint8)
    p = classify(model, crops, batch_size=16)
    assert p.shape == (70, 3) and np.all((p >= 0) & (p <= 1))
    # batching does not change the result
    assert np.allclose(p, classify(model, crops, batch_size=70), atol=1e-5)


def test_crops_keep_physical_size_and_pad_borders():
    img = _disc_image((240, 320), ((10, 10), (200, 150)), radius_px=12)
    crops = extract_crops(img, np.array([[10.0, 10.0], [200.0, 150.0]]), context_px=64, out_px=32)
    assert crops.shape == (2, 32, 32, 3)
    # the border cell is padded with white, not dropped
    assert (crops[0, :5, :5] > 230).all()
    # the disc is 24 px across in a 64 px context: 12 px of the 32 px crop
    dark = (crops[1].mean(axis=2) < 150).sum(axis=1)
    assert 10 <= dark.max() <= 14


def test_crops_from_a_finer_cell_read_show_the_same_cells():
    """Areas read a second time at the crops' finer pixel size: the centres follow, the crops show
    the same cell at the same physical size (twice the pixels)."""
    from PIL import Image

    from workers.area import cell_read
    from wsi_apl.train.cells import CellSet
    from wsi_apl.train.data import AreaSample

    cfg = CellConfig(heads=("myeloblast",))
    assert cfg.crop_px == 128 and cell_read(cfg, 0.5, (320, 240)) == (640, 480)
    assert cell_read(CellConfig(crop_px=64), 0.5, (320, 240)) is None  # bundles before finer crops: one read
    fine = _disc_image((480, 640), ((400, 300),), radius_px=24)
    coarse = np.asarray(Image.fromarray(fine).resize((320, 240), Image.Resampling.LANCZOS))
    box = np.array([[188.0, 138.0, 212.0, 162.0]], np.float32)
    s = AreaSample("s", "p", "aml", coarse, box, ["myeloblast"], np.zeros(1, bool), (0, 0, 640, 480))
    one = CellSet.from_samples([s], cfg.heads, 0.5)
    two = CellSet.from_samples([AreaSample(**{**s.__dict__, "cell_image": fine})], cfg.heads, 0.5)
    assert one.mpp == 0.5 and two.mpp == 0.25 and np.allclose(two.centres, [[400.0, 300.0]])
    a, b = one.crops(cfg)[0].astype(float), two.crops(cfg)[0].astype(float)
    dark_a, dark_b = (a.mean(axis=2) < 165).sum(), (b.mean(axis=2) < 165).sum()
    # 12 µm across in a 32 µm crop either way: about 1/7 of the crop's area
    assert dark_b == pytest.approx(dark_a, rel=0.06) and dark_b / 128 ** 2 == pytest.approx(np.pi * 0.375 ** 2 / 4, rel=0.1)
    with pytest.raises(ValueError, match="finer"):
        CellSet.from_samples([s, AreaSample(**{**s.__dict__, "cell_image": fine})], cfg.heads, 0.5)


def test_morphometrics_of_a_known_disc():
    img = _disc_image((200, 200), ((100, 100),), radius_px=20)
    crops = extract_crops(img, np.array([[100.0, 100.0]]), context_px=64, out_px=64)
    m = morphometrics(crops, crop_mpp=0.5)
    # radius 20 px at 0.5 µm/px: 20 µm across, 314 µm²
    assert m["diameter_um"][0] == pytest.approx(20.0, rel=0.08)
    assert m["area_um2"][0] == pytest.approx(math.pi * 100, rel=0.15)
    assert m["eccentricity"][0] < 0.3
    assert 0.8 <= m["nc_ratio"][0] <= 1.0  # the disc is all "nucleus" colour
