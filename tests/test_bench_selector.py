"""benchmarks/bench_selector.py's read tally: every area the screen read, by verdict and by truth class."""

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
