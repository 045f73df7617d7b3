"""What the report reads: the triage list (rows, ranks, statuses), the ledger (read-only: zarr group
and slide file per fingerprint, the scan's bundle) and the bundle folder (thresholds, classifier).

The triage list is the source of truth for what the index shows, so the report and the list an
expert opens in a spreadsheet never disagree. Paths from the ledger stay in memory: they are
internal, and :func:`scrub` keeps them (and any other absolute path) out of every text the report
prints.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from ..ledger import LEDGER, connect_readonly
from ..status import RESULTS, Status
from ..triage import TRIAGE, unneutralise

HEADS = ("promyelocyte", "myeloblast", "auer_rod")
_NUMBERS = ("suspicion", "p_apl_vs_aml", "p_apl_vs_healthy", "suspicion_ci_low", "suspicion_ci_high",
            "blast_percent", "mean_focus", *(f"{h}_{k}" for h in HEADS for k in ("ratio", "ci_low", "ci_high")))
_INTS = ("rank", "cells", "areas")
# an absolute POSIX path of two or more parts (not "µm/px": a path starts after a space, quote or bracket)
_POSIX_PATH = re.compile(r"(?<![\w./])/(?:[^\s/:;,'\"()\[\]]+/)+[^\s/:;,'\"()\[\]]*")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\[^\s:;,'\"()]*")


def _number(s: str) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v if v == v else None


def read_triage(results: Path) -> list[dict]:
    """The rows of ``RESULTS/triage.csv`` in their order, numbers as numbers ([] when there is no list)."""
    path = Path(results) / TRIAGE
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        rows = [{k: unneutralise(v or "") for k, v in r.items() if k} for r in csv.DictReader(f)]
    for r in rows:
        for k in _NUMBERS:
            r[k] = _number(r.get(k, ""))
        for k in _INTS:
            v = _number(r.get(k, ""))
            r[k] = int(v) if v is not None else None
    return rows


def slide_id(row: dict) -> str:
    """The id of a row's page: the first 16 hex digits of its fingerprint, never the file name (which
    may carry a patient's name). A file that failed before it had a fingerprint gets a hash of its path."""
    fp = (row.get("fingerprint") or "").strip().lower()
    if re.fullmatch(r"[0-9a-f]{16,}", fp):
        return fp[:16]
    return "file-" + hashlib.sha256((row.get("path") or row.get("slide") or "").encode()).hexdigest()[:11]


@dataclass
class LedgerView:
    """What the report needs from the ledger, read once without writing to it."""

    groups: dict[str, str] = field(default_factory=dict)      # fingerprint -> zarr group name
    paths: dict[str, list[str]] = field(default_factory=dict)  # fingerprint -> slide files seen
    bundle: dict | None = None                                 # {"id", "label", ...} of the latest scan
    meta: dict[str, str] = field(default_factory=dict)

    def all_paths(self) -> list[str]:
        return sorted({p for ps in self.paths.values() for p in ps}, key=len, reverse=True)


def read_ledger(results: Path) -> LedgerView:
    """The ledger opened read-only (``mode=ro``): the report must never block or change a running scan."""
    path = Path(results) / LEDGER
    view = LedgerView()
    if not path.exists():
        return view
    db = connect_readonly(results)
    try:
        for fp, group in db.execute("SELECT fingerprint, group_name FROM slides"):
            if group:
                view.groups[fp] = group
        for p, fp in db.execute("SELECT path, fingerprint FROM files"):
            if fp:
                view.paths.setdefault(fp, []).append(p)
        try:
            view.meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            view.meta = {}
    finally:
        db.close()
    try:
        view.bundle = json.loads(view.meta["bundle"]) if "bundle" in view.meta else None
    except ValueError:
        view.bundle = None
    return view


def scrub(text: str, known_paths: list[str] = ()) -> str:
    """``text`` without file paths: the slides' own paths become "the slide file", any other absolute
    path "[a path]" (reasons from the readers name the file; the report may travel by mail)."""
    if not text:
        return ""
    for p in known_paths:
        if p:
            text = text.replace(p, "the slide file")
    text = _POSIX_PATH.sub("[a path]", text)
    return _WINDOWS_PATH.sub("[a path]", text)


