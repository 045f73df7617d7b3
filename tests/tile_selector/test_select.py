"""Area selection on synthetic smears (with ground-truth zones) and on slides that are not smears."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import testdata
from tile_selector.overview import overview_image
from tile_selector.quality import area_measures, block_focus, optical_density
from tile_selector.select import NOT_A_SMEAR, SelectorConfig, _overlaps, select_areas
from tile_selector.slide import open_slide

AREA = (512, 384)


def _truth_zone_share(truth_dir, name, box, mpp):
    maps = np.load(truth_dir / f"{name}.maps.npz")
    z, m = maps["zones"], float(maps["map_mpp"])
    x0, y0, x1, y1 = box
    sub = z[int(y0 * mpp / m):int(y1 * mpp / m), int(x0 * mpp / m):int(x1 * mpp / m)]
    return {int(k): float((sub == k).mean()) for k in np.unique(sub)}


def test_selects_non_overlapping_areas_on_the_smear(medium_slide):
    path = medium_slide / "slide_0005_000.tiff"
    s = open_slide(path)
    sel = select_areas(s, AREA, 0.5, SelectorConfig(max_areas=6, target_cells=0))
    assert sel.status == "ok", sel.reason
    assert 2 <= len(sel.areas) <= 6
    boxes = [a.box for a in sel.areas]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), "areas overlap"
    for a in sel.areas:
        # an area is 256 x 192 µm: 1024 x 768 level-0 px at 0.25 µm/px
        assert a.box[2] - a.box[0] == 1024 and a.box[3] - a.box[1] == 768
        zones = _truth_zone_share(medium_slide / "truth", "slide_0005_000", a.box, 0.25)
        assert zones.get(0, 0.0) < 0.05, f"area {a.index} lies on glass: {zones}"
        assert zones.get(1, 0.0) + zones.get(4, 0.0) < 0.5, f"area {a.index} mostly thick/particle: {zones}"
        assert {"focus", "cells", "coverage", "overlap"} <= set(a.scores)
    assert sum(sel.rejected.values()) + len(sel.areas) == sel.candidates
    img = overview_image(sel, s.dimensions)
    assert img.size[0] > 100
    json.dumps(sel.to_json())


def test_cell_estimate_follows_the_truth(medium_slide):
    path = medium_slide / "slide_0005_000.tiff"
    truth = json.loads((medium_slide / "truth" / "slide_0005_000.json").read_text())
    s = open_slide(path)
    sel = select_areas(s, AREA, 0.5, SelectorConfig(max_areas=4, target_cells=0))
    centres = np.array([[(c["box"][0] + c["box"][2]) / 2, (c["box"][1] + c["box"][3]) / 2]
                        for c in truth["cells"] if c["type"] != "smudge"])
    est = sum(a.scores["cells"] for a in sel.areas)
    true = 0
    for a in sel.areas:
        x0, y0, x1, y1 = a.box
        true += int(((centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)).sum())
    assert true > 0
    assert abs(est - true) / true < 0.35, (est, true)


def test_target_cells_stops_early(medium_slide):
    s = open_slide(medium_slide / "slide_0005_000.tiff")
    few = select_areas(s, AREA, 0.5, SelectorConfig(max_areas=12, target_cells=1))
    assert len(few.areas) == 1


def test_blurred_slide_is_inconclusive(tmp_path):
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["healthy"], seed=9, mpp=0.25, size=(6000, 4500), defect="blurred")
    sel = select_areas(open_slide(tmp_path / "slide_0009_000.tiff"), AREA, 0.5)
    assert sel.status == "inconclusive"
    assert "blurred" in sel.reason and "candidates" in sel.reason


def test_empty_glass_is_not_a_smear(tmp_path):
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["healthy"], seed=9, mpp=0.25, size=(3000, 2000), defect="empty")
    sel = select_areas(open_slide(tmp_path / "slide_0009_000.tiff"), AREA, 0.5)
    assert sel.status == "inconclusive" and NOT_A_SMEAR in sel.reason and not sel.areas


def _fade(img: np.ndarray, k: float) -> np.ndarray:
    """A faded, greyish stain: every pixel's optical density pulled towards its mean over the channels."""
    od = optical_density(img, np.full(3, 255.0))  # -log10((I + 1) / 256), inverted below
    mean = od.mean(axis=2, keepdims=True)
    return np.clip(256.0 * 10.0 ** -(mean + k * (od - mean)) - 1.0, 0, 255).astype(np.uint8)


