"""benchmarks/same_output.py, the refactoring guard: two results folders compared column by column and
array by array, timestamps and timings left out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from wsi_apl.store import write_slide_group
from wsi_apl.triage import write_triage

_SPEC = importlib.util.spec_from_file_location("same_output", Path(__file__).parents[1] / "benchmarks" / "same_output.py")
same_output = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(same_output)


def _results(root: Path, *, p: float = 0.8, when: str = "2026-12-01 22:00:00", seconds: float = 3.0,
             status: str = "flagged") -> Path:
    cols = {"area": np.zeros(2, np.int32), "score": np.array([0.9, 0.7], np.float32),
            "p_promyelocyte": np.array([p, 0.1], np.float32), "crops": np.zeros((2, 48, 48, 3), np.uint8)}
    attrs = {"result": {"status": status, "suspicion": p, "timings": {"seconds": seconds}},
             "areas": [{"rank": 1, "box": [0, 0, 10, 10]}], "rejected": {}, "qc": {}}
    write_slide_group(root, "s-abcdef12", cols, attrs)
    write_triage(root, rows=[{"rank": 1, "slide": "s.svs", "status": status, "suspicion": p, "scanned_at": when}])
    return root


def test_same_results_differ_only_in_time(tmp_path):
    a = _results(tmp_path / "a")
    b = _results(tmp_path / "b", when="2026-12-02 03:00:00", seconds=9.0)
    assert same_output.compare_triage(a, b) == [] and same_output.compare_store(a, b) == []


def test_a_changed_value_or_status_is_found(tmp_path):
    a = _results(tmp_path / "a")
    b = _results(tmp_path / "b", p=0.81)
    diffs = same_output.compare_triage(a, b) + same_output.compare_store(a, b)
    assert any("suspicion" in d for d in diffs) and any("p_promyelocyte" in d for d in diffs)
    c = _results(tmp_path / "c", status="inconclusive")
    assert any("status" in d for d in same_output.compare_triage(a, c))
    assert any("'result' differs" in d for d in same_output.compare_store(a, c))
