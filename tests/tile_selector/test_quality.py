"""The selector's per-read measures: the fast forms give numpy's own figures, bit for bit."""

import numpy as np
import pytest

from tile_selector import quality
from tile_selector.quality import _edge_ratio, block_focus, group_percentile, optical_density, sorted_by_group


def _block_focus_loop(od_sum, mpp, block_um=40.0, min_edge_share=0.05):
    """The per-block loop that block_focus replaced (one np.percentile per block)."""
    values, edges = _edge_ratio(od_sum, mpp)
    ratio = np.zeros(edges.shape, np.float32)
    ratio[edges] = values
    h, w = od_sum.shape
    gx, gy = max(1, int(round(w * mpp / block_um))), max(1, int(round(h * mpp / block_um)))
    blocks = []
    for j in range(gy):
        for i in range(gx):
            y0, y1, x0, x1 = j * h // gy, (j + 1) * h // gy, i * w // gx, (i + 1) * w // gx
            e = edges[y0:y1, x0:x1]
            if e.size == 0 or e.mean() < min_edge_share or e.sum() < 50:
                continue
            blocks.append((x0, y0, x1, y1, float(np.percentile(ratio[y0:y1, x0:x1][e], 95))))
    return blocks


@pytest.mark.parametrize("seed", range(6))
def test_group_percentile_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 300, 40)
    counts[:3] = [1, 2, 0]
    groups = np.repeat(np.arange(len(counts)), counts)
    values = (rng.gamma(2.0, 0.3, counts.sum()) * rng.choice([1, 1e-3, 1e3], counts.sum())).astype(np.float32)
    values[::7] = np.round(values[::7], 1)  # ties
    order = rng.permutation(len(values))
    s = sorted_by_group(values[order], groups[order])
    for q in (95.0, 50.0, 5.0, 99.5):
        got = group_percentile(s, counts, q)
        want = [np.percentile(values[groups == g], q) if c else np.nan for g, c in enumerate(counts)]
        np.testing.assert_array_equal(got, np.asarray(want, np.float32))
        assert all(float(a) == float(b) for a, b, c in zip(got, want, counts) if c)


def test_group_percentile_would_catch_a_wrong_order():
    values = np.array([3.0, 1.0, 2.0, 10.0], np.float32)
    unsorted = group_percentile(values, [4], 95.0)
    assert float(unsorted[0]) != float(np.percentile(values, 95))
    with pytest.raises(ValueError):
        sorted_by_group(np.array([-1.0], np.float32), np.array([0]))


@pytest.mark.parametrize("shape,mpp", [((384, 512), 0.5), ((193, 257), 0.25), ((60, 70), 0.5), ((960, 1280), 0.5)])
def test_block_focus_equals_the_per_block_loop(shape, mpp):
    rng = np.random.default_rng(shape[0])
    img = np.clip(rng.normal(0.4, 0.3, shape), 0, None).astype(np.float32)
    img[: shape[0] // 3] = 0.05  # a part without edges: its blocks are left out
    from scipy import ndimage
    img = ndimage.gaussian_filter(img, 1.5)
    worst, blocks, _ = block_focus(img, mpp)
    want = _block_focus_loop(img, mpp)
    assert blocks == want
    assert (worst == min(b[4] for b in want)) if want else worst == 0.0


def test_optical_density_lookup_equals_the_formula():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for white in (None, np.array([231.0, 240.5, 250.0]), np.array([20.0, 300.0, 128.0])):
        w = np.percentile(img.reshape(-1, 3).astype(np.float32), 99.5, axis=0) if white is None else white
        want = quality._od(img.astype(np.float32), np.maximum(np.asarray(w, np.float32), 64.0))
        got = optical_density(img, white)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(optical_density(img.astype(np.float32), white=np.full(3, 240.0)),
                                  optical_density(img, white=np.full(3, 240.0)))


def _discs(rgb, n=6, d_px=15, gap=30, size=240):
    """Discs of colour ``rgb`` (d_px across) on glass at 240, one every ``gap`` px."""
    img = np.full((size, size, 3), 240, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for j in range(n):
        for i in range(n):
            cy, cx = gap // 2 + j * gap + 5, gap // 2 + i * gap + 5
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (d_px / 2) ** 2] = rgb
    return img


@pytest.mark.parametrize("rgb,expected", [
    ((225, 150, 170), 36),   # well-stained pink red cells: green/red OD 7
    ((193, 182, 199), 36),   # greyish discs of a pale stain (green/red OD 1.25): the test follows the stain
    ((150, 205, 170), 0),    # absorbs red more than green: not a red cell
])
def test_red_cells_are_separate_pink_discs(rgb, expected):
    img = _discs(rgb)
    od = optical_density(img, np.full(3, 240.0))
    nuclei = np.zeros(img.shape[:2], bool)
    assert quality.red_cell_count(od, nuclei, 0.5) == expected  # 15 px at 0.5 µm/px: 7.5-µm discs


def test_greyish_discs_among_well_stained_red_cells_are_not_red_cells():
    # the colour test is lowered only where the stained pixels are typically greyish: beside well-stained
    # pink red cells, greyish discs (e.g. leukocyte cytoplasm of that hue) stay out
    pink, grey = _discs((225, 150, 170)), _discs((193, 182, 199))
    img = np.concatenate([pink, grey[:, :120]], axis=1)
    od = optical_density(img, np.full(3, 240.0))
    nuclei = np.zeros(img.shape[:2], bool)
    assert quality.pink_ratio(od[..., 0][od[..., 1] > 0.08], od[..., 1][od[..., 1] > 0.08]) == quality.PINK_RATIO
    assert quality.red_cell_count(od, nuclei, 0.5) == 36


def test_a_continuous_pink_sheet_has_no_red_cells():
    img = np.full((240, 240, 3), 240, np.uint8)
    img[20:220, 20:220] = (225, 150, 170)  # eosin-like: pink, but no separate discs
    od = optical_density(img, np.full(3, 240.0))
    assert quality.red_cell_count(od, np.zeros(img.shape[:2], bool), 0.5) == 0


def test_every_focus_block_carries_its_own_coverage():
    """The screen weighs a soft block by its own coverage (screen._blurred_blocks): each focus block
    of area_measures carries the share of its pixels covered by cells."""
    from tile_selector.quality import area_measures

    img = np.full((96, 160, 3), 235, np.uint8)
    rng = np.random.default_rng(3)
    for _ in range(40):  # dark discs on the left half only
        y, x = rng.integers(6, 90), rng.integers(6, 74)
        yy, xx = np.ogrid[:96, :160]
        img[(yy - y) ** 2 + (xx - x) ** 2 <= 25] = (90, 40, 120)
    m = area_measures(img, 0.5)
    blocks = m["_blocks"]
    assert blocks and all(len(b) == 6 for b in blocks)
    fg = m["_fg"]
    for x0, y0, x1, y1, _, cov in blocks:
        assert cov == round(float(fg[y0:y1, x0:x1].mean()), 4)
    left = [b[5] for b in blocks if b[2] <= 80]
    assert left and min(left) > 0.1
