"""Verdict files and `wsi-apl verify`: sensitivity, specificity and PPV with Wilson intervals, drift, and the
refusal to mix bundles. Most tests build results folders by hand (exact counts); the last one runs on a real scan."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from wsi_apl.cli import main
from wsi_apl.ledger import Ledger
from wsi_apl.triage import write_triage
from wsi_apl.verify import VerifyError, make_verdict, read_verdict, read_verdicts, verdict_path, verify, wilson


def _wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval written out (z = 1.959964), to check the library's."""
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_interval_is_wilsons():
    for k, n in [(7, 9), (0, 5), (5, 5), (1, 30)]:
        assert wilson(k, n) == pytest.approx(_wilson(k, n), abs=1e-9)
    assert wilson(0, 0) == (None, None)


def _bundle(path, reference: dict | None = None, sha: str = "0" * 64):
    """A bundle.json with a slide_nets part (what verify reads: id, label, rule, validation figures)."""
    from workers.bundle import load_bundle

    path.mkdir(parents=True, exist_ok=True)
    part = {"file": "slide_nets.safetensors", "sha256": sha, "config": {"features": ["a"]},
            "decision": {"thresholds": {"apl_vs_aml": 0.41, "apl_vs_healthy": 0.37}, "threshold": 0.4, "min_cells": 200,
                         "blast_inconclusive_percent": 20.0, "oof_sensitivity": 0.95, "oof_specificity": 0.8,
                         "apl_slides": 40, "non_apl_slides": 120},
            "metrics": {"reference": reference} if reference else {}}
    (path / "bundle.json").write_text(json.dumps({"format": 1, "name": path.name, "mpp": 0.5, "area_size": [256, 192],
                                                  "heads": ["myeloblast", "promyelocyte", "auer_rod"],
                                                  "synthetic": False, "parts": {"slide_nets": part}}))
    return load_bundle(path, verify=False)


def _fp(i: int) -> str:
    return f"{i:04x}" * 16


def _folder(results, bundle, slides: list[tuple[str, str, float, int, float]]):
    """A results folder: the ledger names ``bundle``, triage.csv lists ``slides`` as (name, status, suspicion,
    cells, mean focus), fingerprints _fp(0), _fp(1), ..."""
    led = Ledger(results)
    led.set_bundle(bundle.id, bundle.label)
    for i, (name, *_rest) in enumerate(slides):
        led.see_file(str(results / name), name, _fp(i))
    led.close()
    rows = [{"slide": name, "status": status, "suspicion": susp, "cells": cells, "areas": 6 if cells else 0,
             "mean_focus": focus, "bundle": bundle.label if status != "not_analysed" else "", "fingerprint": _fp(i)}
            for i, (name, status, susp, cells, focus) in enumerate(slides)]
    write_triage(results, rows=rows)


def _verdict(results, i: int, says: str, at: str = "2026-03-01T08:00:00+01:00") -> None:
    path = verdict_path(results, _fp(i)[:16])
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(make_verdict(_fp(i), says, "", at)))


# 10 APL slides: 7 flagged, 2 not_flagged, 1 inconclusive; 10 not APL: 1 flagged, 8 not_flagged, 1 failed
_CALLS = [("apl", "flagged")] * 7 + [("apl", "not_flagged")] * 2 + [("apl", "inconclusive")] + \
         [("not_apl", "flagged")] + [("not_apl", "not_flagged")] * 8 + [("not_apl", "failed")]


@pytest.fixture()
def lab(tmp_path):
    """One bundle, a results folder of 21 slides (the 20 above and one unreadable) with verdicts."""
    rng = np.random.default_rng(0)
    ref = {"suspicion_oof": sorted(np.round(rng.uniform(0, 1, 60), 4).tolist()),
           "cells": sorted(rng.integers(300, 900, 60).tolist()),
           "mean_focus": sorted(np.round(rng.uniform(0.5, 0.9, 60), 4).tolist()), "qc_inconclusive": 6, "slides": 60}
    bundle = _bundle(tmp_path / "bundle", ref)
    res = tmp_path / "night1"
    slides = []
    for i, (_says, status) in enumerate(_CALLS + [("unreadable", "not_flagged")]):
        done = status in ("flagged", "not_flagged", "inconclusive")
        cells = 150 if status == "inconclusive" else (int(rng.integers(300, 900)) if done else 0)
        slides.append((f"s{i:02d}.svs", status, float(rng.uniform(0, 1)) if done else None, cells,
                       float(rng.uniform(0.5, 0.9)) if done else None))
    _folder(res, bundle, slides)
    for i, (says, _status) in enumerate(_CALLS + [("unreadable", "")]):
        _verdict(res, i, says)
    return bundle, res


