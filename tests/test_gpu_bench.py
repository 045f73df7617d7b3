"""benchmarks/gpu_bench.py runs end to end on the CPU (``--device cpu --quick``), so the script a GPU
machine will run is known to work before one is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_bench_runs_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--quick",
                          "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(run.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["quick"] and printed["area_px"] == [512, 384]
    steady = printed["steady"]
    assert {"xception_heads_1_per_batch", "xception_heads_2_per_batch", "small_heads_1_per_batch"} <= set(steady)
    for run_ in steady.values():
        assert run_["areas"] == 4 and run_["areas_per_s"] > 0 and run_["cells_per_area"] > 0
        assert run_["latency_p95_s"] >= run_["latency_p50_s"] > 0
        assert {"upload", "detect", "crop", "classify", "download", "measure", "read_wait"} <= set(
            run_["profile_s_per_area"])
    assert printed["classify"]["xception"]["eager_crops_per_s"] > 0
    slide = printed["slide"]
    assert slide["areas_analysed"] == 12 and slide["seconds"] > slide["selection_s"] > 0
    paper = printed["paper_way"]
    assert paper["seconds_per_area"] > paper["detect_s"] > 0 and paper["ratio_batched_vs_paper"] > 0
    assert "peak_memory_gib" not in printed  # a GPU figure is never made up on a CPU
