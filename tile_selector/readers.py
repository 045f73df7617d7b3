"""The slide readers behind :class:`tile_selector.slide.Slide`: one small protocol, three backends.

- :class:`OpenSlideReader`: openslide-python (vendor formats and generic tiled TIFF),
- :class:`TiffSlideReader`: tiffslide (TIFF-based files; a fallback, or chosen with ``reader="tiffslide"``),
- :class:`PictureReader`: Pillow (JPEG, PNG, BMP, single-page TIFF, decoded whole as a one-level slide).

Each one opens with ``Reader.open(path)`` (raising the :mod:`tile_selector.errors` family, which names
the file and the fix), says what it serves (vendor, levels, resolution if the file states one,
objective power, associated image names), reads regions of its levels, and closes its handles; each
is a context manager. Label and macro images are listed by name only; no reader returns their pixels.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from .errors import SlideError, UnreadableSlide, UnsupportedFormat

TIFF_EXTENSIONS = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".svslide"}
#: Resolutions coarser than this are screen or print DPI (72 dpi = 352.8 µm/px), not a microscope:
#: treated as missing.
MAX_PLAUSIBLE_MPP = 25.0
#: The largest plain picture (JPEG, PNG, BMP, single-page TIFF) read: unlike a pyramid, it is decoded
#: whole and kept in memory (Pillow's 4 bytes/px, a converted copy and the 3 bytes/px array: ~1 GB at
#: this size while opening, 236 MB kept per open picture). A bundle's area is one camera frame of at
#: most 2560x1920 px, so 16 frames' worth (e.g. 10240x7680 stitched) is generous headroom; it is also
#: below Pillow's own MAX_IMAGE_PIXELS (89.5 Mpx), so a picture read here never trips Pillow's
#: decompression-bomb check, which this module leaves as it is for the whole process.
PLAIN_MAX_PIXELS = 16 * 2560 * 1920   # 78,643,200 px
PYRAMID_FIX = "convert it to a pyramidal TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid) so it is read in tiles"



@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float



class SlideReader(Protocol):
    """What :class:`tile_selector.slide.Slide` needs of a backend."""

    name: str                        # "openslide" | "tiffslide" | "pil"
    vendor: str
    levels: list[Level]              # the levels served, level 0 first
    mpp_x: float | None              # as the file states it (None: no usable resolution)
    mpp_y: float | None
    objective_power: float | None
    associated_images: list[str]     # names only

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels (h, w, 1-4 channels) of a region in ``level`` pixels, fully inside the level."""

    def close(self) -> None:
        """Release the file's handles."""


class _Reader:
    """What the three backends share: the facts, and closing as a context manager."""

    name = ""

    def __init__(self, vendor: str, levels: list[Level], mpp_x: float | None, mpp_y: float | None,
                 objective_power: float | None, associated_images: list[str]):
        self.vendor, self.levels = vendor, levels
        self.mpp_x, self.mpp_y, self.objective_power = mpp_x, mpp_y, objective_power
        self.associated_images = associated_images

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _HandleReader(_Reader):
    """A reader over an openslide-style handle (openslide and tiffslide share the API): the levels it
    serves (indices into the handle's own), the facts from the handle's ``<prefix>.*`` properties."""

    prefix = ""

    def __init__(self, handle, served: list[int], **facts):
        super().__init__(**facts)
        self._handle, self._served = handle, served
        self._lock = contextlib.nullcontext()

    @classmethod
    def _of_handle(cls, handle, served: list[int], dims: list, downs: list, vendor: str) -> _HandleReader:
        props = handle.properties
        return cls(handle, served, vendor=vendor,
                   levels=[Level(int(dims[i][0]), int(dims[i][1]), float(downs[i])) for i in served],
                   mpp_x=_plausible(_float(props.get(f"{cls.prefix}.mpp-x"))),
                   mpp_y=_plausible(_float(props.get(f"{cls.prefix}.mpp-y"))),
                   objective_power=_float(props.get(f"{cls.prefix}.objective-power")),
                   associated_images=sorted(handle.associated_images))

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.levels[level].downsample
        with self._lock:
            return np.asarray(self._handle.read_region((int(round(x * ds)), int(round(y * ds))), self._served[level],
                                                       (w, h)))

    def close(self) -> None:
        self._handle.close()