def test_verify_counts_calls_and_intervals(lab, tmp_path):
    bundle, res = lab
    # an earlier verdict on slide 7 (APL, not flagged), under another file name: the later one counts
    (res / "verdicts" / "verdict-older.json").write_text(json.dumps(make_verdict(_fp(7), "not_apl", "",
                                                                                 "2026-02-01T08:00:00+01:00")))
    _verdict(res, 99, "apl")  # a slide that is not in this folder
    (res / "verdicts" / "notes.json").write_text(json.dumps({"slide": "x"}))  # not a verdict: named, skipped
    r = verify([res], bundle)
    assert r["confusion"] == {"tp": 7, "fn": 2, "fp": 1, "tn": 8}
    assert r["sensitivity"]["value"] == pytest.approx(7 / 9) and r["sensitivity"]["n"] == 9
    assert (r["sensitivity"]["ci_low"], r["sensitivity"]["ci_high"]) == pytest.approx(_wilson(7, 9))
    assert r["specificity"]["value"] == pytest.approx(8 / 9)
    assert (r["specificity"]["ci_low"], r["specificity"]["ci_high"]) == pytest.approx(_wilson(8, 9))
    assert r["ppv"]["value"] == pytest.approx(7 / 8)
    assert (r["ppv"]["ci_low"], r["ppv"]["ci_high"]) == pytest.approx(_wilson(7, 8))
    # no call is never a negative: counted apart
    assert r["calls"]["apl"]["inconclusive"] == 1 and r["no_call"] == {"apl": 1, "not_apl": 1}
    assert r["calls"]["not_apl"]["failed"] == 1
    v = r["verdicts"]
    assert (v["files"], v["slides"], v["superseded"], v["used"], v["unreadable"], v["without_slide"]) == \
        (23, 22, 1, 20, 1, 1)
    assert len(v["not_verdicts"]) == 1 and "notes.json" in v["not_verdicts"][0]
    assert r["thresholds"]["per_net"] == {"apl_vs_aml": 0.41, "apl_vs_healthy": 0.37}
    assert r["validation"]["sensitivity"] == 0.95
    d = r["drift"]
    assert d["slides_analysed"] == 20 and d["inconclusive"]["k"] == 1
    assert d["qc_inconclusive"]["here"]["k"] == 1  # the inconclusive slide has 150 < 200 cells
    assert d["suspicion"]["verdict"] == "similar" and d["suspicion"]["n"] == 20 and d["suspicion"]["reference_n"] == 60
    assert d["cells"]["verdict"] == "similar" and d["mean_focus"]["verdict"] == "similar"


def test_verify_sees_drift(tmp_path):
    """A set whose suspicions all sit high while validation spread them evenly: the KS test says so."""
    ref = {"suspicion_oof": np.linspace(0.0, 1.0, 50).round(4).tolist(), "cells": list(range(400, 900, 10)),
           "mean_focus": np.linspace(0.5, 0.9, 50).round(4).tolist(), "qc_inconclusive": 0, "slides": 50}
    bundle = _bundle(tmp_path / "bundle", ref)
    res = tmp_path / "res"
    _folder(res, bundle, [(f"s{i}.svs", "inconclusive", 0.9 + i / 1000, 100, 0.2) for i in range(12)])
    d = verify([res], bundle)["drift"]
    assert d["suspicion"]["verdict"] == "differs" and d["suspicion"]["p_value"] < 0.01
    assert d["cells"]["verdict"] == "differs" and d["mean_focus"]["verdict"] == "differs"
    assert d["qc_inconclusive"]["verdict"] == "differs" and d["qc_inconclusive"]["here"]["k"] == 12
    assert "differ" in d["suspicion"]["words"]
    # an older bundle without validation figures: said, not guessed
    old = _bundle(tmp_path / "old")
    res2 = tmp_path / "res2"
    _folder(res2, old, [("a.svs", "flagged", 0.9, 400, 0.7)])
    d2 = verify([res2], old)["drift"]
    assert d2["suspicion"]["verdict"] == "not assessed" and "retrain" in d2["suspicion"]["words"]


