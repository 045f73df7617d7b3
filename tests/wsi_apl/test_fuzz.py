"""Property tests (hypothesis) of everything that reads a user's files: the slide readers, the VIA and
Pascal VOC annotation readers, a cohort's ``labels.csv``, a scan's ``cases.csv``, labelled-cell CSVs,
pictures and the paper's CSV layout.

The property is always the same: arbitrary or mutated input (random bytes, a valid small file with
bytes flipped or truncated or a TIFF tag set to an extreme value, JSON/XML/CSV with random values,
missing keys, wrong types, huge/negative/NaN numbers, unicode, formula-like text) either parses into
valid objects or raises the reader's own clear error (:class:`tile_selector.errors.SlideError` for
slides; ValueError, or FileNotFoundError for a missing picture, for the parsers) whose message names
the file; never another exception type (KeyError, TypeError, IndexError, OverflowError, struct.error,
MemoryError...), never a hang.

Runs are reproducible (``derandomize=True``, no example database) and bounded (a few dozen examples a
property, about half a minute for the file).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import struct
import warnings
from functools import cache
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tile_selector.errors import SlideError
from tile_selector.slide import open_slide

pytestmark = pytest.mark.timeout(300)  # a hang fails the test, it does not stall the suite


#: ``WSI_APL_FUZZ_SCALE=20`` runs 20 times the examples, with fresh random ones each run (a local
#: search for new bugs); unset, every run tests the same examples.
FUZZ_SCALE = int(os.environ.get("WSI_APL_FUZZ_SCALE", "1"))


def _settings(n: int):
    return settings(max_examples=n * FUZZ_SCALE, deadline=None, derandomize=FUZZ_SCALE == 1, database=None,
                    print_blob=False, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                             HealthCheck.data_too_large])


def _assert_names(exc: BaseException, *paths: Path) -> None:
    """A clear error: its message names the file (or the folder) it is about."""
    event(f"raised {type(exc).__name__}")  # the outcomes' shares: pytest --hypothesis-show-statistics
    msg = str(exc)
    assert any(str(p) in msg for p in paths), f"{type(exc).__name__} does not name {paths[0]}: {msg}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with a readable picture ``a.png`` (40x30) and an unreadable one ``bad.png``."""
    d = tmp_path_factory.mktemp("fuzz")
    Image.fromarray(_noise(30, 40)).save(d / "a.png")
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return d


def _noise(h: int, w: int) -> np.ndarray:
    return (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# byte-level mutations of a valid file

#: TIFF tags a mutation may set: geometry, tiling, pixel layout and the tile tables.
TIFF_TAGS = (256, 257, 258, 259, 262, 277, 278, 284, 322, 323, 324, 325)
INTERESTING = (0, 1, 2, 3, 15, 16, 17, 255, 256, 4096, 65535, 65536, 2**24, 2**31 - 1, 2**31, 2**32 - 1)

OPS = st.lists(st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 2**20), st.integers(0, 255)),           # anywhere
    st.tuples(st.just("head"), st.integers(0, 1023), st.integers(0, 255)),            # in the header
    st.tuples(st.just("tag"), st.integers(0, 2), st.sampled_from(TIFF_TAGS),         # a TIFF tag's value
              st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**32 - 1))),
), max_size=5)
CUT = st.one_of(st.none(), st.floats(0.0, 1.0))


@cache
def _tiff_slots(data: bytes) -> dict[tuple[int, int], tuple[int, str]]:
    """(page, tag code) -> (offset, struct format) of the inline single value of a tag."""
    import tifffile

    slots = {}
    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        for i, page in enumerate(tf.pages):
            for tag in page.tags.values():
                if tag.count == 1 and tag.dtype in (3, 4):  # SHORT, LONG
                    slots[(i, tag.code)] = (tag.valueoffset, tf.byteorder + ("H" if tag.dtype == 3 else "I"))
    return slots


def _mutate(base: bytes, ops, cut) -> bytes:
    data = bytearray(base)
    for op in ops:
        if op[0] in ("byte", "head"):
            if data:
                data[op[1] % len(data)] = op[2]
        elif base[:2] in (b"II", b"MM"):
            slot = _tiff_slots(base).get((op[1], op[2]))
            if slot:
                off, fmt = slot
                data[off:off + struct.calcsize(fmt)] = struct.pack(fmt, op[3] % (1 << (8 * struct.calcsize(fmt))))
    if cut is not None:
        data = data[:int(len(data) * cut)]
    return bytes(data)