def test_a_smear_with_greyish_red_cells_is_still_a_smear(tmp_path):
    # a faded or overwashed stain leaves red cells greyish (green/red OD about 1.1 instead of 1.5-2.2);
    # the colour test of the red-cell discs follows the slide's stain, so the smear keeps its areas
    # (with the fixed test it was called "not a bone-marrow smear": no pink discs at all)
    import tifffile

    from wsi_apl.synth.cohort import synth_cohort
    from wsi_apl.synth.writer import write_pyramid_tiff

    synth_cohort(tmp_path, ["healthy"], seed=3, mpp=0.25, size=(6000, 4500))
    faded = _fade(tifffile.imread(tmp_path / "slide_0003_000.tiff", key=0), 0.25)
    write_pyramid_tiff(tmp_path / "faded.tiff", faded.shape[1], faded.shape[0], 0.25, lambda y0, y1: faded[y0:y1])
    sel = select_areas(open_slide(tmp_path / "faded.tiff"), AREA, 0.5)
    assert NOT_A_SMEAR not in sel.reason and sel.qc["red_cells_per_mm2"] >= 1000, sel.reason
    assert sel.status == "ok" and sel.areas


@pytest.mark.parametrize("folder,name,mpp", [
    ("hamamatsu-ndpi-stritt", "test3-DAPI-2-(387).ndpi", None),
    ("openslide-CMU-1-Small-Region", "CMU-1-Small-Region.svs", None),
    ("histolab-tcga-svs", "tcga-cr-7395-01a-01-ts1.svs", 0.5),
])
def test_real_non_smear_slides_end_inconclusive(folder, name, mpp):
    s = open_slide(testdata(folder, name), mpp=mpp)
    sel = select_areas(s, AREA, 0.5)
    assert sel.status == "inconclusive", f"{name}: chose {len(sel.areas)} areas"
    assert not sel.areas and NOT_A_SMEAR in sel.reason


def test_plain_picture_is_one_area(tmp_path):
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["aml"], seed=4, mpp=0.25, size=(1280, 960), plain=True)
    s = open_slide(tmp_path / "slide_0004_000.png")
    assert s.is_plain and s.mpp == pytest.approx(0.25, rel=1e-3)
    sel = select_areas(s, AREA, 0.5)
    assert sel.status == "ok" and len(sel.areas) == 1
    assert sel.areas[0].box == (0, 0, 1280, 960) and sel.areas[0].size == (640, 480)


def test_focus_measure_drops_with_blur(medium_slide):
    from scipy import ndimage

    s = open_slide(medium_slide / "slide_0005_000.tiff")
    sel = select_areas(s, AREA, 0.5, SelectorConfig(max_areas=1, target_cells=0))
    img = s.read_area(sel.areas[0].box, AREA).image
    od = lambda im: -np.log10(np.clip((im.astype(np.float32) + 1) / 256, 1e-3, 1)).sum(2)  # noqa: E731
    sharp = block_focus(od(img), 0.5)[2]  # the whole image's edge sharpness
    blurred = block_focus(od(ndimage.gaussian_filter(img, (2, 2, 0))), 0.5)[2]  # 1 µm at 0.5 µm/px
    assert sharp > 0.55 and blurred < 0.45
    # the chosen area is in focus by the truth, and its worst 40-µm block measures so too (the
    # measure includes the optics and the sampling at 0.5 µm/px: a sharp block reads 0.6-0.9 µm)
    maps = np.load(medium_slide / "truth" / "slide_0005_000.maps.npz")
    f = s.mpp / float(maps["map_mpp"])
    x0, y0, x1, y1 = (int(v * f) for v in sel.areas[0].box)
    assert float(maps["blur"][y0:y1, x0:x1].max()) < 1.0
    m = area_measures(img, 0.5)
    assert m["blur_um"] < 1.0


