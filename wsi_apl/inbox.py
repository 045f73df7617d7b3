"""The slide folder a scan reads: which entries get a row, when a copied file is ready, cases and
the deadline."""

from __future__ import annotations

import csv
import datetime as dt
import re
import time
from collections.abc import Callable
from pathlib import Path

from tile_selector.slide import REFUSED_FORMATS, SLIDE_EXTENSIONS

#: Slide formats a lab may drop in the folder that no reader here understands: listed so that they
#: get a ``failed`` row with the reason instead of vanishing from the triage list.
UNREADABLE_SLIDE_EXTENSIONS = set(REFUSED_FORMATS) | {".isyntax", ".qptiff", ".kfb", ".sdpc", ".tmap", ".zvi"}
SCAN_EXTENSIONS = SLIDE_EXTENSIONS | UNREADABLE_SLIDE_EXTENSIONS - {".ets"}


#: Side files that are never slides: named in the summary, no row. Every other file gets a row.
SIDE_EXTENSIONS = {".csv", ".tsv", ".json", ".txt", ".xml", ".md", ".log", ".ini", ".yaml", ".yml", ".pdf",
                   ".html", ".htm", ".sha256", ".md5", ".ets",  # an .ets belongs to a .vsi, which has its row
                   ".part", ".partial", ".tmp", ".crdownload"}  # copies in progress: their final name comes


def slide_store(p: Path) -> str | None:
    """What a folder holds if it looks like a slide stored as a folder (or None): such a folder
    gets a failed row that says what to do, an ordinary subfolder is skipped."""
    name = p.name.lower()
    if name.endswith(".zarr"):
        return ("an OME-Zarr (or other zarr) slide store: wsi-apl does not read zarr slides; export the slide "
                "as OME-TIFF or SVS")
    if (p / "Slidedat.ini").exists():
        if (p.parent / f"{p.name}.mrxs").exists():
            return None  # the data folder of an MRXS slide that has its own row
        return (f"an MRXS data folder without its '{p.name}.mrxs' file: copy the .mrxs file next to it (the "
                "slide is the .mrxs file and this folder together)")
    try:
        has_dicom = (p / "DICOMDIR").exists() or any(c.suffix.lower() == ".dcm" for c in p.iterdir())
    except OSError:
        return None
    if has_dicom:
        return ("a DICOM slide folder (one file per level): multi-file DICOM slides are not read; export the "
                "slide as OME-TIFF or SVS, or scan a single-file DICOM")
    return None


def is_dicom_file(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def list_slides(folder: Path) -> tuple[list[Path], list[Path]]:
    """(entries that get a row, side files named only in the summary) of ``folder``, sorted.

    Rows: slide files; folders named like slides and folders that hold a slide (DICOM, zarr, an MRXS
    data folder without its .mrxs), so that they are reported; files of formats we do not read.
    Hidden entries, ordinary subfolders and side files (csv, json, txt, xml, md, ...) get none."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of slides")
    slides, others = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        suffix = p.suffix.lower()
        if suffix in SCAN_EXTENSIONS:
            slides.append(p.resolve())
        elif p.is_dir():
            if slide_store(p):
                slides.append(p.resolve())
        elif suffix in SIDE_EXTENSIONS or (not suffix and not is_dicom_file(p)):
            others.append(p)
        else:
            slides.append(p.resolve())  # a format we do not read: a failed row that names it
    return slides, others


def read_cases(path: Path | None) -> dict[str, str]:
    """``slide`` (file name) → case id from a CSV with columns slide, case."""
    if path is None:
        return {}
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"slide", "case"} <= set(reader.fieldnames or []):
                raise ValueError(f"{path}: needs columns 'slide' and 'case' (one row per slide file name)")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc}); save it as CSV in UTF-8") from exc
    for line, row in enumerate(rows, start=2):
        if row["slide"] is None or row["case"] is None:
            raise ValueError(f"{path}, line {line}: fewer fields than columns (needs 'slide' and 'case')")
    return {row["slide"].strip(): row["case"].strip() for row in rows}


def parse_deadline(text: str | None, now: float | None = None) -> float | None:
    """``HH:MM`` (the next such time: 06:30 given at 22:00 is tomorrow morning) or ``+N[s|m|h]``."""
    if not text:
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r"\+(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if m:
        return now + float(m.group(1)) * {"": 60, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ValueError(f"--deadline {text!r}: give a clock time HH:MM (e.g. 06:30) or +MINUTES (e.g. +90m)")
    base = dt.datetime.fromtimestamp(now)
    at = base.replace(hour=int(m.group(1)), minute=int(m.group(2)), second=0, microsecond=0)
    if at.timestamp() <= now:
        at += dt.timedelta(days=1)
    return at.timestamp()


class SlideFolder:
    """The slide folder, listed again and again; yields each entry once, when it is ready to read.

    Without ``settle_s`` every entry is ready at once. With it, a file is ready when its size and
    modification time have stayed the same for ``settle_s`` seconds of our own observation (a
    monotonic clock from the first time we saw it): an old-looking mtime proves nothing, since copies
    keep the source's mtime and a share's clock may be skewed.
    """

    def __init__(self, folder: Path, settle_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.folder = folder
        self.settle_s = settle_s
        self._clock = clock
        self.returned: set[Path] = set()
        self.others: set[Path] = set()
        self._seen: dict[Path, tuple[int, int, float]] = {}

    def poll(self) -> tuple[list[Path], list[Path]]:
        """(entries ready now, new non-slide files)."""
        slides, others = list_slides(self.folder)
        new_others = [p for p in others if p not in self.others]
        self.others.update(new_others)
        now = self._clock()
        ready = []
        for p in slides:
            if p in self.returned:
                continue
            if self.settle_s <= 0 or not p.is_file():
                ready.append(p)
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            prev = self._seen.get(p)
            if prev is None or prev[:2] != sig:  # first seen, or changed: the wait starts now
                self._seen[p] = prev = (*sig, now)
            if now - prev[2] >= self.settle_s:
                ready.append(p)
        self.returned.update(ready)
        return ready, new_others

    def forget(self, path: Path) -> None:
        """Treat ``path`` as never seen: it is returned again once ready (settled again with ``settle_s``)."""
        self.returned.discard(path)
        self._seen.pop(path, None)

    def unready(self) -> list[Path]:
        """Slide files seen but never ready (still being written)."""
        return sorted(p for p in self._seen if p not in self.returned and p.exists())