@cache
def _slide_bases() -> dict[str, bytes]:
    """Tiny valid files: 80x64 two-level tiled TIFFs (JPEG and deflate tiles, 0.5 µm per pixel), and
    the same picture as PNG, JPEG and BMP."""
    import tifffile

    img = _noise(64, 80)
    out = {}
    for comp in ("jpeg", "zlib"):
        b = io.BytesIO()
        with tifffile.TiffWriter(b) as tw:
            tw.write(img, tile=(16, 16), compression=comp, photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
            tw.write(img[::2, ::2].copy(), tile=(16, 16), compression=comp, photometric="rgb", subfiletype=1)
        out[f"tiff-{comp}"] = b.getvalue()
    for fmt in ("PNG", "JPEG", "BMP"):
        b = io.BytesIO()
        Image.fromarray(img).save(b, fmt)
        out[fmt.lower()] = b.getvalue()
    return out


BASE_EXT = {"tiff-jpeg": ".tif", "tiff-zlib": ".tif", "png": ".png", "jpeg": ".jpg", "bmp": ".bmp"}


def _use_slide(path: Path, reader: str) -> None:
    """Open ``path`` and read from it as a scan would; only SlideError naming the file may come out."""
    try:
        slide = open_slide(path, reader=reader, mpp=0.5)
    except SlideError as exc:
        _assert_names(exc, path)
        return
    try:
        assert slide.levels and all(lv.width > 0 and lv.height > 0 for lv in slide.levels)
        last = len(slide.levels) - 1
        w, h = min(slide.levels[last].width, 24), min(slide.levels[last].height, 24)
        region = slide.read_level_region(last, 0, 0, w, h)
        assert region.shape == (h, w, 3) and region.dtype == np.uint8
        bw, bh = min(slide.dimensions[0], 48), min(slide.dimensions[1], 48)
        ow, oh = max(1, bw // 2), max(1, bh // 2)
        area = slide.read_area((0, 0, bw, bh), (ow, oh))
        assert area.image.shape == (oh, ow, 3) and area.image.dtype == np.uint8
        assert 0.0 <= area.outside_fraction <= 1.0
        event(f"read with {slide.reader}")
    except SlideError as exc:
        _assert_names(exc, path)
    finally:
        slide.close()


@_settings(80)
@given(base=st.sampled_from(sorted(BASE_EXT)), ext=st.sampled_from(["native", ".svs", ".png", ""]),
       reader=st.sampled_from(["auto", "openslide", "tiffslide", "pil"]), ops=OPS, cut=CUT)
# a tile 2**31 - 1 px wide: openslide asked for 137 GB and glib aborted the whole process
@example(base="tiff-jpeg", ext="native", reader="openslide", ops=[("tag", 1, 322, 2**31 - 1)], cut=None)
@example(base="tiff-zlib", ext="native", reader="auto", ops=[("tag", 0, 323, 2**32 - 1)], cut=None)
@example(base="jpeg", ext="native", reader="auto", ops=[], cut=0.5)
def test_slide_readers_on_mutated_files(workdir, base, ext, reader, ops, cut):
    path = workdir / f"slide{BASE_EXT[base] if ext == 'native' else ext}"
    path.write_bytes(_mutate(_slide_bases()[base], ops, cut))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _use_slide(path, reader)


@_settings(40)
@given(data=st.binary(min_size=0, max_size=600), prefix=st.sampled_from([b"", b"II*\x00", b"MM\x00*",
                                                                        b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM"]),
       ext=st.sampled_from([".tif", ".svs", ".ndpi", ".png", ".jpg", ".mrxs", ".dcm", ""]),
       reader=st.sampled_from(["auto", "openslide", "tiffslide", "pil"]))
def test_slide_readers_on_random_bytes(workdir, data, prefix, ext, reader):
    path = workdir / f"random{ext}"
    path.write_bytes(prefix + data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _use_slide(path, reader)


@_settings(50)
@given(base=st.sampled_from(["png", "jpeg", "bmp", "tiff-zlib"]), ops=OPS, cut=CUT)
# a TIFF 16777216 px wide: Pillow's DecompressionBombError came through
@example(base="tiff-zlib", ops=[("tag", 0, 256, 16777216)], cut=None)
# ImageWidth stored as a BYTE (the type field of the first IFD entry, at offset 12): Pillow's bare
# "ValueError: Invalid dimensions", which did not name the picture
@example(base="tiff-zlib", ops=[("head", 12, 1)], cut=None)
def test_read_picture_on_mutated_pictures(workdir, base, ops, cut):
    from wsi_apl.train.data import read_picture

    path = workdir / f"picture{BASE_EXT[base]}"
    path.write_bytes(_mutate(_slide_bases()[base], ops, cut))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, f = read_picture(path, 0.5, 0.25)
    except ValueError as exc:
        _assert_names(exc, path)
        return
    assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8 and f == 2.0
    event("read")


# ---------------------------------------------------------------------------------------------
# VIA projects and Pascal VOC XML

WEIRD_TEXT = st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e400", "-1", "0", "10", "3.5", "1,5",
                              "=HYPERLINK(\"http://x\",\"y\")", "+SUM(A1:A2)", "@cmd", "ümlaut", "日本語",
                              "a" * 300, "\u202e", "None", "true"])
#: Coordinates as annotators make them (partly outside the 40x30 picture a.png)...
SANE_NUMBER = st.one_of(st.integers(-5, 60), st.floats(-20, 80))
#: ... and as a broken export may: NaN, infinities, 10**400 (no float holds it), subnormals.
NUMBER = st.one_of(SANE_NUMBER, st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([10**400, -10**400, 2**63, 1e39, 1e308, -1e308, 5e-324]))
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=6), WEIRD_TEXT, st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
#: Picture names: a.png resolves (also by basename), bad.png is there but unreadable (no clipping).
SANE_NAMES = st.sampled_from(["a.png", "./a.png", "sub\\a.png", "C:\\data\\a.png", "bad.png"])
NAME_TEXT = st.one_of(SANE_NAMES, st.sampled_from(["missing.png", "http://x/a.png", "", ".", "..", "/",
                                                   "a" * 300 + ".png", "a\x00.png", "a.png\n", "*.png", "[a].png"]),
                      st.text(max_size=8))
SANE_ATTRS = st.dictionaries(st.sampled_from(["label", "type", "class", "patient", "note", "Auer rod"]),
                             st.one_of(st.sampled_from(["blast", "promyelocyte", "1", "0", ""]),
                                       st.dictionaries(st.sampled_from(["auer_rod", "faggot"]), st.booleans(),
                                                       max_size=2)), max_size=3)
ATTRS = st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), WEIRD_TEXT, JUNK,
                                                       st.dictionaries(st.text(max_size=4), st.booleans(), max_size=3)),
                        max_size=3)
