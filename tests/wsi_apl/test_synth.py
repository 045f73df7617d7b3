"""The synthetic cohort generator: files readable by both readers, truth that matches the pixels."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
from scipy import ndimage

from tile_selector.slide import open_slide
from wsi_apl.synth.cohort import DIAGNOSES, draw_params, parse_diagnoses, synth_cohort


def test_cohort_files_labels_and_truth(small_cohort):
    rows = list(csv.DictReader((small_cohort / "labels.csv").open()))
    assert [r["diagnosis"] for r in rows] == ["apl", "aml", "healthy", "reactive"]
    assert len({r["patient"] for r in rows}) == 4
    for r in rows:
        s = open_slide(small_cohort / r["path"])
        assert s.mpp == pytest.approx(0.25) and s.dimensions == (4000, 3000)
        t = json.loads((small_cohort / "truth" / f"{r['slide']}.json").read_text())
        assert t["diagnosis"] == r["diagnosis"] and t["patient"] == r["patient"]
        assert len(t["cells"]) > 50
        c = t["cells"][0]
        assert {"box", "ellipse", "type", "auer_rod", "zone", "focus_um", "diameter_um"} <= set(c)
        maps = np.load(small_cohort / "truth" / t["maps"])
        assert maps["zones"].shape == (188, 250)  # 1000 x 750 µm at 4 µm/px
    via = json.loads((small_cohort / "truth" / "via_project.json").read_text())
    assert len(via["_via_img_metadata"]) == 4


def test_deterministic_per_seed(tmp_path):
    a = synth_cohort(tmp_path / "a", ["apl"], seed=7, mpp=0.5, size=(1200, 900))
    b = synth_cohort(tmp_path / "b", ["apl"], seed=7, mpp=0.5, size=(1200, 900))
    ha = hashlib.sha256((tmp_path / "a" / a[0].path).read_bytes()).hexdigest()
    hb = hashlib.sha256((tmp_path / "b" / b[0].path).read_bytes()).hexdigest()
    assert ha == hb


@pytest.mark.parametrize("dx", DIAGNOSES)
def test_compositions_follow_the_diagnosis(dx):
    rng = np.random.default_rng(1)
    for _ in range(30):
        p, info = draw_params(dx, rng)
        c = p.composition
        assert sum(c.values()) == pytest.approx(1.0, abs=1e-6)
        if dx == "healthy":
            assert c["myeloblast"] < 0.05 and 0.01 <= c["promyelocyte"] <= 0.08 and not p.auer_share
        elif dx == "aml":
            assert 0.2 <= c["myeloblast"] <= 0.9 and c["promyelocyte"] <= 0.15
        elif dx == "apl":
            assert 0.3 <= c["promyelocyte"] <= 0.9 and p.abnormal_promyelocytes
        else:
            assert c["promyelocyte"] + c["myelocyte"] <= 0.45 and not p.auer_share and c["promyelocyte"] >= 0.08


def test_parse_diagnoses():
    assert parse_diagnoses("apl:2,healthy:1") == ["apl", "apl", "healthy"]
    with pytest.raises(ValueError, match="unknown diagnosis"):
        parse_diagnoses("cml:1")


def test_rendered_pixels_match_the_truth(small_cohort):
    """Nuclei counted in the image agree with the ground truth; cell sizes match the stated µm."""
    t = json.loads((small_cohort / "truth" / "slide_0003_002.json").read_text())
    s = open_slide(small_cohort / "slide_0003_002.tiff")
    # a sharp monolayer window, found on the ground-truth zone and blur maps (4 µm/px)
    maps = np.load(small_cohort / "truth" / t["maps"])
    zones, blur = maps["zones"], maps["blur"].astype(np.float32)
    win = (600, 450)  # level-0 px: 150 x 112 µm
    wz = (int(win[0] * 0.25 / 4), int(win[1] * 0.25 / 4))
    good = ndimage.uniform_filter(((zones == 2) & (blur < 0.4)).astype(np.float32), size=(wz[1] + 2, wz[0] + 2))
    zy, zx = np.unravel_index(np.argmax(good), good.shape)
    assert good[zy, zx] > 0.99, "no sharp monolayer window on the test slide"
    cx, cy = (zx + 0.5) * 4 / 0.25, (zy + 0.5) * 4 / 0.25
    box = (int(cx) - win[0] // 2, int(cy) - win[1] // 2, int(cx) + win[0] // 2, int(cy) + win[1] // 2)
    img = s.read_area(box, win).image
    od = -np.log10(np.clip((img.astype(np.float32) + 1) / 256, 1e-3, 1))
    nuc = (od[..., 0] > 0.3) & (od[..., 1] > 0.6 * od[..., 0])
    nuc = ndimage.binary_closing(ndimage.binary_opening(nuc, iterations=2), iterations=3)
    lab, n = ndimage.label(nuc)
    sizes = np.bincount(lab.ravel())[1:] * 0.25 * 0.25
    counted = int((sizes > 8).sum())
    inside = [c for c in t["cells"] if box[0] <= (c["box"][0] + c["box"][2]) / 2 < box[2]
              and box[1] <= (c["box"][1] + c["box"][3]) / 2 < box[3]]
    truth = len(inside)
    assert truth > 5
    assert abs(counted - truth) <= max(2, 0.15 * truth), (counted, truth)
    # sizes: the truth box of each cell spans its stated diameter (µm) within 15 %
    for c in inside:
        w_um = (c["box"][2] - c["box"][0]) * 0.25
        h_um = (c["box"][3] - c["box"][1]) * 0.25
        assert max(w_um, h_um) == pytest.approx(c["diameter_um"], rel=0.15)


def test_cell_sizes_measured_in_the_image(medium_slide):
    """Isolated nucleated cells segmented from the pixels have the size the truth states, in µm."""
    from wsi_apl.synth.morphology import spec_for

    t = json.loads((medium_slide / "truth" / "slide_0005_000.json").read_text())
    s = open_slide(medium_slide / "slide_0005_000.tiff")
    mpp = 0.25
    cells = [c for c in t["cells"] if c["zone"] == "monolayer" and c["focus_um"] < 0.3 and c["type"] != "smudge"]
    rng = np.random.default_rng(0)
    checked, errors = 0, []
    for c in rng.permutation(len(cells))[:400]:
        c = cells[c]
        x0, y0, x1, y1 = c["box"]
        pad = 12
        box = (int(x0) - pad, int(y0) - pad, int(x1) + pad, int(y1) + pad)
        img = s.read_area(box, (box[2] - box[0], box[3] - box[1])).image
        od = -np.log10(np.clip((img.astype(np.float32) + 1) / 256, 1e-3, 1)).sum(axis=2)
        fg = od > np.percentile(od, 5) + 0.12
        lab, _ = ndimage.label(fg)
        cy, cx = img.shape[0] // 2, img.shape[1] // 2
        lid = lab[cy, cx]
        if lid == 0:
            continue
        comp = lab == lid
        ys, xs = np.nonzero(comp)
        if ys.min() == 0 or xs.min() == 0 or ys.max() == comp.shape[0] - 1 or xs.max() == comp.shape[1] - 1:
            continue  # touches a neighbour (red cell or another cell): not isolated
        _, _, a_px, b_px, _ = c["ellipse"]
        expected = 2 * np.sqrt(a_px * b_px) * mpp
        measured = 2 * np.sqrt(comp.sum() / np.pi) * mpp
        lo, hi = spec_for(c["type"], c["variant"]).diameter_um
        errors.append(abs(measured - expected) / expected)
        assert 0.8 * lo <= measured <= 1.1 * hi, (c["type"], measured, (lo, hi))
        checked += 1
    assert checked >= 30
    assert float(np.median(errors)) < 0.08 and float(np.percentile(errors, 90)) < 0.15


def test_each_pixel_is_blurred_by_the_sigma_its_truth_gives():
    """Generator 3: at a patch's fall-off a pixel is blurred by the truth's ``sigma * weight``, as a
    defocus would blur it. (Generator 2 blended the sharp image with the patch's full blur by the
    weight: its pixels there kept the sharp edges at reduced contrast, and the selector's benchmark
    counted them as blurred.) Measured with the selector's own focus measure on a field of dots."""
    import math

    from tile_selector.quality import area_measures
    from wsi_apl.synth.focus import BlurPatch, apply_blur, box_sigma, gauss_box

    mpp, base = 0.25, 0.2
    rng = np.random.default_rng(3)
    od = np.zeros((768, 1024), np.float32)
    yy, xx = np.ogrid[:768, :1024]
    for x, y in rng.uniform((0, 0), (1024, 768), size=(140, 2)):
        od[(xx - x) ** 2 + (yy - y) ** 2 <= 16.0 ** 2] += 0.5  # cells of 8 µm at 0.25 µm/px
    sharp = np.repeat(np.exp(-math.log(10.0) * od)[..., None], 3, axis=2)

    def focus(trans):
        img = np.clip(trans * 255.0 + 0.5, 0, 255).astype(np.uint8)[::2, ::2]
        return area_measures(np.ascontiguousarray(img), 2 * mpp)["focus"]

    def gaussian(sigma_um):
        t = sharp.copy()
        gauss_box(t, base / mpp)
        gauss_box(t, math.sqrt(sigma_um ** 2 - base ** 2) / mpp)
        return t

    # a patch so wide that its weight is ~0.5 all over the field: truth sigma 4 x 0.5 = 2 µm
    r = 1e5
    patch = BlurPatch(512 * mpp - r, 384 * mpp, r, r, 0.0, 4.0)
    assert patch.weight(np.array([0.0, 256.0]), np.array([96.0, 96.0])) == pytest.approx(0.5, abs=0.01)
    rendered = sharp.copy()
    apply_blur(rendered, [patch], base, mpp, 0, 0)
    blend = sharp.copy()
    gauss_box(blend, base / mpp)
    full = blend.copy()
    gauss_box(full, math.sqrt(4.0 ** 2 - base ** 2) / mpp)
    blend = 0.5 * blend + 0.5 * full  # generator 2
    f_rendered, f_truth, f_blend = focus(rendered), focus(gaussian(2.0)), focus(blend)
    assert f_rendered == pytest.approx(f_truth, rel=0.1), (f_rendered, f_truth)
    assert f_blend > 1.5 * f_truth, "the blend's edges stay sharp: this test would catch it"
    # outside every patch, only the slide's softness; the steps are what gauss_box delivers
    plain = sharp.copy()
    apply_blur(plain, [], base, mpp, 0, 0)
    assert focus(plain) > 2 * f_truth
    assert box_sigma(4.0) == pytest.approx(math.sqrt((9 * 9 - 1) / 4.0))