def test_narrow_tilted_monolayer_band_is_found(tmp_path):
    """A ~400-µm monolayer band across a smear tilted by about 60°, between its thick part and the
    feathered edge. The half-overlapping lattice search before the dense one (commit 54667a7) called
    this slide inconclusive ("at the smear border or on glass" / "too thick"); the dense search must
    find several non-overlapping areas in it, all in the truth's monolayer and in focus."""
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["healthy"], seed=8401, mpp=0.5, size=(6000, 4500), smear="narrow")
    truth = json.loads((tmp_path / "truth" / "slide_8401_000.json").read_text())
    assert truth["smear_shape"] == "narrow" and truth["smear"]["monolayer_um"] < 450
    assert 20 < truth["smear"]["theta_deg"] % 90 < 70, "the band must be tilted against the pixel grid"
    sel = select_areas(open_slide(tmp_path / "slide_8401_000.tiff"), AREA, 0.5,
                       SelectorConfig(max_areas=6, target_cells=0))
    assert sel.status == "ok", sel.reason
    assert len(sel.areas) >= 3
    maps = np.load(tmp_path / "truth" / "slide_8401_000.maps.npz")
    m = float(maps["map_mpp"])
    for a in sel.areas:
        x0, y0, x1, y1 = (int(round(v * 0.5 / m)) for v in a.box)
        assert (maps["zones"][y0:y1, x0:x1] == 2).mean() >= 0.9, f"area {a.index} leaves the monolayer band"
        assert float(maps["blur"][y0:y1, x0:x1].max()) < 1.0, f"area {a.index} is out of focus"
    search = sel.qc["search"]
    assert search["read"] <= search["read_budget"]
    assert search["level"] != search["level_first"], "the monolayer level should have been learned from the reads"
    assert sum(sel.rejected.values()) + len(sel.areas) == sel.candidates


@pytest.fixture(scope="module")
def slide_9504(tmp_path_factory):
    """A small smear (1.5 x 1.1 mm at 0.25 µm/px) with part of its usable monolayer next to an
    out-of-focus patch, with its truth maps. (Generator 2's seed for these tests, 9117, lost the
    scenario with generator 3, whose patch fall-off is as blurred as its truth says.)"""
    from wsi_apl.synth.cohort import synth_cohort

    folder = tmp_path_factory.mktemp("s9504")
    synth_cohort(folder, ["healthy"], seed=9504, mpp=0.25, size=(6000, 4500))
    return open_slide(folder / "slide_9504_000.tiff"), np.load(folder / "truth" / "slide_9504_000.maps.npz")


def _in_truth(maps, box, mpp: float) -> tuple[float, float]:
    """The truth's monolayer share and worst blur (µm) under a level-0 ``box``."""
    m = float(maps["map_mpp"])
    x0, y0, x1, y1 = (int(round(v * mpp / m)) for v in box)
    return float((maps["zones"][y0:y1, x0:x1] == 2).mean()), float(maps["blur"][y0:y1, x0:x1].max())