JSON = st.recursive(st.one_of(st.none(), st.booleans(), NUMBER, st.text(max_size=8)),
                    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids,
                                                                                         max_size=4)),
                    max_leaves=20)
#: How wrong a generated file is: "sane" (well formed, ordinary values), "extreme" (well formed, extreme
#: numbers and names), "chaos" (any key missing or of any type).
MODES = st.sampled_from(["sane", "extreme", "chaos"])


def _points(num, n_min: int = 1):
    return st.integers(n_min, 5).flatmap(lambda n: st.tuples(st.lists(num, min_size=n, max_size=n),
                                                              st.lists(num, min_size=n, max_size=n)))


def _via2_shape(mode: str):
    num = SANE_NUMBER if mode == "sane" else NUMBER
    if mode == "chaos":
        value = st.one_of(num, num, num, JUNK)
        return st.fixed_dictionaries(
            {"name": st.one_of(st.sampled_from(["rect", "circle", "ellipse", "polygon", "polyline", "point", "RECT"]),
                               JUNK)},
            optional={k: value for k in ("x", "y", "width", "height", "cx", "cy", "r", "rx", "ry", "theta")}
            | {k: st.one_of(st.lists(value, max_size=5), value) for k in ("all_points_x", "all_points_y")})
    return st.one_of(
        st.fixed_dictionaries({"name": st.sampled_from(["rect", "Rect"]), "x": num, "y": num, "width": num,
                               "height": num}),
        st.fixed_dictionaries({"name": st.just("circle"), "cx": num, "cy": num, "r": num}),
        st.fixed_dictionaries({"name": st.just("ellipse"), "cx": num, "cy": num, "rx": num, "ry": num},
                              optional={"theta": num}),
        st.tuples(st.sampled_from(["polygon", "polyline"]), _points(num)).map(
            lambda t: {"name": t[0], "all_points_x": t[1][0], "all_points_y": t[1][1]}),
        st.fixed_dictionaries({"name": st.just("point"), "cx": num, "cy": num}))


def _maybe(strategy, mode: str):
    """``strategy``, or in chaos mode sometimes any JSON value instead."""
    return st.one_of(strategy, strategy, strategy, JUNK) if mode == "chaos" else strategy


def _via2_entry(mode: str):
    attrs = SANE_ATTRS if mode == "sane" else ATTRS
    region = st.fixed_dictionaries({"shape_attributes": _maybe(_via2_shape(mode), mode),
                                    "region_attributes": _maybe(attrs, mode)})
    if mode == "chaos":
        region = st.fixed_dictionaries({}, optional={"shape_attributes": _maybe(_via2_shape(mode), mode),
                                                     "region_attributes": _maybe(attrs, mode)})
    regions = st.one_of(st.lists(_maybe(region, mode), min_size=mode != "chaos", max_size=4),
                        st.dictionaries(st.sampled_from([str(i) for i in range(12)]), region, max_size=3))
    names = {"sane": SANE_NAMES, "extreme": NAME_TEXT, "chaos": st.one_of(NAME_TEXT, JUNK)}[mode]
    return st.fixed_dictionaries({"filename": names, "regions": _maybe(regions, mode)},
                                 optional={"size": st.integers(-1, 10**6), "file_attributes": _maybe(attrs, mode)})


