"""The expert-review report: unit tests of its pieces, and end to end (synth → train → scan → report)
checked in a real headless Chromium (links, pictures, screenshots, the verdict download)."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import TESTDATA
from wsi_apl.report.data import read_triage, scrub, slide_id
from wsi_apl.report.html import STATUS_COLOURS, ci_bar, status_chip, synthetic_banner
from wsi_apl.status import DECISION_SUPPORT, Status

SYNTHETIC = "demo-synthetic@162b4b5c0f82dfcc (demo model trained on synthetic data — not for diagnosis)"


# -- pieces ----------------------------------------------------------------------------------------


def _attrs(svg: str, cls: str) -> dict[str, float]:
    tag = re.search(rf'<(?:rect|line) class="{cls}"([^>]*)/>', svg).group(1)
    return {k: float(v) for k, v in re.findall(r'(\w+)="([-0-9.]+)"', tag)}


@pytest.mark.parametrize("value,lo,hi", [(0.5, 0.25, 0.75), (0.066, 0.023, 0.123), (0.0, 0.0, 0.0), (1.0, 0.9, 1.0)])
def test_ci_bar_draws_the_interval_and_the_ratio_on_a_0_to_1_scale(value, lo, hi):
    svg = ci_bar(value, lo, hi, width=200)
    band, tick = _attrs(svg, "band"), _attrs(svg, "value")
    assert band["x"] == pytest.approx(200 * lo, abs=0.01)
    assert band["width"] == pytest.approx(200 * (hi - lo), abs=0.02)
    assert tick["x1"] == tick["x2"] == pytest.approx(200 * value, abs=0.01)
    assert f"{value:.3f}" in svg and f"{lo:.3f}" in svg


def test_ci_bar_clamps_and_survives_missing_numbers():
    band = _attrs(ci_bar(0.5, -0.2, 1.7, width=100), "band")
    assert band["x"] == 0 and band["width"] == 100
    assert "band" not in ci_bar(None, None, None)           # no ratio: an empty bar, no exception
    tick = _attrs(ci_bar(0.3, None, None, width=100), "value")
    assert tick["x1"] == pytest.approx(30)


def test_status_chips_have_distinct_colours_and_say_the_status():
    assert len({bg for bg, _ in STATUS_COLOURS.values()}) == len(Status)
    for s in Status:
        chip = status_chip(s)
        assert f'class="chip chip-{s}"' in chip and f">{s}</span>" in chip
    assert 'chip-not_analysed' in status_chip("something_else")  # unknown: the grey of "look yourself"


def test_banner_only_for_a_synthetic_or_demo_bundle():
    assert "not for diagnosis" in synthetic_banner([SYNTHETIC])
    assert "not for diagnosis" in synthetic_banner(["lab-marrow@0123456789abcdef", "demo@ffff"])
    assert synthetic_banner(["lab-marrow@0123456789abcdef"]) == ""
    assert synthetic_banner([]) == ""


def test_scrub_removes_paths_but_keeps_units():
    text = "/data/slides/Doe^John.svs: no resolution (give it with --mpp); read at 0.25 µm/px from /mnt/x/y.tif"
    out = scrub(text, ["/data/slides/Doe^John.svs"])
    assert "/data" not in out and "/mnt" not in out and "Doe" not in out
    assert out.startswith("the slide file:") and "µm/px" in out


def _fake_results(tmp_path: Path) -> tuple[Path, list[str]]:
    """A results folder written by the ledger and the triage list: one slide whose zarr group is gone,
    one that failed, one seen but not analysed."""
    from wsi_apl.ledger import Ledger
    from wsi_apl.triage import write_triage

    results = tmp_path / "results"
    led = Ledger(results)
    fps = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3)]
    led.set_bundle("162b4b5c0f82dfcc", SYNTHETIC)
    ratios = {h: {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3, "count": 20} for h in
              ("promyelocyte", "myeloblast", "auer_rod")}
    led.see_file("/secret/slides/Doe_John.tiff", "Doe_John.tiff", fps[0], "CASE-1")
    led.start(fps[0], "162b4b5c0f82dfcc", 10)
    led.finish(fps[0], Status.FLAGGED, {"status": "flagged", "suspicion": 0.9, "p_apl_vs_aml": 0.95,
                                        "p_apl_vs_healthy": 0.85, "ratios": ratios, "cells": 100, "areas": 3,
                                        "bundle": SYNTHETIC, "qc": []}, "Doe_John-gone")
    led.see_file("/secret/slides/broken.svs", "broken.svs", fps[1], "CASE-2")
    led.start(fps[1], "162b4b5c0f82dfcc", 10)
    led.fail(fps[1], "/secret/slides/broken.svs: cannot read pixels (copy it again from the scanner)")
    led.see_file("/secret/slides/late.tiff", "late.tiff", fps[2], "CASE-3")
    led.set_not_analysed(fps[2], "the deadline came first")
    write_triage(results, led)
    led.close()
    return results, fps


def test_report_survives_a_missing_zarr_group_and_rows_without_cells(tmp_path):
    from wsi_apl.report import write_report

    results, fps = _fake_results(tmp_path)
    ledger_before = (results / "ledger.sqlite").read_bytes()
    lines: list[str] = []
    index = write_report(results, log=lines.append)
    assert index == results / "report" / "index.html" and index.exists()
    assert (results / "ledger.sqlite").read_bytes() == ledger_before  # read-only
    html = index.read_text()
    for fp in fps:
        page = results / "report" / "slides" / f"{fp[:16]}.html"
        assert page.exists() and f"slides/{fp[:16]}.html" in html
    gone = (results / "report" / "slides" / f"{fps[0][:16]}.html").read_text()
    assert "holds no cells" in gone and 'id="verdict"' in gone and DECISION_SUPPORT in gone
    failed = (results / "report" / "slides" / f"{fps[1][:16]}.html").read_text()
    assert "Failed" in failed and "cannot read pixels" in failed
    late = (results / "report" / "slides" / f"{fps[2][:16]}.html").read_text()
    assert "deadline came first" in late and "no cells to show" in late
    for p in (results / "report").rglob("*"):
        if p.is_file() and p.suffix == ".html":
            assert "/secret" not in p.read_text()
    assert 'id="synthetic-banner"' in html and "chip-flagged" in html and "chip-failed" in html
    # a later call for one slide redraws that one page and leaves the unchanged others alone
    other = results / "report" / "slides" / f"{fps[1][:16]}.html"
    stamp = other.stat().st_mtime_ns
    time.sleep(0.01)
    write_report(results, only=[fps[0]], log=lines.append)
    assert other.stat().st_mtime_ns == stamp


def test_slide_id_is_the_fingerprint_never_the_name():
    fp = "ab" * 32
    assert slide_id({"fingerprint": fp, "slide": "Doe_John.svs"}) == fp[:16]
    sid = slide_id({"fingerprint": "", "slide": "Doe_John.svs", "path": "/x/Doe_John.svs"})
    assert sid.startswith("file-") and "Doe" not in sid


# -- end to end in a real browser --------------------------------------------------------------------


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("WSI_APL_REQUIRE_CHROMIUM") == "1":
            pytest.fail("WSI_APL_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH: the report is checked in a real browser (apt-get install chromium)")
    return found


def _browser(chromium: str, profile: Path, *args: str, timeout: float = 90) -> str:
    cmd = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


class _Links(HTMLParser):
    """Every reference of a dumped DOM (img src, a href, script src, link href) and every id."""

    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.hrefs: list[str] = []
        self.external: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        elif tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        elif tag in ("script", "link", "iframe", "source") and (a.get("src") or a.get("href")):
            self.external.append(a.get("src") or a.get("href"))


def _dom(chromium: str, profile: Path, page: Path) -> _Links:
    dom = _browser(chromium, profile, "--dump-dom", page.as_uri())
    assert "</html>" in dom
    links = _Links()
    links.feed(dom)
    links.dom = dom
    return links


def _check_refs(page: Path, links: _Links, pages: dict[Path, _Links]) -> None:
    assert not links.external, f"{page.name}: external resources {links.external}"
    for src in links.imgs:
        assert src and not re.match(r"^[a-z]+:", src), f"{page.name}: image not a relative file: {src}"
        assert (page.parent / urllib.parse.unquote(src)).is_file(), f"{page.name}: missing picture {src}"
    for href in links.hrefs:
        assert not re.match(r"^(https?:)?//", href), f"{page.name}: link leaves the report: {href}"
        target, _, frag = href.partition("#")
        doc = page if not target else (page.parent / urllib.parse.unquote(target)).resolve()
        assert doc.is_file(), f"{page.name}: broken link {href}"
        if frag:
            ids = links.ids if doc == page else (pages[doc].ids if doc in pages else None)
            assert ids is None or frag in ids, f"{page.name}: no anchor #{frag} in {doc.name}"


def _screenshot(chromium: str, profile: Path, page: Path, out: Path) -> Path:
    _browser(chromium, profile, f"--screenshot={out}", "--window-size=1400,1800", page.as_uri())
    assert out.stat().st_size > 10_000
    if os.environ.get("WSI_APL_SCREENSHOTS"):
        dest = Path(os.environ["WSI_APL_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, dest / out.name)
    return out


def _save_verdict(chromium: str, profile: Path, page: Path, downloads: Path) -> tuple[str, Path]:
    """Tick "confirmed APL", type a comment and press the button in a real browser (DevTools protocol
    over tornado's websocket client); returns (the JSON shown on the page, the downloaded file)."""
    from tornado.websocket import websocket_connect

    downloads.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                             f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        t0 = time.time()
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            assert time.time() - t0 < 60 and proc.poll() is None, "chromium did not start its DevTools endpoint"
            time.sleep(0.2)
        port, path = port_file.read_text().split()[:2]

        async def run() -> str:
            ws = await websocket_connect(f"ws://127.0.0.1:{port}{path}", max_message_size=1 << 26)
            counter = iter(range(1, 10_000))

            async def call(method: str, params: dict | None = None, session: str | None = None) -> dict:
                n = next(counter)
                msg = {"id": n, "method": method, "params": params or {}}
                if session:
                    msg["sessionId"] = session
                await ws.write_message(json.dumps(msg))
                while True:
                    reply = json.loads(await asyncio.wait_for(ws.read_message(), 60))
                    if reply.get("id") == n:
                        assert "error" not in reply, reply
                        return reply["result"]

            await call("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
            target = await call("Target.createTarget", {"url": page.as_uri()})
            attached = await call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
            session = attached["sessionId"]
            ready = "document.readyState === 'complete' && !!document.getElementById('verdict')"
            for _ in range(300):  # a new tab is about:blank (complete) until the page commits
                state = await call("Runtime.evaluate", {"expression": ready, "returnByValue": True}, session)
                if state["result"].get("value") is True:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the slide page did not load in the browser within 30 s")
            js = ("(() => {const f = document.getElementById('verdict');"
                  "f.querySelector('input[value=apl]').click();"
                  "f.querySelector('textarea').value = 'blasts with rods, typical';"
                  "f.querySelector('button[type=submit]').click();"
                  "return f.querySelector('.verdict-json').textContent;})()")
            done = await call("Runtime.evaluate", {"expression": js, "returnByValue": True, "userGesture": True},
                              session)
            assert "exceptionDetails" not in done, done["exceptionDetails"]
            shown = done["result"]["value"]
            # wait with the connection open: Chromium drops a client's download settings when it leaves
            for _ in range(600):
                if any(p.suffix == ".json" for p in downloads.glob("verdict-*.json")):
                    break
                await asyncio.sleep(0.1)
            ws.close()
            return shown

        shown = asyncio.run(run())
        files = list(downloads.glob("verdict-*.json"))
        assert files, "the verdict button offered no download within 60 s"
        return shown, files[0]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _forbid_associated_images(monkeypatch) -> list[str]:
    """Record any read of a slide's label, macro or thumbnail picture (openslide and tiffslide): the
    report must draw from the pyramid only (a label carries the patient's name)."""
    import openslide
    import tiffslide.tiffslide

    reads: list[str] = []

    def forbidden(self, key):
        reads.append(str(key))
        raise AssertionError(f"the report read the associated image {key!r}")

    monkeypatch.setattr(openslide._AssociatedImageMap, "__getitem__", forbidden)
    monkeypatch.setattr(tiffslide.tiffslide._LazyAssociatedImagesDict, "__getitem__", forbidden)
    return reads


@pytest.mark.slow
def test_report_end_to_end_in_a_browser(trained, tmp_path, monkeypatch):
    from wsi_apl.cli import main
    from wsi_apl.report import write_report
    from wsi_apl.synth.cohort import synth_cohort

    chromium = _chromium()
    root, bundle = trained
    slides = tmp_path / "slides"
    synth_cohort(slides, ["apl", "aml"], seed=41, mpp=0.5, size=(3000, 2250))
    (slides / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 500)
    shutil.copy(slides / "slide_0041_000.tiff", slides / "copy_of_apl.tiff")
    cmu = TESTDATA / "openslide-CMU-1-Small-Region" / "CMU-1-Small-Region.svs"  # has label and macro pictures
    if cmu.exists():
        shutil.copy(cmu, slides / "cmu_with_label.svs")
    out = tmp_path / "results"
    r = CliRunner().invoke(main, ["scan", str(slides), "--out", str(out), "--bundle", str(bundle.path),
                                  "--allow-synthetic", "--workers", "1", "--max-areas", "4", "--target-cells", "0"])
    assert r.exit_code in (0, 1), r.output
    rows = list(csv.DictReader((out / "triage.csv").open()))
    assert len(rows) == 4 + cmu.exists()
    ledger_before = (out / "ledger.sqlite").read_bytes()
    label_reads = _forbid_associated_images(monkeypatch)

    # the whole report through the CLI (no maps: fast), then the scan's call for one slide, with maps
    r = CliRunner().invoke(main, ["report", str(out), "--bundle", str(bundle.path), "--no-occlusion"])
    assert r.exit_code == 0, r.output
    assert str(out / "report" / "index.html") in r.output and " MB" in r.output and "s per slide" in r.output
    analysed = [row for row in rows if row["status"] in ("flagged", "not_flagged", "inconclusive")
                and row["slide"] != "copy_of_apl.tiff" and int(row["cells"] or 0) > 0]
    assert analysed, rows
    first = analysed[0]["fingerprint"]
    lines: list[str] = []
    index = write_report(out, only=[first], log=lines.append, bundle=bundle.path, occlusion_cells=1)
    assert (out / "ledger.sqlite").read_bytes() == ledger_before
    assert any("occlusion" in line and "s per slide" in line for line in lines), lines
    report = out / "report"
    size = sum(p.stat().st_size for p in report.rglob("*") if p.is_file())
    assert size < 2_000_000 * len(rows)

    # every row of the list has a row in the index and a page; every picture and link resolves
    profile = tmp_path / "chromium-profile"
    ids = sorted(row["fingerprint"][:16] for row in rows)
    assert sorted(slide_id(row) for row in read_triage(out)) == ids
    pages = {(report / "slides" / f"{i}.html").resolve(): None for i in set(ids)}
    for p in pages:
        assert p.is_file(), p
        pages[p] = _dom(chromium, profile, p)
    idx = _dom(chromium, profile, index)
    assert sorted(h[len("slides/"):-len(".html")] for h in idx.hrefs if h.startswith("slides/")) == ids
    _check_refs(index, idx, pages)
    for p, links in pages.items():
        _check_refs(p, links, pages)
        assert DECISION_SUPPORT in links.dom and "synthetic-banner" in links.dom
    assert "synthetic-banner" in idx.dom and DECISION_SUPPORT in idx.dom
    page = report / "slides" / f"{first[:16]}.html"
    dom = pages[page.resolve()].dom
    assert 'id="area-1"' in dom and "overview.jpg" in dom and "cell-P1.png" in dom
    assert 'id="occlusion-seconds"' in dom and "occ-P1.jpg" in dom
    broken = next(row for row in rows if row["slide"] == "broken.svs")
    assert "no cells to show" in pages[(report / "slides" / f"{broken['fingerprint'][:16]}.html").resolve()].dom

    # nothing in the report names where the slides lie, and no label or macro picture is in it
    secrets = [str(slides), str(slides.resolve()), str(out.resolve()), str(tmp_path)]
    for f in report.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not any(s.encode() in data for s in secrets), f
            assert not re.search(r"label|macro|thumbnail", f.name, re.I), f
    assert label_reads == []
    if cmu.exists():
        row = next(row for row in rows if row["slide"] == "cmu_with_label.svs")
        assert (report / "slides" / f"{row['fingerprint'][:16]}.html").is_file()

    # the verdict button builds the JSON the verdict reader expects and offers it as a download
    shown, saved = _save_verdict(chromium, tmp_path / "cdp-profile", page, tmp_path / "downloads")
    v = json.loads(saved.read_text())
    assert saved.name == f"verdict-{first[:16]}.json"
    assert set(v) == {"slide_id", "fingerprint", "says", "comment", "at"}
    assert v["slide_id"] == first[:16] and v["fingerprint"] == first and v["says"] == "apl"
    assert v["comment"] == "blasts with rods, typical" and json.loads(shown) == v

    shots = [_screenshot(chromium, profile, index, tmp_path / "report_index.png"),
             _screenshot(chromium, profile, page, tmp_path / "report_slide.png")]
    assert all(s.exists() for s in shots)


def test_overview_marks_an_area_taken_next_to_an_out_of_focus_patch():
    # a real slide file; the selector's areas as selection.json gives them (rank, box, scores)
    import numpy as np

    from tests.conftest import testdata
    from tile_selector.slide import open_slide
    from wsi_apl.report.pictures import NEAR_BLUR_RGB, overview_picture

    slide = open_slide(testdata("openslide-CMU-1-Small-Region", "CMU-1-Small-Region.svs"))
    w, h = slide.dimensions
    areas = [{"rank": 1, "box": [0, 0, w // 3, h // 3], "scores": {}},
             {"rank": 2, "box": [w // 2, h // 2, w - 10, h - 10], "scores": {"near_blur": True}}]
    img = np.asarray(overview_picture(slide, areas)).reshape(-1, 3)
    assert (img == NEAR_BLUR_RGB).all(axis=1).sum() > 50
    assert (img == (255, 212, 0)).all(axis=1).sum() > 50
    plain = np.asarray(overview_picture(slide, areas[:1])).reshape(-1, 3)
    assert not (plain == NEAR_BLUR_RGB).all(axis=1).any()