def test_an_area_next_to_a_blurred_patch_is_taken_with_a_warning_when_too_few_are_found(slide_9504):
    """The 40-µm margin around blurred blocks leaves one area; judged again with the 10-µm margin
    because fewer than three were found, the screen also takes a sharp area near the patch, marks it
    and warns, so the expert checks it. (The soft block near it lies out of the block coverage range,
    just under the focus floor: with the default ``off_range_floor`` (0.30) it is no evidence of blur and
    the same area is taken without the rescue; here it counts, as a block in the coverage range would.)"""
    slide, maps = slide_9504
    floor = SelectorConfig().focus_floor
    strict = select_areas(slide, AREA, 0.5, SelectorConfig(rescue_margin_um=40.0, off_range_floor=floor))
    sel = select_areas(slide, AREA, 0.5, SelectorConfig(off_range_floor=floor))
    assert strict.status == "ok" and len(strict.areas) < SelectorConfig().rescue_below, strict.reason
    assert not any(a.scores.get("near_blur") for a in strict.areas)
    near = [a for a in sel.areas if a.scores.get("near_blur")]
    assert near and len(sel.areas) > len(strict.areas)
    assert sel.qc["search"]["near_blur"] >= len(near)
    assert any("out-of-focus patch" in w and "check its focus" in w for w in sel.warnings), sel.warnings
    assert all("next to an out-of-focus patch" in a.why for a in near)
    # the overview outlines it in its own colour (the page's picture of where the areas lie)
    from tile_selector.overview import NEAR_BLUR_RGB

    img = np.asarray(overview_image(sel, slide.dimensions))
    assert (img.reshape(-1, 3) == NEAR_BLUR_RGB).all(axis=1).sum() > 100
    assert not (np.asarray(overview_image(strict, slide.dimensions)).reshape(-1, 3) == NEAR_BLUR_RGB).all(axis=1).any()
    for a in near:
        mono, blur = _in_truth(maps, a.box, slide.mpp)
        assert mono >= 0.9, "in the truth's monolayer"
        assert blur < 1.0, "and in focus, however close the patch"
    default = select_areas(slide, AREA, 0.5)
    assert {a.box for a in near} <= {a.box for a in default.areas} and not default.warnings
    assert not any(a.scores.get("near_blur") for a in default.areas)


def test_a_last_resort_reads_the_spot_between_a_blurred_patch_and_the_thick_zone_before_giving_up(tmp_path):
    """A small smear (seed 9653, 1.5 x 1.1 mm at 0.25 µm/px) whose truth allows one area, in a spot
    squeezed between an out-of-focus patch and the zones where cells pile up or thin out. Every read
    of the rounds is rejected, and the moves they propose keep 100 µm from soft blocks and 0.05 of
    room inside the block coverage range: without the last resort the slide is inconclusive. With it,
    the pixels read place one more area in the spot (no room to spare; first the judge's 40-µm margin,
    then the rescue's 10 µm), and the judge takes it, with the near-blur warning."""
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["healthy"], seed=9653, mpp=0.25, size=(6000, 4500))
    slide = open_slide(tmp_path / "slide_9653_000.tiff")
    maps = np.load(tmp_path / "truth" / "slide_9653_000.maps.npz")
    without = select_areas(slide, AREA, 0.5, SelectorConfig(last_reads=0))
    assert without.status == "inconclusive" and without.qc["search"]["last_resort"] == 0, without.reason
    sel = select_areas(slide, AREA, 0.5)
    search = sel.qc["search"]
    assert sel.status == "ok", sel.reason
    assert 0 < search["last_resort"] <= SelectorConfig().last_reads and search["read"] <= search["read_budget"]
    assert len(sel.areas) == 1 and sel.areas[0].scores.get("near_blur")
    assert any("check its focus" in w for w in sel.warnings), sel.warnings
    mono, blur = _in_truth(maps, sel.areas[0].box, slide.mpp)
    assert mono >= 0.9 and blur < 1.0, (mono, blur)


