"""Privacy: keyed pseudonyms in every output (`scan --pseudonymize`), and no label, macro or thumbnail image (nor
the slide's label text) in any output, checked on a real Aperio slide that has them."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.wsi_apl.conftest import CMU_SVS
from wsi_apl.cli import main
from wsi_apl.ledger import Ledger
from wsi_apl.privacy import KEY_FILE, Names, PseudonymError, create_key, pseudonym, read_key
from wsi_apl.store import read_slide_group, slide_groups

_PSEUDONYM = re.compile(r"slide-[0-9a-f]{12}")
#: Internal state of a results folder (not outputs): the ledger keeps real paths, the key is the key.
_INTERNAL = {"ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", KEY_FILE, ".scan.lock"}


def test_pseudonyms_are_keyed_and_stable(tmp_path):
    key = create_key(tmp_path)
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert create_key(tmp_path) == key == read_key(tmp_path)  # made once, never replaced
    p = pseudonym(key, "Doe John 1234.svs")
    assert _PSEUDONYM.fullmatch(p)
    assert p == "slide-" + hmac.new(key, b"Doe John 1234.svs", hashlib.sha256).hexdigest()[:12]
    assert pseudonym(bytes(32), "Doe John 1234.svs") != p  # another key, another pseudonym
    names = Names(key)
    path = "/lab/Doe John/Doe John 1234.svs"
    assert names.slide("Doe John 1234.svs") == p and names.path(path) == ""
    assert names.group(Path(path), "ab" * 32) == f"{p}-abababab"
    assert names.text(f"{path}: cannot read pixels; see /lab/Doe John/Doe John 1234/Slidedat.ini", path) == \
        f"{p}: cannot read pixels; see [a folder]/{p}/Slidedat.ini"
    assert names.text("opened /mnt/other/x.tif instead", path) == "opened [a path] instead"
    assert names.text("the slide has no usable area", path) == "the slide has no usable area"
    plain = Names()
    assert plain.slide("a.svs") == "a.svs" and plain.path("/x/a.svs") == "/x/a.svs" and plain.text("/x/a", "a") == "/x/a"
    (tmp_path / KEY_FILE).write_text("not a key")
    with pytest.raises(PseudonymError, match=str(tmp_path / KEY_FILE)):
        read_key(tmp_path)


def test_pseudonymize_refused_where_outputs_already_name_slides(trained, tmp_path):
    _, bundle = trained
    res, slides = tmp_path / "res", tmp_path / "slides"
    slides.mkdir()
    led = Ledger(res)
    led.see_file("/lab/a.svs", "a.svs", None, error="x")
    led.close()
    r = CliRunner().invoke(main, ["scan", str(slides), "--out", str(res), "--bundle", str(bundle.path),
                                  "--allow-synthetic", "--pseudonymize"])
    assert r.exit_code == 2 and "new, empty --out folder" in r.output
    assert not (res / KEY_FILE).exists()
    assert not Ledger.lock_held(res)  # the refused scan let go of the folder


def _outputs(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob("*") if p.is_file() and p.name not in _INTERNAL]


def _export_all(scan, out: Path) -> Path:
    """Every export of a results folder: GeoJSON of each slide, VIA of each slide with areas."""
    res = scan.results
    r = CliRunner().invoke(main, ["export", "geojson", str(res), "--out", str(out / "geojson")])
    assert r.exit_code == 0, r.output
    for g in slide_groups(res):
        _, attrs = read_slide_group(res, g)
        if attrs.get("areas"):
            r = CliRunner().invoke(main, ["export", "via", str(res), "--slide", attrs["result"]["slide"],
                                          "--out", str(out / "via")])
            assert r.exit_code == 0, r.output
    return out


def test_pseudonymized_scan_names_no_slide(scanned_private, tmp_path):
    res = scanned_private.results
    real = list(scanned_private.diagnosis)  # the file names
    r = CliRunner().invoke(main, ["pseudonyms", str(res), str(scanned_private.slides)])
    assert r.exit_code == 0, r.output
    table = {row["slide"]: row["pseudonym"] for row in csv.DictReader(r.stdout.splitlines())}
    assert set(table) == set(real) and all(_PSEUDONYM.fullmatch(p) for p in table.values())
    rows = list(csv.DictReader((res / "triage.csv").open()))
    assert sorted(row["slide"] for row in rows) == sorted(table.values())
    assert all(row["path"] == "" for row in rows)
    groups = slide_groups(res)
    assert groups and all(_PSEUDONYM.match(g) for g in groups)
    for g in groups:
        _, attrs = read_slide_group(res, g)
        assert attrs["result"]["slide"] in table.values() and attrs["result"]["path"] == ""
        assert g.startswith(attrs["result"]["slide"] + "-")
    exports = _export_all(scanned_private, tmp_path / "exports")
    assert list(exports.rglob("*.geojson")) and list(exports.rglob("*.via.json")) and list(exports.rglob("*.png"))
    # no file name, stem or folder of a slide in any output (the ledger, internal state, keeps them)
    banned = [*real, *(Path(n).stem for n in real), str(scanned_private.slides)]
    for path in _outputs(res, exports):
        data = path.read_bytes()
        for word in banned:
            assert word.encode() not in data, (path, word)
    if (res / "alerts.log").exists():
        assert all(line.split("\t")[2] in table.values() for line in (res / "alerts.log").read_text().splitlines())
    # the folder keeps pseudonymizing: a rerun without the flag says so and changes no name
    r = CliRunner().invoke(main, ["triage", str(res)])
    assert r.exit_code == 0
    assert sorted(row["slide"] for row in csv.DictReader((res / "triage.csv").open())) == sorted(table.values())


def _raw_strips(path: Path, role: str) -> list[bytes]:
    """The first encoded bytes of each strip of an associated image, as stored in the SVS (Aperio names the
    page in its description: "label 387x463", "macro 1280x431")."""
    import tifffile

    with tifffile.TiffFile(path) as tf, open(path, "rb") as f:
        for page in tf.pages:
            if f"\n{role} " in (page.description or ""):
                out = []
                for off, n in zip(page.dataoffsets, page.databytecounts, strict=True):
                    f.seek(off)
                    out.append(f.read(min(n, 512)))
                return out
    raise AssertionError(f"{path}: no {role} page")


def test_label_and_macro_images_never_reach_outputs(scanned_private, tmp_path):
    import openslide
    import zarr
    from PIL import Image

    svs = scanned_private.slides / CMU_SVS[1]
    handle = openslide.OpenSlide(str(svs))
    assoc = {k: np.asarray(v.convert("RGB")) for k, v in handle.associated_images.items()}
    assert {"label", "macro", "thumbnail"} <= set(assoc)
    props = handle.properties
    texts = [props[k] for k in ("aperio.Filename", "aperio.User", "aperio.ImageID", "aperio.ScanScope ID",
                                "aperio.Date") if len(props.get(k, "")) >= 5]
    assert "CMU-1" in texts and len(texts) == 5
    strips = [s for role in ("label", "macro") for s in _raw_strips(svs, role)]
    assert strips and all(len(s) >= 64 for s in strips)
    # the slide was analysed (a group exists), so the outputs had the chance to carry its images
    rows = list(csv.DictReader((scanned_private.results / "triage.csv").open()))
    fp = hashlib.sha256(svs.read_bytes()).hexdigest()
    (row,) = [r for r in rows if r["fingerprint"] == fp]
    assert row["status"] in ("flagged", "not_flagged", "inconclusive"), row
    exports = _export_all(scanned_private, tmp_path / "exports")
    files = _outputs(scanned_private.results, exports)
    assert any(p.suffix == ".png" for p in files)
    for path in files:
        data = path.read_bytes()
        for s in strips:
            assert s not in data, (path, "bytes of an associated image")
        for t in texts:
            # a numeric id (aperio.ImageID) as a token of its own: the digits may occur inside a float of a
            # measurement (0.2528603971004486) without anything leaking
            leak = re.search(rb"(?<![0-9.])" + re.escape(t.encode()) + rb"(?![0-9])", data) if t.isdigit() \
                else t.encode() in data
            assert not leak, (path, t)
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            with Image.open(path) as im:
                pix = np.asarray(im.convert("RGB"))
            assert not any(pix.shape == a.shape and np.array_equal(pix, a) for a in assoc.values()), path
    store = zarr.open_group(str(scanned_private.results / "cells.zarr"), mode="r")
    for g in store.group_keys():
        for k in store[g].array_keys():
            arr = store[g][k][...]
            if arr.dtype == np.uint8 and arr.ndim >= 3:
                for a in assoc.values():
                    assert arr.shape[-3:] != a.shape or not any(np.array_equal(x, a) for x in arr.reshape(-1, *a.shape))
    attrs = read_slide_group(scanned_private.results, row_group(scanned_private.results, fp))[1]
    assert set(attrs["slide"]) <= {"reader", "vendor", "mpp", "levels", "objective_power"}
    assert "associated" not in json.dumps(attrs)


def row_group(results: Path, fp: str) -> str:
    (g,) = [g for g in slide_groups(results) if read_slide_group(results, g)[1]["provenance"]["fingerprint"] == fp]
    return g