def test_verify_refuses_mixed_or_foreign_bundles(lab, tmp_path):
    bundle, res = lab
    other = _bundle(tmp_path / "other-bundle", {"suspicion_oof": [0.5]}, sha="1" * 64)  # other weights, other id
    res2 = tmp_path / "night2"
    _folder(res2, other, [("t.svs", "flagged", 0.8, 400, 0.7)])
    with pytest.raises(VerifyError, match="mix bundles"):
        verify([res, res2], bundle)
    r = CliRunner().invoke(main, ["verify", str(res), str(res2), "--bundle", str(bundle.path)])
    assert r.exit_code == 2 and "mix bundles" in r.output and "other-bundle" in r.output
    r = CliRunner().invoke(main, ["verify", str(res2), "--bundle", str(bundle.path)])
    assert r.exit_code == 2 and f"not with {bundle.label}" in r.output and "--bundle" in r.output
    r = CliRunner().invoke(main, ["verify", str(res), "--bundle", str(bundle.path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["confusion"] == {"tp": 7, "fn": 2, "fp": 1, "tn": 8}
    r = CliRunner().invoke(main, ["verify", str(res), "--bundle", str(bundle.path)])
    assert r.exit_code == 0 and "sensitivity 78 % (95 % CI" in r.output and "7 of 9" in r.output
    assert "never as negatives" in r.output and "Decision support only" in r.output


def test_verdict_files_are_checked(tmp_path):
    good = make_verdict(_fp(1), "apl", "Auer rods seen", "2026-03-01T08:00:00+01:00")
    assert set(good) == {"slide_id", "fingerprint", "says", "comment", "at"} and good["slide_id"] == _fp(1)[:16]
    p = tmp_path / "verdicts" / "v.json"
    p.parent.mkdir()
    for bad, why in [({**good, "extra": 1}, "exactly the keys"), ({**good, "slide_id": "0" * 16}, "first 16 digits"),
                     ({**good, "says": "maybe"}, "not one of"), ({**good, "at": "yesterday"}, "ISO time"),
                     ({**good, "fingerprint": "abc"}, "64 hex")]:
        p.write_text(json.dumps(bad))
        with pytest.raises(VerifyError, match=why) as e:
            read_verdict(p)
        assert str(p) in str(e.value)
    p.write_text("{not json")
    df, problems = read_verdicts(tmp_path)
    assert df.empty and len(problems) == 1 and "not a readable JSON" in problems[0]
    with pytest.raises(VerifyError, match="--says"):
        make_verdict(_fp(1), "yes")


def test_verdicts_and_verify_on_a_scan(scanned):
    """`wsi-apl verdict` by file name and by fingerprint prefix, then `wsi-apl verify` on the real list."""
    import csv

    res, bundle = scanned.results, scanned.bundle
    apl = next(n for n, d in scanned.diagnosis.items() if d == "apl")
    healthy = next(n for n, d in scanned.diagnosis.items() if d == "healthy")
    rows = {r["slide"]: r for r in csv.DictReader((res / "triage.csv").open())}
    runner = CliRunner()
    r = runner.invoke(main, ["verdict", str(res), apl, "--says", "not_apl"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["verdict", str(res), apl, "--says", "apl", "--comment", "Auer rods, faggot cells"])
    assert r.exit_code == 0 and "replaces 'not_apl'" in r.output, r.output
    r = runner.invoke(main, ["verdict", str(res), rows[healthy]["fingerprint"][:8], "--says", "not_apl"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["verdict", str(res), "who.svs", "--says", "apl"])
    assert r.exit_code == 2 and "'who.svs'" in r.output and "triage.csv" in r.output
    fp = rows[apl]["fingerprint"]
    v = json.loads((res / "verdicts" / f"verdict-{fp[:16]}.json").read_text())
    assert set(v) == {"slide_id", "fingerprint", "says", "comment", "at"}
    assert (v["slide_id"], v["fingerprint"], v["says"], v["comment"]) == (fp[:16], fp, "apl", "Auer rods, faggot cells")
    assert len(list((res / "verdicts").iterdir())) == 2
    r = runner.invoke(main, ["verify", str(res), "--bundle", str(bundle.path), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    a, h = rows[apl]["status"], rows[healthy]["status"]
    assert m["confusion"] == {"tp": int(a == "flagged"), "fn": int(a == "not_flagged"),
                              "fp": int(h == "flagged"), "tn": int(h == "not_flagged")}
    assert m["calls"]["apl"][a] == 1 and m["calls"]["not_apl"][h] == 1
    assert m["verdicts"]["used"] == 2 and m["slides"] == 2 and m["bundle"]["id"] == bundle.id
    ref = bundle.part("slide_nets")["metrics"]["reference"]
    assert m["drift"]["suspicion"]["reference_n"] == len(ref["suspicion_oof"]) > 0
    assert len(ref["cells"]) == ref["slides"] and 0 <= ref["qc_inconclusive"] <= ref["slides"]
    assert m["drift"]["suspicion"]["verdict"] == "too few slides"  # two slides say nothing about drift
