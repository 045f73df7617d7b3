"""Plain pictures are read whole, so their size is checked from the header against PLAIN_MAX_PIXELS
before any pixel is decoded; Pillow's process-wide decompression-bomb limit is left alone."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from tile_selector import readers as readers_mod
from tile_selector.errors import UnreadableSlide
from tile_selector.readers import PLAIN_MAX_PIXELS, picture_size
from tile_selector.slide import open_slide

ROOT = Path(__file__).resolve().parents[2]


def _bomb_png(path: Path, w: int, h: int) -> Path:
    """A valid white 1-bit PNG of ``w`` x ``h`` px, built a row at a time (a few KB; never ``w * h`` in
    memory): decoded, it is ``w * h`` bytes in Pillow and ``3 * w * h`` as RGB."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    stride = (w + 7) // 8
    z = zlib.compressobj(9)
    idat = [z.compress(b"\x00" + b"\xff" * stride)]
    same = b"\x02" + bytes(stride)          # filter "Up", no change: every row repeats the first
    idat += [z.compress(same) for _ in range(h - 1)]
    idat.append(z.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test (instead of allocating gigabytes)."""
    def refuse(self, *a, **k):
        raise AssertionError(f"pixels of {self.size} decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_huge_png_is_refused_from_its_header(tmp_path, no_decoding):
    bomb = _bomb_png(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 200_000            # 400 Mpx in a small file
    with pytest.raises(UnreadableSlide) as err:
        open_slide(bomb, mpp=0.25)
    msg = str(err.value)
    assert "bomb.png" in msg and "20000x20000" in msg and "400,000,000" in msg and f"{PLAIN_MAX_PIXELS:,}" in msg
    assert "pyramidal TIFF" in msg and "tiffsave" in msg
    assert picture_size(bomb) == (20000, 20000)    # the header is still read (annotations clip to it)


def test_camera_frame_still_opens(tmp_path):
    p = tmp_path / "frame.png"
    Image.new("RGB", (2560, 1920), (200, 180, 210)).save(p)
    s = open_slide(p, mpp=0.0668)
    assert s.is_plain and s.dimensions == (2560, 1920)
    assert s.read_area((0, 0, 2560, 1920), (640, 480)).image[0, 0].tolist() == [200, 180, 210]


def test_limit_is_applied_by_pixel_count(tmp_path, monkeypatch):
    monkeypatch.setattr(readers_mod, "PLAIN_MAX_PIXELS", 64 * 48)
    Image.new("RGB", (64, 48), "white").save(tmp_path / "ok.png")
    Image.new("RGB", (65, 48), "white").save(tmp_path / "big.jpg")
    assert open_slide(tmp_path / "ok.png", mpp=0.5).dimensions == (64, 48)
    with pytest.raises(UnreadableSlide, match="65x48 = 3,120 pixels"):
        open_slide(tmp_path / "big.jpg", mpp=0.5)


def test_pillow_limit_untouched(tmp_path):
    """Importing and using the readers leaves ``Image.MAX_IMAGE_PIXELS`` as Pillow set it (fresh process)."""
    bomb = _bomb_png(tmp_path / "bomb.png", 20000, 20000)
    code = f"""
import json, sys
from PIL import Image
before = Image.MAX_IMAGE_PIXELS
import tile_selector.slide
after_import = Image.MAX_IMAGE_PIXELS
from wsi_apl.annotations import _image_size
size = _image_size(__import__("pathlib").Path({str(bomb)!r}))
try:
    tile_selector.slide.open_slide({str(bomb)!r}, mpp=0.25)
    refused = False
except tile_selector.slide.UnreadableSlide:
    refused = True
print(json.dumps([before, after_import, Image.MAX_IMAGE_PIXELS, size, refused]))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    before, after_import, after_use, size, refused = json.loads(r.stdout.strip().splitlines()[-1])
    assert after_import == before and after_use == before
    assert size == [20000, 20000] and refused
    assert PLAIN_MAX_PIXELS < before   # so Pillow's own check never fires on a picture we accept
