"""The triage list experts read in the morning: ``RESULTS/triage.csv``, one row per slide file.

Order: flagged (highest suspicion first), then inconclusive, failed and not_analysed (someone must
look), then not_flagged (highest suspicion first). Safe to open in a spreadsheet: cells a
spreadsheet would run as a formula are neutralised. Every row says it is decision support.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from workers.bundle import replace_atomically

from .ledger import Ledger
from .privacy import Names
from .status import DECISION_SUPPORT, RESULTS, TRIAGE_ORDER, Status

TRIAGE = "triage.csv"
STATE = "scan_state.json"
COLUMNS = ["rank", "case", "slide", "path", "status", "suspicion", "p_apl_vs_aml", "p_apl_vs_healthy",
           "promyelocyte_ratio", "promyelocyte_ci_low", "promyelocyte_ci_high",
           "myeloblast_ratio", "myeloblast_ci_low", "myeloblast_ci_high",
           "auer_rod_ratio", "auer_rod_ci_low", "auer_rod_ci_high",
           "cells", "areas", "mean_focus", "qc", "bundle", "scanned_at",
           "reason", "suspicion_ci_low", "suspicion_ci_high", "blast_percent", "fingerprint", "note"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value) -> str:
    """A cell as text that a spreadsheet shows rather than runs (OWASP CSV injection)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    s = str(value)
    if s.startswith(_FORMULA_START):
        try:
            float(s)
            return s
        except ValueError:
            return "'" + s
    return s


def unneutralise(s: str) -> str:
    """A cell as the scan meant it: the inverse of :func:`neutralise` for readers of triage.csv."""
    return s[1:] if len(s) > 1 and s[0] == "'" and s[1] in _FORMULA_START else s


def _other_bundle(r: dict, current: dict | None) -> str:
    """The reason a row's result is not current: it came from another bundle than the latest scan's
    ("" when it is current, or when no scan has named its bundle)."""
    if not current or not r["result"] or not r["bundle"] or r["bundle"] == current["id"]:
        return ""
    old = r["result"]
    was = old.get("status") or r["status"]
    susp = old.get("suspicion")
    return (f"no result of this scan's bundle ({current['label']}) yet: analysed earlier with another bundle "
            f"({old.get('bundle') or r['bundle'][:12]}: {was}"
            + (f", suspicion {susp:.2f}" if isinstance(susp, (int, float)) and susp == susp else "")
            + "); scan again to redo it with this bundle")


def triage_rows(ledger: Ledger, ledger_rows: list[dict] | None = None) -> list[dict]:
    """The list's rows, named as the folder's outputs name slides (pseudonyms with ``--pseudonymize``:
    ``slide`` pseudonymized, ``path`` blank, the slide's path and name replaced in ``reason``). The real
    path stays in ``file_path``, which is not a column of the list (``wsi-apl status`` matches on it).
    ``ledger_rows``: the ledger's rows (:meth:`Ledger.rows`) when the caller has read them already."""
    rows = []
    current = ledger.bundle()
    names = Names.of(ledger.results, ledger.meta())
    for r in ledger.rows() if ledger_rows is None else ledger_rows:
        stale = _other_bundle(r, current) if r["status"] in (*RESULTS, Status.NOT_ANALYSED) else ""
        res = {} if stale else (r["result"] or {})
        status = Status.NOT_ANALYSED if stale else r["status"]
        ratios = res.get("ratios", {}) or {}
        reason = stale or res.get("reason") or (r["error"] or "")
        if status == Status.NOT_ANALYSED and not reason:
            reason = ("no result yet: being analysed now, or the scan stopped before it finished this slide"
                      if r.get("in_hand") else "not analysed before the scan ended; look at this slide yourself")
        row = {
            "case": r["case"], "slide": names.slide(r["name"]), "path": names.path(r["path"]), "status": status,
            "file_path": r["path"],
            "suspicion": res.get("suspicion"), "p_apl_vs_aml": res.get("p_apl_vs_aml"),
            "p_apl_vs_healthy": res.get("p_apl_vs_healthy"),
            "cells": res.get("cells", 0) if res else "", "areas": res.get("areas", 0) if res else "",
            "mean_focus": res.get("mean_focus"), "qc": names.text(" | ".join(res.get("qc", []) or []), r["path"]),
            "bundle": res.get("bundle") or "", "scanned_at": res.get("scanned_at") or "",
            "reason": names.text(reason, r["path"]), "fingerprint": r["fingerprint"] or "", "note": DECISION_SUPPORT,
            "blast_percent": res.get("blast_percent"),
        }
        ci = res.get("suspicion_ci") or [None, None]
        row["suspicion_ci_low"], row["suspicion_ci_high"] = ci[0], ci[1]
        for head in ("promyelocyte", "myeloblast", "auer_rod"):
            rr = ratios.get(head) or {}
            row[f"{head}_ratio"] = rr.get("value")
            row[f"{head}_ci_low"] = rr.get("ci_low")
            row[f"{head}_ci_high"] = rr.get("ci_high")
        rows.append(row)
    rows.sort(key=lambda x: (TRIAGE_ORDER.get(x["status"], 3), -(x["suspicion"] if x["suspicion"] is not None else -1),
                             x["slide"]))
    for i, row in enumerate(rows, start=1):
        row["rank"] = i
    return rows


def write_triage(results: str | Path, ledger: Ledger | None = None, rows: list[dict] | None = None) -> Path:
    """(Re)write ``triage.csv`` from the ledger (or from its ``triage_rows`` already read), atomically."""
    results = Path(results)
    if rows is None:
        own = ledger is None
        ledger = ledger or Ledger(results)
        try:
            rows = triage_rows(ledger)
        finally:
            if own:
                ledger.close()
    return atomic_write(results / TRIAGE, triage_table(rows).to_csv(index=False, lineterminator="\n"))


def triage_table(rows: list[dict]) -> pd.DataFrame:
    """The list as triage.csv shows it: :data:`COLUMNS` in order, every cell as neutralised text (floats
    with 4 decimals, None as empty), so the CSV quotes exactly what a spreadsheet would otherwise run."""
    return pd.DataFrame([[neutralise(r.get(c)) for c in COLUMNS] for r in rows], columns=COLUMNS, dtype=object)


def atomic_write(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` so that a reader (or a power cut) sees the old or the new file,
    never half of one (:func:`workers.bundle.replace_atomically`: unique temporary file, fsync, rename,
    fsync of the folder)."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def write_state(results: str | Path, state: dict) -> Path:
    """``scan_state.json`` next to the list: whether it is final (``complete``), still being written
    (``running``) or was left by a scan that stopped early (``interrupted``), with counts."""
    return atomic_write(Path(results) / STATE, json.dumps(state, indent=2))


def read_state(results: str | Path) -> dict | None:
    """The scan state, with ``running`` turned into ``interrupted`` where no scan holds the folder's
    lock any more (the process was killed: kill -9, out of memory, a power cut)."""
    results = Path(results)
    try:
        state = json.loads((results / STATE).read_text())
    except (OSError, ValueError):
        return None
    if state.get("state") in ("running", "stopping") and not Ledger.lock_held(results):
        state["state"] = "interrupted"
        state["why"] = "the scan process ended without finishing (killed, out of memory or a power cut)"
    return state