@dataclass
class Entry:
    """One slide of the report: its triage row(s) and where its data are."""

    id: str
    row: dict                          # the first (best-ranked) triage row of this slide
    rows: list[dict]                   # every row of it (the same file under two names)
    group: str | None                  # zarr group, when the ledger names one
    paths: list[str]                   # slide files (internal: never printed)

    @property
    def fingerprint(self) -> str:
        return self.row.get("fingerprint") or ""

    @property
    def status(self) -> str:
        return self.row.get("status") or Status.NOT_ANALYSED

    @property
    def analysed(self) -> bool:
        """Whether the list shows a result of this scan's bundle (then the cell store has its cells)."""
        return self.status in RESULTS

    def signature(self) -> str:
        """A hash of what the page depends on from the list; a page is redrawn when it changes (a hash:
        the reasons it covers may name the slide's path, and the report folder travels)."""
        keys = ("status", "reason", "qc", "bundle", "scanned_at", "suspicion", "cells", "case", "note", "slide")
        text = json.dumps([self.group, [[r.get(k) for k in keys] for r in self.rows]], default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def entries(rows: list[dict], ledger: LedgerView) -> list[Entry]:
    """One entry per slide id, in the list's order (copies of one file share their page)."""
    out: dict[str, Entry] = {}
    for r in rows:
        sid = slide_id(r)
        if sid in out:
            out[sid].rows.append(r)
            continue
        fp = r.get("fingerprint") or ""
        out[sid] = Entry(sid, r, [r], ledger.groups.get(fp), list(ledger.paths.get(fp, [])))
    return list(out.values())


# -- the bundle -------------------------------------------------------------------------------------


@dataclass
class BundleInfo:
    """The bundle folder, if found, and why not otherwise (said on every page that needs it)."""

    bundle: object | None              # workers.bundle.ModelBundle
    why: str = ""

    def rule(self) -> dict:
        if self.bundle is None:
            return {}
        return dict((self.bundle.part("slide_nets") or {}).get("decision") or {})

    def head_thresholds(self) -> dict[str, float]:
        if self.bundle is None or not self.bundle.has("cells"):
            return {}
        return {k: float(v) for k, v in (self.bundle.part("cells")["config"].get("thresholds") or {}).items()}

    def matches(self, bundle_id: str | None) -> str:
        """'' when this bundle made a result of ``bundle_id``, else why its numbers do not apply."""
        if self.bundle is None:
            return self.why
        if bundle_id and bundle_id != self.bundle.id:
            return (f"the bundle found ({self.bundle.id}) is not the one that analysed this slide ({bundle_id}); "
                    "give that bundle with --bundle")
        return ""


def _bundle_candidates(ledger: LedgerView) -> list[str]:
    """Bundle folders the ledger may name (the scan records its bundle in the ``meta`` table)."""
    out = []
    b = ledger.bundle or {}
    for k in ("path", "dir", "folder"):
        if isinstance(b.get(k), str):
            out.append(b[k])
    for k in ("bundle_path", "bundle_dir"):
        v = ledger.meta.get(k)
        if v:
            try:
                v = json.loads(v)
            except ValueError:
                pass
            if isinstance(v, str):
                out.append(v)
    return out


def find_bundle(given: Path | None, ledger: LedgerView) -> BundleInfo:
    """The bundle given, or the one the ledger names; a bundle that cannot be loaded is a reason, never
    a crash (the report must be written even when the models are gone)."""
    from workers.bundle import BundleError, load_bundle

    candidates = [str(given)] if given else _bundle_candidates(ledger)
    if not candidates:
        return BundleInfo(None, "the bundle folder is not known (give it with 'wsi-apl report RESULTS --bundle DIR')")
    problems = []
    for c in candidates:
        if not Path(c).is_dir():
            problems.append("the bundle folder does not exist (any more)")
            continue
        try:
            key = _bundle_key(Path(c))
            if key not in _BUNDLES:  # hashing the weights once per version, not after every slide
                _BUNDLES.clear()
                _BUNDLES[key] = load_bundle(c)
            return BundleInfo(_BUNDLES[key])
        except (BundleError, OSError, ValueError, KeyError) as exc:
            problems.append(scrub(str(exc)))
    return BundleInfo(None, "the bundle could not be loaded: " + "; ".join(problems))


_BUNDLES: dict[tuple, object] = {}


def _bundle_key(path: Path) -> tuple:
    """The bundle folder and the (size, mtime) of its files: a changed file is verified again."""
    files = sorted(p for p in path.iterdir() if p.is_file())
    return (str(path.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
