"""Write a pyramidal, tiled, JPEG-compressed TIFF band by band in bounded memory.

Level 0 is produced by a callback that renders horizontal bands; each band is cut into tiles for the
TIFF and averaged 2x2 into the next level, which is kept in a raw file on disk when large.
Reduced levels are marked ``NewSubfileType = 1`` and carry their own resolution, which is what both
openslide (generic-tiff) and tiffslide need to see a pyramid with an mpp.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

TILE = 256


def _level_sizes(width: int, height: int, min_side: int = 512) -> list[tuple[int, int]]:
    sizes = [(width, height)]
    while min(sizes[-1]) > min_side:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def _tiles_of_band(band: np.ndarray, width: int) -> Iterator[np.ndarray]:
    """Row-major TILE x TILE tiles of a band whose height is a multiple of TILE (padded with white)."""
    h = band.shape[0]
    for ty in range(0, h, TILE):
        rows = band[ty:ty + TILE]
        for tx in range(0, width, TILE):
            tile = rows[:, tx:tx + TILE]
            if tile.shape[0] != TILE or tile.shape[1] != TILE:
                full = np.full((TILE, TILE, 3), 255, np.uint8)
                full[:tile.shape[0], :tile.shape[1]] = tile
                tile = full
            yield np.ascontiguousarray(tile)


def _half(band: np.ndarray) -> np.ndarray:
    """2x2 box average (antialiased downsampling), odd edges replicated."""
    h, w = band.shape[:2]
    if h % 2 or w % 2:
        band = np.pad(band, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    b = band.astype(np.uint16)
    out = (b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2] + 2) // 4
    return out.astype(np.uint8)


class _RowStore:
    """Rows of one pyramid level: in memory when small, else a raw file read and written by rows.

    A raw file with plain reads and writes (not a memmap) keeps the pages in the OS cache rather
    than in this process's resident memory, so peak memory does not grow with the slide's height.
    """

    def __init__(self, width: int, height: int, directory: str, name: str, max_bytes: int = 256 * 2 ** 20):
        self.width, self.height = width, height
        self.row_bytes = width * 3
        self._array = None
        self._file = None
        if width * height * 3 <= max_bytes:
            self._array = np.empty((height, width, 3), np.uint8)
        else:
            self._file = open(os.path.join(directory, name), "w+b")  # noqa: SIM115 - closed in close()
            self._file.truncate(height * self.row_bytes)

    def write(self, y0: int, rows: np.ndarray) -> None:
        rows = rows[:max(0, self.height - y0)]
        if self._array is not None:
            self._array[y0:y0 + len(rows)] = rows
        else:
            self._file.seek(y0 * self.row_bytes)
            self._file.write(np.ascontiguousarray(rows).tobytes())

    def read(self, y0: int, y1: int) -> np.ndarray:
        y1 = min(y1, self.height)
        if self._array is not None:
            return self._array[y0:y1]
        self._file.seek(y0 * self.row_bytes)
        buf = self._file.read((y1 - y0) * self.row_bytes)
        return np.frombuffer(buf, np.uint8).reshape(y1 - y0, self.width, 3)

    def close(self) -> None:
        self._array = None
        if self._file is not None:
            self._file.close()
            self._file = None


def write_pyramid_tiff(path: str | os.PathLike, width: int, height: int, mpp: float,
                       render_band: Callable[[int, int], np.ndarray], *, jpeg_quality: int = 88,
                       band_height: int = 1024, description: str = "",
                       progress: Callable[[float], None] | None = None) -> list[tuple[int, int]]:
    """Write a pyramidal TIFF of ``width`` x ``height`` level-0 pixels at ``mpp`` µm/px.

    ``render_band(y0, y1)`` must return the RGB uint8 rows ``[y0, y1)`` of level 0, shape
    (y1 - y0, width, 3). Returns the (width, height) of every level written. Memory: one band of
    level 0 plus small levels; large reduced levels wait in raw files next to the output.
    """
    assert band_height % (2 * TILE) == 0
    sizes = _level_sizes(width, height)
    path = Path(path)
    tmp_dir = tempfile.mkdtemp(prefix="wsi-apl-pyr-", dir=path.parent)
    stores = [_RowStore(w, h, tmp_dir, f"level{k}.raw") for k, (w, h) in enumerate(sizes[1:], start=1)]
    res0 = 1e4 / mpp  # pixels per centimetre
    common = dict(photometric="rgb", tile=(TILE, TILE), compression="jpeg",
                  compressionargs={"level": int(jpeg_quality)}, resolutionunit="CENTIMETER", metadata=None)
    tmp_path = path.with_name(path.name + ".partial")
    try:
        with tifffile.TiffWriter(tmp_path, bigtiff=width * height * 3 > 3_500_000_000) as tw:
            n_bands = math.ceil(height / band_height)

            def level0() -> Iterator[np.ndarray]:
                for bi in range(n_bands):
                    y0 = bi * band_height
                    y1 = min(height, y0 + band_height)
                    band = render_band(y0, y1)
                    if stores:
                        stores[0].write(y0 // 2, _half(band))
                    if band.shape[0] % TILE:
                        pad = TILE - band.shape[0] % TILE
                        band = np.pad(band, ((0, pad), (0, 0), (0, 0)), constant_values=255)
                    yield from _tiles_of_band(band, width)
                    if progress:
                        progress((bi + 1) / n_bands)

            tw.write(level0(), shape=(height, width, 3), dtype=np.uint8, resolution=(res0, res0),
                     description=description, **common)
            for k in range(1, len(sizes)):
                w, h = sizes[k]
                src = stores[k - 1]

                def level_k(src=src, k=k, w=w, h=h) -> Iterator[np.ndarray]:
                    for y0 in range(0, h, band_height):
                        band = src.read(y0, y0 + band_height)
                        if k < len(stores):
                            stores[k].write(y0 // 2, _half(band))
                        if band.shape[0] % TILE:
                            pad = TILE - band.shape[0] % TILE
                            band = np.pad(band, ((0, pad), (0, 0), (0, 0)), constant_values=255)
                        yield from _tiles_of_band(band, w)

                f = 2 ** k
                tw.write(level_k(), shape=(h, w, 3), dtype=np.uint8, subfiletype=1,
                         resolution=(res0 / f, res0 / f), **common)
        os.replace(tmp_path, path)
    finally:
        for st in stores:
            st.close()
        for f in Path(tmp_dir).glob("*"):
            f.unlink()
        os.rmdir(tmp_dir)
        if tmp_path.exists():
            tmp_path.unlink()
    return sizes
