"""The batch ledger: ``RESULTS/ledger.sqlite`` (SQLite, WAL), so a night's batch survives a crash.

Two tables:

- ``slides``: one row per slide *fingerprint* (the SHA-256 of the whole file, streamed: a partial
  hash could give one patient another's result): status, attempts, error, bundle id, the zarr group,
  the result (JSON) and timings.
- ``files``: one row per path seen: its name, fingerprint (NULL when the file could not even be
  read), case id, and an error for files that failed before they had a fingerprint. The same file
  under two names is analysed once; both names get a row with that result.

A rerun skips fingerprints already finished with the same bundle; ``--force`` redoes them. A slide
left ``running`` by a crash is redone. A result is current only for the bundle that made it: the
``meta`` table holds the bundle of the latest scan, and a slide whose result came from another bundle
is listed as ``not_analysed`` (with the old result named in its reason) until this bundle redoes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

from workers.bundle import update_hash

from .status import PENDING, RESULTS, RUNNING, Status

#: Statuses a run ends a slide with (a result, or failed): SQL list for set_not_analysed.
_ENDED_SQL = ", ".join(f"'{s}'" for s in (*RESULTS, Status.FAILED))
LEDGER = "ledger.sqlite"


def connect_readonly(results: Path) -> sqlite3.Connection:
    """The ledger of ``results`` opened read-only (``mode=ro``), for readers that are not the scan
    (report, exports, verification): they must never block or change a scan writing the folder."""
    return sqlite3.connect((Path(results) / LEDGER).resolve().as_uri() + "?mode=ro", uri=True, timeout=30.0)
LOCK_FILE = ".scan.lock"  # flock'd by the scan that writes a results folder


class LedgerLocked(RuntimeError):
    pass


def fingerprint(path: str | Path, chunk: int = 4 << 20) -> str:
    """SHA-256 of the whole slide (streamed).

    For a 3DHistech MRXS slide the small ``.mrxs`` index is hashed together with every file of its
    data folder (same name without the extension), where the pixels are.
    """
    path = Path(path)
    h = hashlib.sha256()
    files = [path]
    companion = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and companion.is_dir():
        files += sorted(p for p in companion.rglob("*") if p.is_file())
    for p in files:
        if p != path:
            h.update(str(p.relative_to(companion)).encode())
        update_hash(h, p, chunk)
    return h.hexdigest()


class Ledger:
    def __init__(self, results: str | Path):
        self.results = Path(results)
        self.results.mkdir(parents=True, exist_ok=True)
        self.path = self.results / LEDGER
        self.db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS slides (
                fingerprint TEXT PRIMARY KEY, status TEXT NOT NULL, attempts INTEGER DEFAULT 0,
                error TEXT, bundle TEXT, group_name TEXT, result TEXT, size INTEGER,
                started REAL, finished REAL);
            CREATE TABLE IF NOT EXISTS files (
                path TEXT PRIMARY KEY, name TEXT NOT NULL, fingerprint TEXT, case_id TEXT,
                status TEXT, error TEXT, first_seen REAL, last_seen REAL);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
        """)
        self._lock_fd: int | None = None

    # -- exclusive use of an output folder -------------------------------------------------------
    def lock(self) -> None:
        """Refuse a second scan writing to the same output folder at the same time."""
        fd = os.open(str(self.results / LOCK_FILE), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise LedgerLocked(f"{self.results}: another 'wsi-apl scan' is writing to this folder; wait for it "
                               "to finish or choose another --out") from exc
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    @staticmethod
    def lock_held(results: str | Path) -> bool:
        """Whether a scan holds the lock of ``results`` now (a killed process holds none)."""
        path = Path(results) / LOCK_FILE
        if not path.exists():
            return False
        fd = os.open(str(path), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        self.unlock()
        self.db.close()

    # -- the bundle of the latest scan ----------------------------------------------------------
    def set_bundle(self, bundle_id: str, label: str) -> None:
        """The bundle this folder's results are current for (the scan that writes it now)."""
        self.db.execute("INSERT INTO meta(key, value) VALUES('bundle', ?) ON CONFLICT(key) DO UPDATE SET "
                        "value=excluded.value", (json.dumps({"id": bundle_id, "label": label}),))

    def bundle(self) -> dict | None:
        """``{"id", "label"}`` of the latest scan's bundle (None: no scan has said)."""
        row = self.db.execute("SELECT value FROM meta WHERE key='bundle'").fetchone()
        return json.loads(row[0]) if row else None

    # -- other facts of the folder (e.g. whether its outputs pseudonymize slide names) -----------
    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                        "value=excluded.value", (key, value))

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    # -- files ---------------------------------------------------------------------------------
    def see_file(self, path: str, name: str, fp: str | None, case_id: str = "", error: str | None = None,
                 status: str | None = None) -> None:
        """Record a path; ``error`` (a file that failed before it had a fingerprint) makes it failed,
        ``status`` says otherwise (``not_analysed``: still being written when the scan ended)."""
        now = time.time()
        status = status or (Status.FAILED if error else None)
        self.db.execute(
            "INSERT INTO files(path, name, fingerprint, case_id, status, error, first_seen, last_seen) "
            "VALUES(?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET name=excluded.name, "
            "fingerprint=excluded.fingerprint, case_id=excluded.case_id, status=excluded.status, "
            "error=excluded.error, last_seen=excluded.last_seen",
            (path, name, fp, case_id, status, error, now, now))

    # -- slides --------------------------------------------------------------------------------
    def slide(self, fp: str) -> dict | None:
        cur = self.db.execute("SELECT fingerprint, status, attempts, error, bundle, group_name, result, size, "
                              "started, finished FROM slides WHERE fingerprint=?", (fp,))
        row = cur.fetchone()
        if row is None:
            return None
        keys = ("fingerprint", "status", "attempts", "error", "bundle", "group_name", "result", "size",
                "started", "finished")
        d = dict(zip(keys, row))
        d["result"] = json.loads(d["result"]) if d["result"] else None
        return d

    def is_done(self, fp: str, bundle_id: str) -> bool:
        s = self.slide(fp)
        return bool(s and s["status"] in RESULTS and s["bundle"] == bundle_id)

    def start(self, fp: str, bundle_id: str, size: int) -> None:
        self.db.execute(
            "INSERT INTO slides(fingerprint, status, attempts, bundle, size, started) VALUES(?,?,1,?,?,?) "
            f"ON CONFLICT(fingerprint) DO UPDATE SET status='{RUNNING}', attempts=attempts+1, error=NULL, "
            "result=NULL, group_name=NULL, bundle=excluded.bundle, started=excluded.started, finished=NULL",
            (fp, RUNNING, bundle_id, size, time.time()))

    def finish(self, fp: str, status: str, result: dict, group_name: str | None) -> None:
        self.db.execute("UPDATE slides SET status=?, result=?, group_name=?, finished=?, error=? WHERE fingerprint=?",
                        (status, json.dumps(result), group_name, time.time(),
                         result.get("reason") if status == Status.FAILED else None, fp))

    def fail(self, fp: str, error: str, result: dict | None = None) -> None:
        self.db.execute(f"UPDATE slides SET status='{Status.FAILED}', error=?, result=?, finished=? "
                        "WHERE fingerprint=?", (error, json.dumps(result) if result else None, time.time(), fp))

    def set_not_analysed(self, fp: str, reason: str, bundle_id: str | None = None) -> None:
        """A slide seen but not analysed in this run. A result of an earlier run with the same bundle
        (``bundle_id``) is kept; one of another bundle is not current: the slide becomes not_analysed,
        and the list names the old result in its reason (the old result stays in the row)."""
        self.db.execute(
            f"INSERT INTO slides(fingerprint, status, attempts, error) VALUES(?, '{Status.NOT_ANALYSED}', 0, ?) "
            f"ON CONFLICT(fingerprint) DO UPDATE SET status='{Status.NOT_ANALYSED}', error=excluded.error "
            f"WHERE status NOT IN ({_ENDED_SQL}) OR (? IS NOT NULL AND bundle IS NOT ?)",
            (fp, reason, bundle_id, bundle_id))

    # -- reading -------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """One row per file seen, with its slide's status and result."""
        cur = self.db.execute(
            "SELECT f.path, f.name, f.fingerprint, f.case_id, f.status, f.error, s.status, s.error, s.result, "
            "s.attempts, s.started, s.finished, s.bundle, s.group_name FROM files f "
            "LEFT JOIN slides s ON s.fingerprint = f.fingerprint ORDER BY f.path")
        out = []
        for (path, name, fp, case_id, fstatus, ferror, sstatus, serror, result, attempts, started, finished,
             bundle, group) in cur.fetchall():
            status = (fstatus or PENDING) if not fp else (sstatus or fstatus or PENDING)
            in_hand = status == RUNNING
            if status in (RUNNING, PENDING):  # in hand, interrupted, or never started: not a result
                status = Status.NOT_ANALYSED
            out.append({"path": path, "name": name, "fingerprint": fp, "case": case_id or "", "status": status,
                        "error": ferror or serror, "result": json.loads(result) if result else None,
                        "attempts": attempts or 0, "started": started, "finished": finished, "bundle": bundle,
                        "group": group, "in_hand": in_hand})
        return out
