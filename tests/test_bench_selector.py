"""benchmarks/bench_selector.py: its read tally (every area the screen read, by verdict and by truth class), the
truth figures and the exhaustive read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_SPEC = importlib.util.spec_from_file_location("bench_selector",
                                               Path(__file__).parents[1] / "benchmarks" / "bench_selector.py")
bench_selector = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_selector)


def test_read_tally_sorts_reads_by_verdict_and_truth(tmp_path):
    # truth on a 4-µm grid, 40x40 cells: monolayer left half, thick top right, thin bottom right; a blurred
    # patch in the lower left corner
    z = np.full((40, 40), 2, np.uint8)
    z[:20, 20:] = 1
    z[20:, 20:] = 3
    blur = np.full((40, 40), 0.2, np.float32)
    blur[36:, :4] = 3.0
    np.savez(tmp_path / "s.maps.npz", zones=z, blur=blur, map_mpp=4.0)
    truth = {"maps": "s.maps.npz"}
    mpp = 0.5  # level-0 µm/px: a truth cell is 8 px
    box = lambda cx, cy: (cx * 8, cy * 8, (cx + 10) * 8, (cy + 10) * 8)  # noqa: E731 (10x10 truth cells)
    screened = [
        (box(2, 2), {"verdict": "accepted"}),                          # monolayer, sharp
        (box(5, 5), {"verdict": "too thin (feathered edge, sparse cells)"}),  # usable, rejected
        (box(25, 2), {"verdict": "too thick (cells pile up)"}),        # thick
        (box(25, 25), {"verdict": "accepted"}),                        # thin: let through
        (box(0, 30), {"verdict": "blurred"}),                          # touches the blurred patch
        (box(12, 12), {"verdict": "red cells clumped"}),               # 80 % monolayer, the rest mostly thick
    ]
    tally = bench_selector.read_tally(tmp_path, truth, screened, mpp)
    assert tally == {"accepted|usable": 1, "too thin|usable": 1, "too thick|thick": 1, "accepted|thin or glass": 1,
                     "blurred|blurred": 1, "other|thick": 1}


def test_truth_stats_give_the_share_of_an_area_in_monolayer_and_focus(tmp_path):
    # a 10x10-cell area: 2 columns thin, and a blurred 2x5 patch inside the monolayer part
    z = np.full((10, 10), 2, np.uint8)
    z[:, 8:] = 3
    blur = np.full((10, 10), 0.2, np.float32)
    blur[:5, :2] = 2.0
    np.savez(tmp_path / "s.maps.npz", zones=z, blur=blur, map_mpp=4.0)
    mono, worst, good = bench_selector.truth_stats(tmp_path, {"maps": "s.maps.npz"}, (0, 0, 80, 80), 0.5)
    assert (mono, worst) == (0.8, 2.0)
    assert good == 0.7  # 80 monolayer cells less the 10 blurred ones
    rows = [{"status": "ok", "capacity": 1, "areas": 2, "mono": [1.0, mono], "blur": [0.2, worst], "good": [1.0, good],
             "seconds": 1.0}]
    s = bench_selector.summarise(rows)
    assert s["areas_mono_and_in_focus"] == 1
    assert abs(s["good_pixels_mean"] - 0.85) < 1e-9 and s["good_pixels_worst"] == 0.7


def test_read_details_keep_each_read_with_its_truth_and_the_screen_figures(tmp_path):
    z = np.full((20, 20), 2, np.uint8)
    z[:, 15:] = 3
    np.savez(tmp_path / "s.maps.npz", zones=z, blur=np.full((20, 20), 0.2, np.float32), map_mpp=4.0)
    screened = [((0, 0, 80, 80), {"verdict": "accepted", "coverage": 0.41, "soft_block_um": None, "_blocks": [1]}),
                ((80, 0, 160, 80), {"verdict": "too thin (feathered edge, sparse cells)", "coverage": 0.2})]
    rows = bench_selector.read_details(tmp_path, {"maps": "s.maps.npz"}, screened, 0.5)
    assert [r["verdict"] for r in rows] == ["accepted", "too thin (feathered edge, sparse cells)"]
    assert rows[0]["truth_mono"] == 1.0 and rows[1]["truth_mono"] == 0.5  # columns 10-19: 15-19 thin
    assert rows[0]["coverage"] == 0.41 and rows[0]["soft_block_um"] is None and "_blocks" not in rows[0]
    assert rows[1]["box"] == [80.0, 0.0, 160.0, 80.0] and rows[1]["truth_good"] == 0.5


def test_the_exhaustive_read_judges_every_area_on_a_grid_and_counts_against_the_selectors(tmp_path, capsys):
    """``--exhaustive`` on a small synthetic smear: every area on a 64-µm grid inside the outline is read
    and judged; the line names the areas the selector chose and how many the judge accepts."""
    import re

    from wsi_apl.synth.cohort import synth_cohort

    synth_cohort(tmp_path, ["healthy"], seed=9404, mpp=0.25, size=(4000, 3000))
    path = tmp_path / "slide_9404_000.tiff"
    bench_selector.exhaustive([str(path)], step_um=64.0)
    out = capsys.readouterr().out
    m = re.search(r"chose (\d+) \((\d+) usable\); read (\d+) on a 64-µm grid, "
                  r"judge accepts (\d+) \((\d+) usable\)", out)
    assert m, out
    chose, chose_good, read, accepted, good = (int(v) for v in m.groups())
    assert read > 10 and accepted <= read and good <= accepted and chose_good <= chose
    assert "over 1 slides" in out