class OpenSlideReader(_HandleReader):
    """openslide-python. Thread-safe reads (openslide serialises what it must)."""

    name = prefix = "openslide"

    @classmethod
    def open(cls, path: Path) -> OpenSlideReader:
        import openslide

        oversized = _oversized_tile(path)
        if oversized:  # refused before openslide reads a tile (it would abort, not raise)
            raise UnreadableSlide(path, f"corrupt TIFF header: {oversized}",
                                  "the file may be truncated or corrupt; copy it again from the scanner")
        try:
            handle = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedFormat(path, "not a slide format openslide reads", "") from exc
        except openslide.OpenSlideError as exc:
            raise UnreadableSlide(path, f"openslide cannot read it ({exc})",
                                  "the file may be truncated or corrupt; copy it again from the scanner") from exc
        dims = list(handle.level_dimensions)
        downs = list(handle.level_downsamples)
        idx = list(range(len(dims)))
        stored = _stored_tiff_sizes(path) if path.suffix.lower() in TIFF_EXTENSIONS else None
        if stored:
            keep = [i for i in idx if tuple(dims[i]) in stored]
            if keep:  # serve the levels stored in the file (NDPI: openslide adds JPEG-scaled ones)
                idx = keep
        return cls._of_handle(handle, idx, dims, downs, handle.properties.get("openslide.vendor", "unknown"))


class TiffSlideReader(_HandleReader):
    """tiffslide. Its reads are serialised here: a TiffSlide is not safe to share between threads."""

    name = prefix = "tiffslide"

    def __init__(self, handle, served: list[int], **facts):
        super().__init__(handle, served, **facts)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> TiffSlideReader:
        import tiffslide

        try:
            handle = tiffslide.TiffSlide(str(path))
            dims = list(handle.level_dimensions)
            downs = list(handle.level_downsamples)
        except Exception as exc:
            text = str(exc)
            if "not a TIFF" in text or "not a tiff" in text.lower():
                raise UnsupportedFormat(path, "not a TIFF-based slide", "") from exc
            raise UnreadableSlide(path, f"tiffslide cannot read it ({type(exc).__name__}: {exc})",
                                  "the file may be truncated or corrupt; copy it again from the scanner") from exc
        return cls._of_handle(handle, list(range(len(dims))), dims, downs,
                              handle.properties.get("tiffslide.vendor") or "generic-tiff")


class PictureReader(_Reader):
    """Pillow: a plain picture, decoded whole once (size-checked from its header first)."""

    name = "pil"

    def __init__(self, pixels: np.ndarray, **facts):
        super().__init__(**facts)
        self._pixels = pixels

    @classmethod
    def open(cls, path: Path) -> PictureReader:
        try:
            with _open_header(path) as im:
                _check_plain_size(path, im.size)   # before any pixel is decoded
                n_frames = getattr(im, "n_frames", 1)
                if n_frames > 1 and im.format == "TIFF":
                    raise UnsupportedFormat(path, "a multi-page TIFF that is not a tiled slide pyramid",
                                            "save it as a tiled pyramidal TIFF or a single picture")
                mpp_x, mpp_y = _pil_mpp(im)
                fmt = im.format or "image"
                arr = np.asarray(im.convert("RGB"))
        except SlideError:
            raise
        except Exception as exc:
            if isinstance(exc, Image.UnidentifiedImageError):
                raise UnsupportedFormat(path, "not an image or slide format this tool reads", "") from exc
            raise UnreadableSlide(path, f"cannot decode the picture ({type(exc).__name__}: {exc})",
                                  "the file may be truncated; copy it again") from exc
        h, w = arr.shape[:2]
        return cls(arr, vendor=f"plain-{fmt.lower()}", levels=[Level(w, h, 1.0)], mpp_x=mpp_x, mpp_y=mpp_y,
                   objective_power=None, associated_images=[])

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._pixels[y:y + h, x:x + w]

    def close(self) -> None:
        self._pixels = np.zeros((0, 0, 3), np.uint8)


