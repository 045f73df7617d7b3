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
