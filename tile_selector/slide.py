"""One small interface over whole-slide images and plain pictures.

``open_slide(path)`` returns a :class:`Slide` backed by openslide-python (vendor formats: Aperio SVS,
Hamamatsu NDPI/VMS, 3DHistech MRXS, Leica SCN, Ventana BIF, Philips TIFF, generic tiled TIFF),
tiffslide (fallback for TIFF-based files, or chosen with ``reader="tiffslide"``) or Pillow (JPEG,
PNG, BMP and single-page TIFF served as a one-level slide).

Units: positions and boxes are level-0 pixels ``(x0, y0, x1, y1)``; resolution is µm per pixel.
Label and macro images are listed by name only; this module never returns their pixels.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import MissingResolution, ResolutionTooCoarse, SlideError, UnreadableSlide, UnsupportedFormat

PLAIN_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}
TIFF_EXTENSIONS = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".svslide"}
OPENSLIDE_EXTENSIONS = TIFF_EXTENSIONS | {".mrxs", ".vms", ".vmu", ".dcm"}
SLIDE_EXTENSIONS = OPENSLIDE_EXTENSIONS | PLAIN_EXTENSIONS
#: Formats we recognise but cannot read, with what to do instead.
REFUSED_FORMATS = {
    ".vsi": ("Olympus VSI (cellSens): the pixels live in separate .ets files that openslide and tiffslide "
             "cannot read", "export the slide as OME-TIFF or SVS, e.g. with Bio-Formats bfconvert"),
    ".czi": ("Zeiss CZI is not supported by openslide or tiffslide", "export the slide as OME-TIFF"),
    ".lif": ("Leica LIF is not supported", "export the slide as OME-TIFF"),
    ".ets": ("an Olympus .ets pixel file: it belongs to a .vsi slide that is not supported",
             "export the slide as OME-TIFF or SVS"),
}
#: Resolutions coarser than this are screen or print DPI (72 dpi = 352.8 µm/px), not a microscope.
MAX_PLAUSIBLE_MPP = 25.0
#: A request finer than the slide by more than this factor is refused, never silently upsampled.
UPSAMPLE_TOLERANCE = 1.25

READERS = ("auto", "openslide", "tiffslide", "pil")
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


@dataclass
class AreaRead:
    """Pixels of an area and how they were obtained."""

    image: np.ndarray          # (h, w, 3) uint8
    level: int                 # pyramid level read
    outside_fraction: float    # share of the area outside the slide (padded with background)


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp) or mpp <= 0 or mpp >= MAX_PLAUSIBLE_MPP:
        return None
    return float(mpp)


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


@dataclass
class Slide:
    """An open slide. Use :func:`open_slide` to make one."""

    path: Path
    reader: str
    vendor: str
    levels: list[Level]
    mpp_x: float
    mpp_y: float
    mpp_source: str                 # "metadata" | "user"
    objective_power: float | None
    associated_images: list[str]
    _handle: object = field(repr=False, default=None)
    _reader_levels: list[int] = field(repr=False, default_factory=list)
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)
    _plain: np.ndarray | None = field(repr=False, default=None)
    pixels_read: int = 0            # decoded pixels served so far (for benchmarks)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    @property
    def mpp(self) -> float:
        """Mean µm per level-0 pixel."""
        return (self.mpp_x + self.mpp_y) / 2.0

    @property
    def is_plain(self) -> bool:
        return self.reader == "pil"

    def info(self) -> dict:
        """The facts ``wsi-apl info --json`` prints (a contract: reader, vendor, mpp, levels)."""
        return {
            "path": str(self.path),
            "reader": self.reader,
            "vendor": self.vendor,
            "mpp": [self.mpp_x, self.mpp_y],
            "mpp_source": self.mpp_source,
            "levels": [{"width": lv.width, "height": lv.height, "downsample": lv.downsample}
                       for lv in self.levels],
            "objective_power": self.objective_power,
            "associated_images": list(self.associated_images),
            "plain_image": self.is_plain,
        }

    # -- pixels --------------------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (level just finer)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * 1.0001:
                best = i
        return best

    def read_level_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a region given in ``level`` pixels, fully inside the level."""
        if w <= 0 or h <= 0:
            return np.zeros((max(h, 0), max(w, 0), 3), np.uint8)
        self.pixels_read += w * h
        try:
            if self._plain is not None:
                return self._plain[y:y + h, x:x + w]
            ds = self.levels[level].downsample
            loc = (int(round(x * ds)), int(round(y * ds)))
            rl = self._reader_levels[level]
            if self.reader == "openslide":
                im = self._handle.read_region(loc, rl, (w, h))
            else:
                with self._lock:
                    im = self._handle.read_region(loc, rl, (w, h))
            arr = np.asarray(im)
        except SlideError:
            raise
        except Exception as exc:  # the readers raise many types for corrupt tiles
            raise UnreadableSlide(self.path, f"cannot read pixels ({type(exc).__name__}: {exc})",
                                  "the file may be truncated or corrupt; copy it again from the scanner") from exc
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.shape[2] == 4:
            alpha = arr[..., 3:4].astype(np.float32) / 255.0
            rgb = arr[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
            arr = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3])

    def read_area(self, box: tuple[float, float, float, float], out_size: tuple[int, int], *,
                  upsample: bool = False) -> AreaRead:
        """Pixels of a level-0 ``box`` resampled to ``out_size`` (w, h), antialiased.

        The level just finer than needed is read and downsampled. A request finer than level 0
        by more than 25 % raises :class:`ResolutionTooCoarse`, or with ``upsample`` gets level 0
        enlarged (the cell crops' second read: a 20x scan gives them no rod detail, but its cells
        are still classified). Parts of the box outside the slide are padded with white and
        reported as ``outside_fraction``.
        """
        x0, y0, x1, y1 = (float(v) for v in box)
        ow, oh = int(out_size[0]), int(out_size[1])
        if x1 <= x0 or y1 <= y0 or ow <= 0 or oh <= 0:
            raise ValueError(f"empty area {box} -> {out_size}")
        scale = min((x1 - x0) / ow, (y1 - y0) / oh)  # level-0 px per output px
        if scale < 1.0 / UPSAMPLE_TOLERANCE and not upsample:
            asked = self.mpp * scale
            raise ResolutionTooCoarse(
                self.path, f"slide resolution {self.mpp:.3f} µm/px is coarser than the {asked:.3f} µm/px asked "
                f"for by more than 25 %", "use a model bundle that works at a coarser resolution, or rescan "
                "the slide with a higher-magnification objective")
        level = self.best_level(scale)
        ds = self.levels[level].downsample
        lw, lh = self.levels[level].width, self.levels[level].height
        # the box in level pixels, expanded to whole pixels
        bx0, by0, bx1, by1 = x0 / ds, y0 / ds, x1 / ds, y1 / ds
        ix0, iy0 = int(math.floor(bx0)), int(math.floor(by0))
        ix1, iy1 = int(math.ceil(bx1)), int(math.ceil(by1))
        canvas = np.full((iy1 - iy0, ix1 - ix0, 3), 255, np.uint8)
        cx0, cy0, cx1, cy1 = max(ix0, 0), max(iy0, 0), min(ix1, lw), min(iy1, lh)
        inside = 0
        if cx1 > cx0 and cy1 > cy0:
            canvas[cy0 - iy0:cy1 - iy0, cx0 - ix0:cx1 - ix0] = self.read_level_region(level, cx0, cy0,
                                                                                      cx1 - cx0, cy1 - cy0)
            inside = (cx1 - cx0) * (cy1 - cy0)
        outside = 1.0 - inside / float(canvas.shape[0] * canvas.shape[1])
        sub = (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
        if canvas.shape[1] == ow and canvas.shape[0] == oh and sub == (0.0, 0.0, float(ow), float(oh)):
            image = canvas
        else:
            image = np.asarray(Image.fromarray(canvas).resize((ow, oh), Image.Resampling.LANCZOS, box=sub))
        return AreaRead(image=image, level=level, outside_fraction=max(0.0, outside))

    def read_overview(self, target_mpp: float, max_side: int = 4096) -> tuple[np.ndarray, float]:
        """The whole slide at about ``target_mpp`` µm/px (never larger than ``max_side`` px).

        Returns ``(image, mpp_of_image)``.
        """
        w0, h0 = self.dimensions
        factor = max(target_mpp / self.mpp, max(w0, h0) / max_side, 1.0)
        ow, oh = max(1, int(round(w0 / factor))), max(1, int(round(h0 / factor)))
        read = self.read_area((0, 0, w0, h0), (ow, oh))
        return read.image, self.mpp * (w0 / ow)

    def close(self) -> None:
        if self._handle is not None and hasattr(self._handle, "close"):
            self._handle.close()
        self._handle = None


# ---------------------------------------------------------------------------------------------
# opening


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


def _open_openslide(path: Path):
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
    props = handle.properties
    mpp_x = _plausible(_float(props.get("openslide.mpp-x")))
    mpp_y = _plausible(_float(props.get("openslide.mpp-y")))
    vendor = props.get("openslide.vendor", "unknown")
    power = _float(props.get("openslide.objective-power"))
    dims = list(handle.level_dimensions)
    downs = list(handle.level_downsamples)
    idx = list(range(len(dims)))
    stored = _stored_tiff_sizes(path) if path.suffix.lower() in TIFF_EXTENSIONS else None
    if stored:
        keep = [i for i in idx if tuple(dims[i]) in stored]
        if keep:  # serve the levels stored in the file (NDPI: openslide adds JPEG-scaled ones)
            idx = keep
    levels = [Level(int(dims[i][0]), int(dims[i][1]), float(downs[i])) for i in idx]
    return handle, "openslide", vendor, levels, idx, mpp_x, mpp_y, power, sorted(handle.associated_images)


def _open_tiffslide(path: Path):
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
    props = handle.properties
    mpp_x = _plausible(_float(props.get("tiffslide.mpp-x")))
    mpp_y = _plausible(_float(props.get("tiffslide.mpp-y")))
    vendor = props.get("tiffslide.vendor") or "generic-tiff"
    power = _float(props.get("tiffslide.objective-power"))
    levels = [Level(int(w), int(h), float(d)) for (w, h), d in zip(dims, downs)]
    return (handle, "tiffslide", vendor, levels, list(range(len(levels))), mpp_x, mpp_y, power,
            sorted(handle.associated_images))


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


def _open_pil(path: Path):
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
        if isinstance(exc, (Image.UnidentifiedImageError,)):
            raise UnsupportedFormat(path, "not an image or slide format this tool reads", "") from exc
        raise UnreadableSlide(path, f"cannot decode the picture ({type(exc).__name__}: {exc})",
                              "the file may be truncated; copy it again") from exc
    h, w = arr.shape[:2]
    levels = [Level(w, h, 1.0)]
    return arr, "pil", f"plain-{fmt.lower()}", levels, [0], mpp_x, mpp_y, None, []


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise UnsupportedFormat(path, "is a folder, not a slide file",
                                "pass the slide file itself; for MRXS pass the .mrxs file next to its folder")
    if not path.exists():
        raise UnreadableSlide(path, "no such file", "check the path")
    if path.stat().st_size == 0:
        raise UnreadableSlide(path, "the file is empty (0 bytes)", "copy it again from the scanner")
    ext = path.suffix.lower()
    if ext in REFUSED_FORMATS:
        cause, fix = REFUSED_FORMATS[ext]
        raise UnsupportedFormat(path, cause, fix)


def open_slide(path: str | os.PathLike, reader: str = "auto", mpp: float | None = None) -> Slide:
    """Open ``path`` with the first reader that understands it.

    ``reader``: ``auto`` (openslide for vendor formats, tiffslide as fallback, Pillow for plain
    pictures), or one of ``openslide``, ``tiffslide``, ``pil``.
    ``mpp``: µm per pixel for a file *without* a usable resolution; ignored (with the file's own
    value kept) when the file states one. Screen resolutions (72/96 dpi) count as missing.
    """
    path = Path(path)
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; use one of {', '.join(READERS)}")
    _check_path(path)
    ext = path.suffix.lower()
    if reader == "auto":
        order = ["pil"] if ext in PLAIN_EXTENSIONS else ["openslide", "tiffslide", "pil"]
        if ext not in SLIDE_EXTENSIONS:
            order = ["openslide", "tiffslide", "pil"]
    else:
        order = [reader]
    openers = {"openslide": _open_openslide, "tiffslide": _open_tiffslide, "pil": _open_pil}
    errors: list[SlideError] = []
    for name in order:
        try:
            handle, rname, vendor, levels, idx, mpp_x, mpp_y, power, assoc = openers[name](path)
            break
        except UnsupportedFormat as exc:
            errors.append(exc)
        except UnreadableSlide as exc:
            errors.append(exc)
            if reader == "auto" and name != order[-1] and isinstance(exc, UnreadableSlide):
                continue
    else:
        unreadable = [e for e in errors if isinstance(e, UnreadableSlide)]
        if unreadable:
            raise unreadable[0]
        raise UnsupportedFormat(path, f"unsupported file format ({ext or 'no extension'})",
                                "supported: " + ", ".join(sorted(SLIDE_EXTENSIONS)))
    if not levels or any(lv.width <= 0 or lv.height <= 0 for lv in levels):
        raise UnreadableSlide(path, "the slide has an empty (zero-size) level", "the file is damaged; rescan it")
    source = "metadata"
    if mpp_x is None or mpp_y is None:
        if mpp is None:
            raise MissingResolution(path, "no resolution (µm per pixel) in the file",
                                    "give it with --mpp, e.g. --mpp 0.25 for a 40x scan")
        if not (0 < mpp < MAX_PLAUSIBLE_MPP):
            raise ValueError(f"--mpp {mpp} is not a microscope resolution (expected 0 < mpp < {MAX_PLAUSIBLE_MPP})")
        mpp_x = mpp_y = float(mpp)
        source = "user"
    slide = Slide(path=path, reader=rname, vendor=vendor, levels=levels, mpp_x=mpp_x, mpp_y=mpp_y,
                  mpp_source=source, objective_power=power, associated_images=assoc)
    if rname == "pil":
        slide._plain = handle
    else:
        slide._handle = handle
    slide._reader_levels = idx
    return slide


@functools.lru_cache(maxsize=16)
def _cached(path: str, reader: str, mpp: float | None, stamp: tuple[int, int]) -> Slide:
    return open_slide(path, reader=reader, mpp=mpp)


def open_slide_cached(path: str | os.PathLike, reader: str = "auto", mpp: float | None = None) -> Slide:
    """Like :func:`open_slide`, reusing one open handle per process (re-opening per read is slow).

    The cache key includes the file's size and modification time, so a replaced file is re-opened.
    """
    p = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(p)
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = (0, 0)
    return _cached(p, reader, mpp, stamp)