VIA2_ENTRIES = {m: _via2_entry(m) for m in ("sane", "extreme", "chaos")}


@st.composite
def via2_files(draw):
    mode = draw(MODES)
    entries = draw(st.dictionaries(st.text(max_size=6), _maybe(VIA2_ENTRIES[mode], mode), min_size=mode != "chaos",
                                   max_size=3))
    if draw(st.booleans()):  # a VIA 2 project
        project = {"_via_img_metadata": entries}
        if draw(st.booleans()):
            keys = st.sampled_from(sorted(entries) or ["k"])
            project["_via_image_id_list"] = draw(st.lists(st.one_of(keys, JUNK) if mode == "chaos" else keys,
                                                          max_size=4))
        return project
    return entries  # a VIA 1.x/2.x export


def _via3_xy(mode: str):
    num = SANE_NUMBER if mode == "sane" else NUMBER
    code = st.one_of(st.integers(1, 9), NUMBER) if mode == "chaos" else st.integers(1, 9)
    shapes = st.one_of(
        st.tuples(st.just(2), num, num, num, num), st.tuples(st.just(3), num, num, num),
        st.tuples(st.just(4), num, num, num, num), st.tuples(st.just(4), num, num, num, num, num),
        st.tuples(st.just(1), num, num), st.tuples(st.just(9), num, num, num, num, num, num),
        st.tuples(st.sampled_from([5, 6, 7, 8]), st.lists(num, min_size=2, max_size=8)).map(
            lambda t: (t[0], *t[1][:len(t[1]) // 2 * 2])),
        st.tuples(code, st.lists(num, max_size=8)).map(lambda t: (t[0], *t[1])),  # any length
        st.just(()))  # no region: file attributes
    return shapes.map(list) if mode != "chaos" else st.one_of(shapes.map(list), st.lists(JUNK, max_size=3), JUNK)


@st.composite
def via3_files(draw):
    mode = draw(MODES)
    names = {"sane": SANE_NAMES, "extreme": NAME_TEXT, "chaos": st.one_of(NAME_TEXT, JUNK)}[mode]
    n = draw(st.integers(0 if mode == "chaos" else 1, 3))
    fids, vids = [str(i + 1) for i in range(n)], [str(i + 1) for i in range(n)]
    files = {f: draw(_maybe(st.fixed_dictionaries({"fname": names}, optional={"src": names, "fid": st.just(f)}),
                            mode)) for f in fids}
    views = {v: {"fid_list": draw(_maybe(st.just([f]), mode))} for v, f in zip(vids, fids)}
    attribute = draw(st.dictionaries(st.sampled_from(["1", "2", "3"]), _maybe(st.fixed_dictionaries(
        {"aname": st.sampled_from(["label", "type", "Auer rod", "patient"])},
        optional={"type": st.integers(1, 5), "anchor_id": st.just("FILE1_Z0_XY1"),
                  "options": _maybe(st.dictionaries(st.sampled_from(["0", "1", "2"]), st.text(max_size=6),
                                                    max_size=3), mode)}), mode), max_size=3))
    av = st.dictionaries(st.sampled_from(["1", "2", "3", "9"]), st.one_of(
        st.sampled_from(["0", "1", "0,2", "blast", ""]), st.dictionaries(st.sampled_from(["0", "1", "7"]),
                                                                          st.booleans(), max_size=2)), max_size=3)
    metadata = draw(st.dictionaries(st.text(max_size=4), _maybe(st.fixed_dictionaries(
        {"vid": st.sampled_from(vids or ["1"]), "xy": _via3_xy(mode)},
        optional={"av": _maybe(av, mode), "z": st.lists(NUMBER, max_size=2)}), mode), min_size=mode != "chaos",
        max_size=5))
    data = {"file": files, "view": views, "metadata": metadata, "attribute": attribute}
    if draw(st.booleans()):
        data["project"] = {"vid_list": draw(_maybe(st.permutations(vids), mode))}
    if mode == "chaos":
        for key in draw(st.lists(st.sampled_from(["file", "view", "metadata", "attribute", "project"]), max_size=1)):
            data[key] = draw(JUNK)
    return data


def _check_annotations(items, workdir: Path, clipped: bool = True) -> None:
    from wsi_apl.annotations import ImageAnnotation

    assert isinstance(items, list)
    event(f"parsed, {'some' if any(len(it.boxes) for it in items) else 'no'} boxes")
    for it in items:
        assert isinstance(it, ImageAnnotation) and it.image.is_file()
        b = it.boxes
        assert b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == 4
        assert np.isfinite(b).all(), b
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert len(it.labels) == len(it.attributes) == len(b)
        assert all(isinstance(v, str) for v in it.labels)
        assert all(isinstance(k, str) and isinstance(v, str) for a in it.attributes for k, v in a.items())
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in it.file_attributes.items())
        assert isinstance(it.group, str)
        if clipped and it.image.resolve() == (workdir / "a.png").resolve():  # size known: clipped to the picture
            assert (b >= 0).all() and (b[:, [0, 2]] <= 40).all() and (b[:, [1, 3]] <= 30).all()


def _read_via_checked(path: Path, workdir: Path) -> None:
    from wsi_apl.annotations import read_via

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            items = read_via(path)
    except (ValueError, FileNotFoundError) as exc:
        _assert_names(exc, path)
        return
    _check_annotations(items, workdir)


def _dump(obj) -> str:
    return json.dumps(obj, allow_nan=True, ensure_ascii=False)


# a coordinate of 10**400: float() of it raised OverflowError
@example(doc={"a": {"filename": "a.png", "regions": [{"shape_attributes": {"name": "rect", "x": 10**400, "y": 0,
                                                                             "width": 5, "height": 5}}]}})
# a NaN coordinate made a NaN box
@example(doc={"a": {"filename": "bad.png", "regions": [{"shape_attributes": {"name": "circle", "cx": float("nan"),
                                                                               "cy": 1, "r": 3}}]}})
# a 300-character file name: OSError "File name too long" while looking for the picture
@example(doc={"a": {"filename": "a" * 300 + ".png", "regions": []}})
@given(doc=st.one_of(via2_files(), via2_files(), via2_files(), JSON))
@_settings(80)
def test_read_via2_and_any_json(workdir, doc):
    path = workdir / "via2.json"
    path.write_text(_dump(doc), encoding="utf-8")
    _read_via_checked(path, workdir)


# a VIA 3 shape code of Infinity: int() of it raised OverflowError
@example(doc={"file": {"1": {"fname": "a.png"}}, "view": {"1": {"fid_list": ["1"]}}, "metadata": {
    "m": {"vid": "1", "xy": [float("inf"), 1, 2, 3, 4]}}, "attribute": {}})
@given(doc=via3_files())
@_settings(80)
def test_read_via3(workdir, doc):
    path = workdir / "via3.json"
    path.write_text(_dump(doc), encoding="utf-8")
    _read_via_checked(path, workdir)


@cache
def _valid_via_bytes() -> bytes:
    doc = {"_via_img_metadata": {"a.png1": {"filename": "a.png", "size": 1, "regions": [
        {"shape_attributes": {"name": "rect", "x": 1, "y": 2, "width": 10, "height": 8},
         "region_attributes": {"label": "blast"}},
        {"shape_attributes": {"name": "polygon", "all_points_x": [3, 9, 5], "all_points_y": [4, 6, 20]},
         "region_attributes": {"type": {"promyelocyte": True}}}], "file_attributes": {"patient": "P1"}}},
        "_via_image_id_list": ["a.png1"]}
    return json.dumps(doc).encode()


PREFIXES = {"none": b"", "utf-8 BOM": b"\xef\xbb\xbf", "utf-16 BOM": b"\xff\xfe", "deep": b"[" * 100_000}


# nesting deeper than the recursion limit: json raised RecursionError
@example(ops=[], cut=None, prefix="deep")
@given(ops=OPS, cut=CUT, prefix=st.sampled_from(sorted(PREFIXES)))
@_settings(40)
def test_read_via_mutated_bytes(workdir, ops, cut, prefix):
    path = workdir / "via_bytes.json"
    path.write_bytes(PREFIXES[prefix] + _mutate(_valid_via_bytes(), ops, cut))
    _read_via_checked(path, workdir)


@st.composite
def voc_files(draw) -> str:
    mode = draw(MODES)
    number = {"sane": SANE_NUMBER.map(str),
              "extreme": st.one_of(NUMBER.map(str), st.sampled_from(["nan", "inf", "-inf", "1e400", "1e39"])),
              "chaos": st.one_of(NUMBER.map(str), WEIRD_TEXT, st.text(max_size=5))}[mode]
    chaos = mode == "chaos"
    parts = ["<annotation>"]
    if not chaos or draw(st.integers(0, 4)):
        name = draw(SANE_NAMES if mode == "sane" else st.one_of(NAME_TEXT, WEIRD_TEXT))
        parts.append(f"<filename>{escape(name)}</filename>")
    if draw(st.booleans()):
        keys = (draw(st.lists(st.sampled_from(["width", "height", "depth"]), max_size=3)) if chaos
                else ["width", "height"])
        parts.append("<size>" + "".join(f"<{k}>{escape(draw(number))}</{k}>" for k in keys) + "</size>")
    for _ in range(draw(st.integers(0, 3))):
        obj = [f"<name>{escape(draw(st.one_of(st.sampled_from(['blast', 'cell']), st.text(max_size=6))))}</name>"]
        if not chaos or draw(st.integers(0, 5)):
            obj.append("<bndbox>" + "".join(
                f"<{k}>{escape(draw(number))}</{k}>" for k in ("xmin", "ymin", "xmax", "ymax")
                if not chaos or draw(st.integers(0, 8))) + "</bndbox>")
        for extra in draw(st.lists(st.sampled_from(["difficult", "truncated", "pose"]), max_size=2)):
            obj.append(f"<{extra}>{escape(draw(st.text(max_size=4)))}</{extra}>")
        parts.append("<object>" + "".join(obj) + "</object>")
    parts.append("</annotation>")
    return "".join(parts)


BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
                  + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi"))
                  + ']><annotation><filename>&i;</filename></annotation>')


# a size of 1e400 (inf): int() of it raised OverflowError
@example(xml="<annotation><filename>a.png</filename><size><width>1e400</width><height>5</height></size>"
             "</annotation>")
@example(xml="<annotation><filename>a.png</filename><object><name>x</name><bndbox><xmin>nan</xmin><ymin>1</ymin>"
             "<xmax>5</xmax><ymax>9</ymax></bndbox></object></annotation>")
@example(xml=BILLION_LAUGHS)
@given(xml=st.one_of(voc_files(), voc_files(), voc_files(), st.text(max_size=40)))
@_settings(80)
def test_read_voc(workdir, xml):
    from wsi_apl.annotations import read_voc

    d = workdir / "voc"
    d.mkdir(exist_ok=True)
    path = d / "x.xml"
    path.write_text(xml, encoding="utf-8", errors="surrogatepass")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            items = read_voc(path, workdir)
    except (ValueError, FileNotFoundError) as exc:
        _assert_names(exc, path)
        return
    _check_annotations(items, workdir, clipped=False)  # VOC: clipped to its own <size> where it gives one


# ---------------------------------------------------------------------------------------------
# CSV files: labels.csv, cases.csv, labelled cells, the paper's layout

CELL = st.one_of(WEIRD_TEXT, st.sampled_from(["s1", "p1", "APL", " aml ", "healthy", "1", "0", "yes", "a.png",
                                              "bad.png", "missing.png", "/abs/slide", "../up", "a**b", "[x]",
                                              "line\nbreak", "a,b", '"q"', "\x00", "{'Promyelocyte'}", "set()",
                                              "[1, 2, 3, 4]", "[0, 0, 1e999, 5]", "{['a']}", "[10, 5, 0, 0]"]),
                 st.text(max_size=10))
def _mostly(valid: list, invalid: list):
    """One of ``valid`` three times in four, else one of ``invalid``."""
    return st.one_of(*[st.sampled_from(valid)] * 3, st.sampled_from(invalid))


COORD = st.one_of(SANE_NUMBER.map(str), SANE_NUMBER.map(str), SANE_NUMBER.map(str), SANE_NUMBER.map(str),
                  st.sampled_from(["nan", "inf", "-1e400", "1e39", " 7 ", "", "x"]))
#: What a column of each file mostly holds (any other column: any CELL).
COLUMN_VALUES = {
    "slide": _mostly(["s1", "s2.svs", "a.png", "sub/s3", " s4 "], ["/abs/slide", "a**b", "[x]", "", "a" * 300]),
    "patient": _mostly(["P1", "P2", " P3 "], [""]), "case": _mostly(["C1", " C2 "], [""]),
    "diagnosis": _mostly(["APL", " aml ", "healthy", "reactive"], ["?", ""]),
    "image": _mostly(["a.png", " a.png "], ["bad.png", "missing.png", ""]),
    "x0": COORD, "y0": COORD, "x1": COORD, "y1": COORD,
    "Auer rod": _mostly(["1", "0", "", "yes", "No"], ["maybe"]), "promyelocyte": _mostly(["1", "0", ""], ["2"]),
    "id": _mostly(["P1", "P2"], [""]), "imgName": _mostly(["a.png", " a.png"], ["missing.png", ""]),
    "label": _mostly(["APL", "AML", "healthy"], ["", "?"]),
    "labels": _mostly(["{'Promyelocyte'}", "{'Auer rod', 'Blast'}", "set()", "", "'Blast'"],
                      ["{['a']}", "{1: 2}", "[", "{'a'", "b'x'", "{{}}"]),
    "bbox": st.one_of(*[st.lists(SANE_NUMBER, min_size=4, max_size=4).map(str)] * 3,
                      st.sampled_from(["[0, 0, 1e999, 5]", "[1, 2, 3]", "(1, 2, 3, 4)", "[10, 5, 0, 0]", "", "x",
                                       "[" + "9" * 400 + ", 0, 1, 1]", "{1, 2, 3, 4}", "'abcd'", "[[1], 2, 3, 4]"])),
    "objectType": _mostly(["Cell", "Cell", "Smudge", "Not recognizeable"], [""]),
}


@st.composite
def csv_bytes(draw, columns: list[str]) -> bytes:
    """A CSV under a header that is mostly right (all columns in any order, perhaps extras), sometimes
    wrong; rows mostly of the header's length with each column's typical values, sometimes short, long
    or of any text; written properly or sloppily, in UTF-8 with or without a BOM or in Latin-1; now and
    then with a field beyond csv's size limit or mutated bytes."""
    header = draw(st.one_of(
        st.permutations(columns), st.permutations(columns), st.permutations(columns + ["extra", "path"]),
        st.permutations(columns + ["extra"]).map(lambda p: p[:-2]),  # one or two columns missing
        st.lists(st.one_of(st.sampled_from(columns), st.text(max_size=5)), max_size=6)))
    typical = st.tuples(*[COLUMN_VALUES.get(c, CELL) for c in header]).map(list)
    rows = draw(st.lists(st.one_of(typical, typical, typical, typical, typical,
                                   st.lists(CELL, min_size=max(0, len(header) - 2), max_size=len(header) + 2)),
                         max_size=4))
    if draw(st.integers(0, 3)):
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        text = buf.getvalue()
    else:
        text = "\n".join(",".join(r) for r in [header, *rows]) + draw(st.sampled_from(["", "\n", "\r\n", '"']))
    if draw(st.integers(0, 19)) == 0:
        text += "\n" + ",".join(["x" * 140_000] * len(header))  # beyond csv's field size limit
    enc = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1"]))
    data = text.encode(enc, errors="replace") if enc == "latin-1" else text.encode(enc, errors="surrogatepass")
    if draw(st.integers(0, 7)) == 0:
        data = _mutate(data, draw(st.lists(st.tuples(st.just("byte"), st.integers(0, 2**16), st.integers(0, 255)),
                                           min_size=1, max_size=2)), None)
    return data


def _csv_error_ok(exc: BaseException, path: Path, *also: Path) -> None:
    assert isinstance(exc, (ValueError, FileNotFoundError)), f"{type(exc).__name__}: {exc}"
    _assert_names(exc, path, *also)


@example(data=b"\xef\xbb\xbfslide,patient,diagnosis,path\ns1,P1, APL ,a.png\ns2,P2,healthy,\n")
# a row shorter than the header: row['diagnosis'] was None and .strip() raised AttributeError
@example(data=b"slide,patient,diagnosis\ns1,p1\n")
# an absolute slide name without a suffix: Path.glob raised NotImplementedError
@example(data=b"slide,patient,diagnosis\n/abs/slide,p1,apl\n")
@example(data=b"slide,patient,diagnosis\na**b,p1,apl\n")
@example(data=b"slide,patient,diagnosis\ns\xff1,p1,apl\n")  # not UTF-8
@given(data=csv_bytes(["slide", "patient", "diagnosis"]))
@_settings(80)
def test_read_labels(workdir, data):
    from wsi_apl.train.data import SlideEntry, read_labels

    d = workdir / "cohort"
    d.mkdir(exist_ok=True)
    path = d / "labels.csv"
    path.write_bytes(data)
    try:
        entries = read_labels(path)
    except Exception as exc:  # noqa: BLE001 - the property is about the type
        _csv_error_ok(exc, path)
        return
    event(f"parsed, {'some' if entries else 'no'} rows")
    for e in entries:
        assert isinstance(e, SlideEntry) and isinstance(e.path, Path)
        assert all(isinstance(v, str) for v in (e.slide, e.patient, e.diagnosis))
        assert e.diagnosis == e.diagnosis.strip().lower()


@example(data=b"slide,case\nx.svs\n")  # a short row: None.strip() raised AttributeError
@given(data=csv_bytes(["slide", "case"]))
@_settings(60)
def test_read_cases(workdir, data):
    from wsi_apl.inbox import read_cases

    path = workdir / "cases.csv"
    path.write_bytes(data)
    try:
        cases = read_cases(path)
    except Exception as exc:  # noqa: BLE001
        _csv_error_ok(exc, path)
        return
    event(f"parsed, {'some' if cases else 'no'} rows")
    assert all(isinstance(k, str) and isinstance(v, str) and k == k.strip() and v == v.strip()
               for k, v in cases.items())


HEADS = ("auer_rod", "promyelocyte")


@example(data=b"image,x0,y0,x1,y1,Auer rod,patient\na.png,1,2,9,12,1,P1\na.png,20,5,30,9,,P1\nbad.png,1,1,5,5,0,\n")
@example(data=b"image,x0,y0,x1,y1,auer_rod\na.png,1,2\n")  # short row: float(None) raised TypeError
@example(data=b"image,x0,y0,x1,y1,auer_rod\n" + b"a" * 300 + b".png,1,2,5,9,1\n")  # OSError: name too long
@example(data=b"image,x0,y0,x1,y1,auer_rod\na.png,nan,2,5,9,1\n")  # a NaN centre
@given(data=csv_bytes(["image", "x0", "y0", "x1", "y1", "Auer rod", "promyelocyte", "patient"]))
@_settings(60)
def test_read_cells_csv(workdir, data):
    from wsi_apl.train.cell_labels import read_cells_csv
    from wsi_apl.train.cells import CellSet

    path = workdir / "cells.csv"
    path.write_bytes(data)
    logged = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cells = read_cells_csv(path, None, HEADS, 0.5, 0.25, log=logged.append)
    except Exception as exc:  # noqa: BLE001
        _csv_error_ok(exc, path)
        return
    assert isinstance(cells, CellSet)
    n = len(cells)
    event(f"parsed, {'some' if n else 'no'} cells")
    assert cells.centres.shape == (n, 2) and np.isfinite(cells.centres).all()
    assert cells.labels.shape == (n, len(HEADS))
    assert np.isin(cells.labels[~np.isnan(cells.labels)], (0.0, 1.0)).all()
    assert len(cells.patients) == n and (cells.area_idx < len(cells.images)).all()
    assert all(im.ndim == 3 and im.shape[2] == 3 for im in cells.images)


@given(text=st.one_of(CELL, st.text(max_size=30), st.lists(NUMBER, max_size=5).map(str),
                      st.lists(st.one_of(st.text(max_size=4), NUMBER), max_size=3).map(
                          lambda v: str(set(map(str, v))))))
@example(text="{['a']}")  # an unhashable set member: ast.literal_eval raised TypeError
@example(text="[" + "1" * 400 + ", 0, " + "2" * 400 + ", 5]")  # float() of a 400-digit int: OverflowError
@example(text="[0, 0, 1e999, 5]")  # an infinite box
@_settings(80)
def test_paper_bbox_and_labels(text):
    from wsi_apl.paper_layout import parse_bbox, parse_labels

    try:
        x0, y0, x1, y1 = parse_bbox(text, "where.csv")
        assert all(math.isfinite(v) for v in (x0, y0, x1, y1)) and x1 > x0 and y1 > y0
    except ValueError as exc:
        assert "where.csv" in str(exc)
    try:
        labels = parse_labels(text, "where.csv")
        assert isinstance(labels, frozenset) and all(isinstance(v, str) for v in labels)
    except ValueError as exc:
        assert "where.csv" in str(exc)


@example(frames=b"id,imgName,label\nP1,a.png,APL\n",
         objects=b"imgName,bbox,labels,objectType\na.png,\"[1, 2, 10, 12]\",\"{'Promyelocyte', 'Auer rod'}\",Cell\n")
@example(frames=b"id,imgName,label\nP1\n", objects=b"imgName,bbox,labels,objectType\n")  # short rows
# an empty imgName: the folder itself (rglob('') yields folders) was taken for the picture
@example(frames=b"id,imgName,label\nP1,,apl\n", objects=b"imgName,bbox,labels,objectType\na.png\n")
@given(frames=csv_bytes(["id", "imgName", "label"]), objects=csv_bytes(["imgName", "bbox", "labels", "objectType"]))
@_settings(40)
def test_paper_layout_csvs(workdir, frames, objects):
    from wsi_apl.paper_layout import CELLS_CSV, FRAMES_CSV, PaperFrame, PaperObject, read_frames, read_objects

    root = workdir / "paper"
    root.mkdir(exist_ok=True)
    if not (root / "a.png").exists():
        (root / "a.png").write_bytes((workdir / "a.png").read_bytes())
    (root / FRAMES_CSV).write_bytes(frames)
    (root / CELLS_CSV).write_bytes(objects)
    try:
        got = read_frames(root)
    except Exception as exc:  # noqa: BLE001
        _csv_error_ok(exc, root / FRAMES_CSV, root)
    else:
        assert all(isinstance(f, PaperFrame) and f.picture.is_file() for f in got)
    try:
        objs = read_objects(root)
    except Exception as exc:  # noqa: BLE001
        _csv_error_ok(exc, root / CELLS_CSV)
    else:
        assert all(isinstance(o, PaperObject) and all(math.isfinite(v) for v in o.box) for o in objs)