def test_an_area_on_a_thin_fringe_of_a_narrow_band_is_moved_inward_from_the_pixels_read(tmp_path):
    """A narrow monolayer band (seed 8411, 6000x4500 px at 0.5 µm/px). From the overview's reads
    alone, one of the two areas taken lies on the band's thin fringe: its thinnest ~64-µm block is
    barely dense enough and the truth calls 11 % of it feathered edge. The pixels read show where the
    same area, moved a block inward, clears the fringe (tile_selector.evidence); that move is read,
    accepted, and chosen instead: both areas now lie in the truth's monolayer and focus."""
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["healthy"], seed=8411, mpp=0.5, size=(6000, 4500), smear="narrow")
    slide = open_slide(tmp_path / "slide_8411_000.tiff")
    maps = np.load(tmp_path / "truth" / "slide_8411_000.maps.npz")
    without = select_areas(slide, AREA, 0.5, SelectorConfig(refine_per_round=0))
    sel = select_areas(slide, AREA, 0.5)
    fringe = [a for a in without.areas if _in_truth(maps, a.box, slide.mpp)[0] < 0.9]
    assert fringe and all(a.scores["coverage_min_block"] < 0.27 for a in fringe), "an area on the thin fringe"
    assert sel.status == "ok" and len(sel.areas) >= len(without.areas)
    for a in sel.areas:
        mono, blur = _in_truth(maps, a.box, slide.mpp)
        assert mono >= 0.9 and blur < 1.0, (a.index, mono, blur)
    moved = [a for a in sel.areas if a.scores.get("refined")]
    assert any(_overlaps(a.box, f.box) and a.scores["coverage_min_block"] >= 0.27 for a in moved for f in fringe), \
        "the fringe area, moved inward"


def test_the_neighbours_of_an_area_rejected_in_a_later_round_are_searched_again(tmp_path):
    """A small smear (1.5 x 1.1 mm) whose first accepted area is rejected in a later round (a blurred
    block found next to it). Before the map was closed again from the current verdicts, the
    positions overlapping that area stayed closed, the search ran out of positions and the slide
    was inconclusive; now a usable area beside it is read and taken, without the narrow blur margin.
    (The block that rejects it is sparse or piled up, just under the focus floor: with the default
    ``off_range_floor`` it is no evidence of blur and the first area stays accepted, as the truth
    allows; here it counts, as a block in the coverage range would.)"""
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["healthy"], seed=9110, mpp=0.25, size=(6000, 4500))
    slide = open_slide(tmp_path / "slide_9110_000.tiff")
    # the overview's reads alone, as when the closure was rebuilt (the moves from the reads' pixels
    # find an area here too, and the later reads then take a second one on a thin fringe, 87 % monolayer)
    floor = SelectorConfig().focus_floor
    default = select_areas(slide, AREA, 0.5, SelectorConfig(rescue_margin_um=40.0, refine_per_round=0))
    assert default.screened[0][1]["verdict"] == "accepted" and default.areas[0].box == tuple(
        int(round(v)) for v in default.screened[0][0])
    sel = select_areas(slide, AREA, 0.5,
                       SelectorConfig(rescue_margin_um=40.0, refine_per_round=0, off_range_floor=floor))
    assert sel.status == "ok" and sel.areas, sel.reason
    first = sel.screened[0]
    assert first[1]["verdict"] == "blurred", "the first read was accepted, then rejected in a later round"
    maps = np.load(tmp_path / "truth" / "slide_9110_000.maps.npz")
    m = float(maps["map_mpp"])
    for a in sel.areas:
        assert _overlaps(a.box, first[0]), "the area taken overlaps the first read: its neighbourhood reopened"
        x0, y0, x1, y1 = (int(round(v * 0.25 / m)) for v in a.box)
        assert (maps["zones"][y0:y1, x0:x1] == 2).mean() >= 0.9, "in the truth's monolayer"
        assert float(maps["blur"][y0:y1, x0:x1].max()) < 1.0, "and in focus"


def test_areas_are_laid_side_by_side_on_a_small_smear_where_the_best_first_leaves_room_for_fewer(tmp_path):
    """A small smear (seed 9304, 1.5 x 1.1 mm at 0.25 µm/px). Read one by one from the overview's best,
    two areas are accepted and no open position is left: the usable monolayer is used up around them.
    Laid end to end over the ground already read (search.pack), three fit; their positions are read
    and accepted, and all three lie in the truth's monolayer and in focus."""
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["healthy"], seed=9304, mpp=0.25, size=(6000, 4500))
    slide = open_slide(tmp_path / "slide_9304_000.tiff")
    maps = np.load(tmp_path / "truth" / "slide_9304_000.maps.npz")
    without = select_areas(slide, AREA, 0.5, SelectorConfig(pack_reads=0))
    sel = select_areas(slide, AREA, 0.5)
    assert without.status == "ok" and len(without.areas) == 2
    assert without.qc["search"]["stopped"] == "no open position left"
    assert sel.status == "ok" and len(sel.areas) == 3, sel.reason
    search = sel.qc["search"]
    assert 0 < search["packed"] <= SelectorConfig().pack_reads and search["read"] <= search["read_budget"]
    assert any(a.scores.get("packed") for a in sel.areas), "an area placed by the packing"
    for a in sel.areas:
        mono, blur = _in_truth(maps, a.box, slide.mpp)
        assert mono >= 0.9 and blur < 1.0, (a.index, mono, blur)
    assert sel.estimated_cells > without.estimated_cells
    assert sum(sel.rejected.values()) + len(sel.areas) == sel.candidates


