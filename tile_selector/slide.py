"""One small interface over whole-slide images and plain pictures.

``open_slide(path)`` returns a :class:`Slide` backed by openslide-python (vendor formats: Aperio SVS,
Hamamatsu NDPI/VMS, 3DHistech MRXS, Leica SCN, Ventana BIF, Philips TIFF, generic tiled TIFF),
tiffslide (fallback for TIFF-based files, or chosen with ``reader="tiffslide"``) or Pillow (JPEG,
PNG, BMP and single-page TIFF served as a one-level slide).

Units: positions and boxes are level-0 pixels ``(x0, y0, x1, y1)``; resolution is µm per pixel.
Label and macro images are listed by name only; this module never returns their pixels.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import MissingResolution, ResolutionTooCoarse, SlideError, UnreadableSlide, UnsupportedFormat
from .readers import MAX_PLAUSIBLE_MPP, READER_CLASSES, TIFF_EXTENSIONS, Level, SlideReader

PLAIN_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}
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
#: A request finer than the slide by more than this factor is refused, never silently upsampled.
UPSAMPLE_TOLERANCE = 1.25

READERS = ("auto", "openslide", "tiffslide", "pil")
#: Slide facts allowed into outputs (labels, barcodes and names are patient data).
PUBLIC_FACTS = ("reader", "vendor", "mpp", "levels", "objective_power")


@dataclass
class AreaRead:
    """Pixels of an area and how they were obtained."""

    image: np.ndarray          # (h, w, 3) uint8
    level: int                 # pyramid level read
    outside_fraction: float    # share of the area outside the slide (padded with background)


@dataclass
class Slide:
    """An open slide. Use :func:`open_slide` to make one; it is a context manager.

    The pixels come from a :class:`tile_selector.readers.SlideReader`. ``close()`` releases its
    handles (after the reads in progress); a later read opens the file again.
    """

    path: Path
    reader: str
    vendor: str
    levels: list[Level]
    mpp_x: float
    mpp_y: float
    mpp_source: str                 # "metadata" | "user"
    objective_power: float | None
    associated_images: list[str]
    _source: SlideReader | None = field(repr=False, default=None)
    _state: threading.Lock = field(repr=False, default_factory=threading.Lock)
    _busy: int = field(repr=False, default=0)          # reads in progress
    _close_when_idle: bool = field(repr=False, default=False)
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

    def public_facts(self) -> dict:
        """The facts of :data:`PUBLIC_FACTS` only: what outputs may say about a slide."""
        info = self.info()
        return {k: info[k] for k in PUBLIC_FACTS if k in info}

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
            with self._reading() as source:
                arr = source.read_region(level, x, y, w, h)
        except SlideError:
            raise
        except Exception as exc:  # the readers raise many types for corrupt tiles
            raise UnreadableSlide(self.path, f"cannot read pixels ({type(exc).__name__}: {exc})",
                                  "the file may be truncated or corrupt; copy it again from the scanner") from exc
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.shape[2] == 4 and arr[..., 3].min() == 255:  # opaque (nearly always): no blending to do
            arr = arr[..., :3]
        elif arr.shape[2] == 4:
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

    @contextlib.contextmanager
    def _reading(self) -> Iterator[SlideReader]:
        with self._state:
            if self._source is None:  # closed (e.g. evicted from the cache): open the file again
                self._source = READER_CLASSES[self.reader].open(self.path)
            self._busy += 1
            source = self._source
        try:
            yield source
        finally:
            with self._state:
                self._busy -= 1
                if self._close_when_idle and not self._busy:
                    self._release()

    def _release(self) -> None:
        self._close_when_idle = False
        if self._source is not None:
            self._source.close()
            self._source = None

    def close(self) -> None:
        """Release the reader's handles now, or when the reads in progress end."""
        with self._state:
            if self._busy:
                self._close_when_idle = True
            else:
                self._release()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    errors: list[SlideError] = []
    for name in order:
        try:
            source = READER_CLASSES[name].open(path)
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
    try:
        mpp_x, mpp_y, mpp_source = _resolution(path, source, mpp)
    except BaseException:
        source.close()
        raise
    return Slide(path=path, reader=source.name, vendor=source.vendor, levels=source.levels, mpp_x=mpp_x,
                 mpp_y=mpp_y, mpp_source=mpp_source, objective_power=source.objective_power,
                 associated_images=source.associated_images, _source=source)


def _resolution(path: Path, source: SlideReader, mpp: float | None) -> tuple[float, float, str]:
    """(mpp_x, mpp_y, "metadata" | "user"); the file's own resolution wins over ``mpp``."""
    if not source.levels or any(lv.width <= 0 or lv.height <= 0 for lv in source.levels):
        raise UnreadableSlide(path, "the slide has an empty (zero-size) level", "the file is damaged; rescan it")
    if source.mpp_x is not None and source.mpp_y is not None:
        return source.mpp_x, source.mpp_y, "metadata"
    if mpp is None:
        raise MissingResolution(path, "no resolution (µm per pixel) in the file",
                                "give it with --mpp, e.g. --mpp 0.25 for a 40x scan")
    if not (0 < mpp < MAX_PLAUSIBLE_MPP):
        raise ValueError(f"--mpp {mpp} is not a microscope resolution (expected 0 < mpp < {MAX_PLAUSIBLE_MPP})")
    return float(mpp), float(mpp), "user"


class _OpenSlides:
    """The per-process cache of open slides (re-opening per read is slow). It closes what it evicts;
    a holder still reading an evicted slide gets the file opened again (:meth:`Slide._reading`)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._slides: collections.OrderedDict[tuple, Slide] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, path: str, reader: str, mpp: float | None) -> Slide:
        with self._lock:
            slide = self._slides.get(key)
            if slide is not None:
                self._slides.move_to_end(key)
                return slide
        slide = open_slide(path, reader=reader, mpp=mpp)  # outside the lock: opening may take a while
        with self._lock:
            if key in self._slides:  # another thread opened it meanwhile
                slide.close()
                return self._slides[key]
            self._slides[key] = slide
            while len(self._slides) > self.size:
                self._slides.popitem(last=False)[1].close()
        return slide

    def clear(self) -> None:
        with self._lock:
            for slide in self._slides.values():
                slide.close()
            self._slides.clear()


_OPEN = _OpenSlides()


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
    return _OPEN.get((p, reader, mpp, stamp), p, reader, mpp)
