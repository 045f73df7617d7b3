"""Keyed pseudonyms for slide names (``wsi-apl scan --pseudonymize``).

A slide's file name often carries a patient's name or a case number. With ``--pseudonymize`` every
output of a results folder (triage.csv, the zarr group names and their ``result`` attribute,
alerts.log, the QuPath and VIA exports, and through triage.csv the HTML report) names a slide
``slide-<12 hex>``: HMAC-SHA256 of the file name under a key made once per results folder
(``RESULTS/.pseudonym_key``, mode 0600). A keyed hash, not a plain one: file names follow a few
patterns, and an unkeyed hash of each guess would undo the pseudonyms. The same name gets the
same pseudonym in every scan of that folder, so a night's list matches the previous one, and
``wsi-apl pseudonyms RESULTS SLIDES_DIR`` prints the name → pseudonym table for the lab's records.

The ledger (``ledger.sqlite``) keeps the real paths: it is the scan's internal state (it must find
the files again), never an output. Whether a folder pseudonymizes is stored in the ledger's ``meta``
table, so ``wsi-apl triage`` and later scans keep doing it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

KEY_FILE = ".pseudonym_key"
META_KEY = "pseudonymize"
PREFIX = "slide-"
_KEY_HEX = re.compile(r"[0-9a-f]{64}")
# absolute paths left in a text after the slide's own were replaced (e.g. an MRXS data folder)
_POSIX_PATH = re.compile(r"(?<![\w./\]])/(?:[^\s/:;,'\"()\[\]]+/)+[^\s/:;,'\"()\[\]]*")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\[^\s:;,'\"()]*")


class PseudonymError(ValueError):
    """A results folder whose pseudonyms cannot be made, with the file and the fix."""


def pseudonym(key: bytes, name: str) -> str:
    """``slide-<12 hex>``: HMAC-SHA256(key, file name); 48 bits keep two names of one lab apart."""
    return PREFIX + hmac.new(key, name.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


def key_path(results: str | Path) -> Path:
    return Path(results) / KEY_FILE


def create_key(results: str | Path) -> bytes:
    """Make the folder's key once (0600) and return it; an existing key is kept, never replaced
    (a new key would give every slide a new pseudonym)."""
    path = key_path(results)
    if path.exists():
        return read_key(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=path.parent)  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never overwrites: two scans racing keep the first key
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return read_key(results)


def read_key(results: str | Path) -> bytes:
    path = key_path(results)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise PseudonymError(f"{path}: missing, so the pseudonyms of this results folder cannot be computed; restore "
                             "the file from a backup (a new key would give every slide another pseudonym)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PseudonymError(f"{path}: cannot read the pseudonym key ({exc}); restore the file from a backup") from exc
    if not _KEY_HEX.fullmatch(text):
        raise PseudonymError(f"{path}: not a pseudonym key (expected 64 hex digits); restore the file from a backup")
    return bytes.fromhex(text)


@dataclass(frozen=True)
class Names:
    """How the outputs of one results folder name slides: as they are (``key`` None) or pseudonymized."""

    key: bytes | None = None

    @classmethod
    def of(cls, results: str | Path, meta: dict[str, str]) -> Names:
        """The naming of a results folder, from its ledger's ``meta`` table."""
        return cls(read_key(results)) if meta.get(META_KEY) == "1" else cls()

    def slide(self, name: str) -> str:
        """A slide's name in outputs (the file name, or its pseudonym)."""
        return pseudonym(self.key, name) if self.key is not None else name

    def path(self, path: str | Path) -> str:
        """A slide's path in outputs: blank when pseudonymized (folders carry names too)."""
        return "" if self.key is not None else str(path)

    def group(self, path: Path, fp: str) -> str:
        """The zarr group of a slide: its name made safe for a folder name, and the fingerprint's first
        8 hex digits so that two files with the same name cannot collide."""
        stem = self.slide(path.name) if self.key is not None else path.stem
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)
        return f"{stem}-{fp[:8]}"

    def text(self, text: str | None, path: str | Path) -> str:
        """``text`` (a reason, a QC line) with the slide's path and name replaced by its pseudonym and
        any other absolute path by "[a path]"; unchanged when not pseudonymized."""
        if not text or self.key is None:
            return text or ""
        p = Path(path)
        shown = self.slide(p.name)
        # the stem alone (an MRXS data folder, a message without the extension) only where it cannot be
        # an ordinary word of the message
        stem = p.stem if len(p.stem) >= 6 and re.search(r"[\d_\-]", p.stem) else ""
        folder = str(p.parent) if len(p.parts) > 2 else ""  # the slide folder may carry names (with spaces)
        swap = {r: shown for r in (p.name, stem) if r} | ({folder: "[a folder]"} if folder else {}) | \
            ({str(path): shown} if str(path) else {})
        # one pass, longest first, so that a replacement is never searched again
        pattern = "|".join(re.escape(r) for r in sorted(swap, key=len, reverse=True))
        if swap:
            text = re.sub(pattern, lambda m: swap[m.group(0)], text)
        text = _POSIX_PATH.sub("[a path]", text)
        return _WINDOWS_PATH.sub("[a path]", text)