READER_CLASSES: dict[str, type[_Reader]] = {"openslide": OpenSlideReader, "tiffslide": TiffSlideReader,
                                            "pil": PictureReader}


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp) or mpp <= 0 or mpp >= MAX_PLAUSIBLE_MPP:
        return None
    return float(mpp)


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _stored_tiff_sizes(path: Path) -> set[tuple[int, int]] | None:
    """(width, height) of every page of a TIFF-based file, or None if it is not a TIFF."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return {(int(p.imagewidth), int(p.imagelength)) for p in tf.pages}
    except Exception:  # not a TIFF, or unreadable: the reader decides
        return None


#: Tiles larger than this (pixels) are a corrupt TIFF header, not a scanner's choice (scanners tile at
#: 240-4096 px): openslide allocates a whole tile per read and glib aborts the process when it cannot.
MAX_TILE_PIXELS = 1 << 26


def _oversized_tile(path: Path) -> str | None:
    """A description of the first TIFF page whose tiles exceed :data:`MAX_TILE_PIXELS`, else None."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            for p in tf.pages:
                if p.is_tiled and int(p.tilewidth) * int(p.tilelength) > MAX_TILE_PIXELS:
                    return f"page {p.index} claims {p.tilewidth}x{p.tilelength}-pixel tiles"
    except Exception:  # not a TIFF, or unreadable: the reader decides
        return None
    return None


def _pil_mpp(im: Image.Image) -> tuple[float | None, float | None]:
    dpi = im.info.get("dpi")
    if dpi is None and im.format == "TIFF":
        try:
            xr, yr = im.tag_v2.get(282), im.tag_v2.get(283)
            unit = im.tag_v2.get(296, 2)
            if xr and yr:
                f = 2.54 if unit == 3 else 1.0  # per-centimetre -> per-inch
                dpi = (float(xr) * f, float(yr) * f)
        except AttributeError:
            dpi = None
    if im.format == "JPEG" and im.info.get("jfif_unit", 0) == 0:
        dpi = None  # JFIF unit 0: an aspect ratio, not a resolution
    if not dpi:
        return None, None
    try:
        return _plausible(25400.0 / float(dpi[0])), _plausible(25400.0 / float(dpi[1]))
    except (TypeError, ValueError, ZeroDivisionError):
        return None, None


@contextlib.contextmanager
def _open_header(path: Path) -> Iterator[Image.Image]:
    """The picture as a lazy Pillow image (header parsed, no pixels decoded), like ``Image.open`` but
    without Pillow's process-wide decompression-bomb check: callers compare ``im.size`` with their
    own limit. Thread-safe: no process-wide state (``Image.MAX_IMAGE_PIXELS``) is changed.
    Raises ``PIL.UnidentifiedImageError`` when no Pillow plugin reads the header."""
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        tried: set[str] = set()
        for load in (Image.preinit, Image.init):   # the common plugins first, then all of them
            load()
            for fmt in [f for f in Image.ID if f not in tried]:
                tried.add(fmt)
                factory, accept = Image.OPEN[fmt]
                ok = accept(prefix) if accept else True
                if not ok or isinstance(ok, str):   # a str: Pillow's warning that the format is not read
                    continue
                fp.seek(0)
                try:
                    im = factory(fp, str(path))
                except (SyntaxError, IndexError, TypeError, struct.error):
                    continue   # what Image.open treats as "not this format"
                try:
                    yield im
                finally:
                    im.close()
                return
    raise Image.UnidentifiedImageError(f"cannot identify image file {str(path)!r}")


def picture_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) from a picture's header, for any size (slides included), without decoding pixels
    or touching ``Image.MAX_IMAGE_PIXELS``; None when Pillow cannot read the header."""
    try:
        with _open_header(Path(path)) as im:
            return tuple(im.size)
    except Exception:  # an unreadable header: the caller decides
        return None


def _check_plain_size(path: Path, size: tuple[int, int]) -> None:
    w, h = size
    if w * h > PLAIN_MAX_PIXELS:
        raise UnreadableSlide(path, f"a plain picture of {w}x{h} = {w * h:,} pixels, more than the "
                              f"{PLAIN_MAX_PIXELS:,} pixels (16 camera frames of 2560x1920) read whole into memory",
                              PYRAMID_FIX)