def test_the_packing_keeps_the_judges_margin_from_soft_blocks_not_the_moves_clearance(tmp_path):
    """A small smear (seed 9418, 1.5 x 1.1 mm at 0.25 µm/px). Two areas are accepted one by one; laid end
    to end over the ground read, three fit, but near an out-of-focus patch: held 100 µm (``clear_um``, the
    moves' clearance) from every soft block, the packing finds no position (the twelfth session's code
    took two areas). Then held only the judge's own 40 µm from them, its positions are read and three
    areas are taken, all in the truth's monolayer and in focus."""
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["apl"], seed=9418, mpp=0.25, size=(6000, 4500))
    slide = open_slide(tmp_path / "slide_9418_000.tiff")
    maps = np.load(tmp_path / "truth" / "slide_9418_000.maps.npz")
    without = select_areas(slide, AREA, 0.5, SelectorConfig(pack_reads=0))
    sel = select_areas(slide, AREA, 0.5)
    assert without.status == "ok" and len(without.areas) == 2, without.reason
    assert sel.status == "ok" and len(sel.areas) == 3, sel.reason
    assert sel.qc["search"]["packed"] > 0 and any(a.scores.get("packed") for a in sel.areas)
    for a in sel.areas:
        mono, blur = _in_truth(maps, a.box, slide.mpp)
        assert mono >= 0.9 and blur < 1.0, (a.index, mono, blur)
    assert sel.estimated_cells > without.estimated_cells


def test_a_particle_or_the_feathered_edge_just_under_the_focus_floor_does_not_reject_the_monolayer_beside_it(tmp_path):
    """A small smear (seed 9560, 1.5 x 1.1 mm at 0.25 µm/px). Its sharp monolayer lies beside a marrow
    particle whose piled-up block (coverage 0.78) scores 0.329, just under the absolute focus floor
    (0.33), 20 µm from the area; the truth calls it sharp (0.23 µm). Counted as blur, it rejects the
    area beside it and the slide ends inconclusive; counted only below ``off_range_floor`` (0.30), the
    area is found, in the truth's monolayer and in focus, without the packing. (Both are judged without
    the packing and the old one without the last resort, so that the floor alone is compared.
    Generator 2's seed for this test, 9355, lost the scenario with generator 3: the blocks beside its
    monolayer, at 0.5-0.9 µm of truth blur, now look as soft as the truth says.)"""
    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["healthy"], seed=9560, mpp=0.25, size=(6000, 4500))
    slide = open_slide(tmp_path / "slide_9560_000.tiff")
    maps = np.load(tmp_path / "truth" / "slide_9560_000.maps.npz")
    before = select_areas(slide, AREA, 0.5, SelectorConfig(off_range_floor=SelectorConfig().focus_floor, pack_reads=0,
                                                           last_reads=0))
    assert before.status == "inconclusive" and "blurred" in before.reason
    sel = select_areas(slide, AREA, 0.5)
    assert sel.status == "ok" and sel.areas, sel.reason
    assert sel.qc["search"]["packed"] == 0
    for a in sel.areas:
        mono, blur = _in_truth(maps, a.box, slide.mpp)
        assert mono >= 0.9 and blur < 1.0, (a.index, mono, blur)
