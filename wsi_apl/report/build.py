"""Write the report folder: ``RESULTS/report/index.html``, ``slides/<id>.html`` and ``img/<id>/``.

The scan calls :func:`write_report` after each finished slide with that slide's fingerprint; pages
whose row in the list changed (status, reason, bundle, ...) are redrawn as well, and a page missing
for any row is always made, so every link of the index leads somewhere. Every file is replaced
atomically: a reader sees an old page or a new one, never half of one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from workers.bundle import replace_atomically

from ..status import DECISION_SUPPORT, TRIAGE_ORDER, Status
from .data import HEADS, BundleInfo, Entry, entries, find_bundle, read_ledger, read_triage, scrub
from .html import HEAD_COLOURS, STATUS_WORDS, ci_bar, esc, fmt, page, status_chip, synthetic_banner, table
from .slide_page import OCCLUSION_CELLS, Context, error_page, render_slide

REPORT = "report"
STATE = ".pages.json"     # slide id -> the list's row the page was drawn from (redraw on change)


@dataclass
class ReportStats:
    """What one run wrote and what it cost (the CLI prints it, the scan may log it)."""

    index: Path
    pages: int = 0
    seconds: list[float] = field(default_factory=list)          # per page drawn
    occlusion_s: list[float] = field(default_factory=list)      # per page with maps
    bytes: int = 0

    @property
    def mb(self) -> float:
        return self.bytes / 1e6


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_report(results: Path, only: list[str] | None = None, log: Callable[[str], None] = print, *,
                 bundle: Path | None = None, occlusion: bool = True, occlusion_cells: int = OCCLUSION_CELLS) -> Path:
    """(Re)write the expert-review report of a results folder; returns the path of ``index.html``.

    ``only``: fingerprints whose pages are redrawn (the scan passes the slide it just finished);
    None redraws every page. ``bundle``: the bundle folder (default: the one the ledger names).
    ``occlusion``: make occlusion maps for the top ``occlusion_cells`` cells of each gallery (the
    slowest part: about 226 forward passes per map on the CPU).
    """
    return build_report(results, only, log, bundle=bundle, occlusion=occlusion, occlusion_cells=occlusion_cells).index


def build_report(results: Path, only: list[str] | None = None, log: Callable[[str], None] = print, *,
                 bundle: Path | None = None, occlusion: bool = True, occlusion_cells: int = OCCLUSION_CELLS
                 ) -> ReportStats:
    """:func:`write_report` with the numbers of the run."""
    results = Path(results)
    report = results / REPORT
    (report / "slides").mkdir(parents=True, exist_ok=True)
    (report / "img").mkdir(exist_ok=True)
    rows = read_triage(results)
    ledger = read_ledger(results)
    ents = entries(rows, ledger)
    binfo = find_bundle(bundle, ledger) if any(e.analysed for e in ents) else BundleInfo(None, "no analysed slide")
    ctx = Context(results, report, binfo, ledger.all_paths(), occlusion, log, occlusion_cells,
                  (ledger.bundle or {}).get("label") or "")
    state = _read_state(report)
    stats = ReportStats(report / "index.html")
    wanted = None if only is None else {f.lower() for f in only}
    for e in ents:
        target = report / "slides" / f"{e.id}.html"
        forced = wanted is None or e.fingerprint.lower() in wanted or e.id in wanted
        if not forced and target.exists() and state.get(e.id) == e.signature():
            continue
        _draw(e, ctx, target, stats)
        state[e.id] = e.signature()
    if only is None:
        _remove_orphans(report, {e.id for e in ents}, state)
    write_text(report / STATE, json.dumps(state, indent=1, sort_keys=True))
    write_text(stats.index, index_html(rows, ents, results, ctx.known_paths, ctx.scan_bundle))
    stats.bytes = sum(p.stat().st_size for p in report.rglob("*") if p.is_file())
    per = sum(stats.seconds) / len(stats.seconds) if stats.seconds else 0.0
    occ = (f", occlusion {sum(stats.occlusion_s) / len(stats.occlusion_s):.1f} s per slide with maps"
           if stats.occlusion_s else "")
    log(f"Report: {stats.index} ({stats.pages} page(s) drawn, {per:.1f} s per slide{occ}; {stats.mb:.2f} MB)")
    return stats


def _draw(e: Entry, ctx: Context, target: Path, stats: ReportStats) -> None:
    """Draw one page (its pictures first), never letting one slide stop the report."""
    t0 = time.perf_counter()
    img_dir = ctx.report / "img" / e.id
    try:
        sp = render_slide(e, ctx)
        html, images = sp.html, sp.images
        if sp.occlusion_s is not None:
            stats.occlusion_s.append(sp.occlusion_s)
    except Exception as exc:  # one broken slide must not cost the night's report
        ctx.log(f"  report: slide {e.id}: {scrub(f'{type(exc).__name__}: {exc}', ctx.known_paths)}")
        html, images = error_page(e, exc, ctx), []
    write_text(target, html)
    keep = {p.name for p in images}
    if img_dir.is_dir():
        for p in img_dir.iterdir():
            if p.is_file() and p.name not in keep:
                p.unlink(missing_ok=True)
    stats.pages += 1
    stats.seconds.append(time.perf_counter() - t0)


def _read_state(report: Path) -> dict:
    try:
        return dict(json.loads((report / STATE).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _remove_orphans(report: Path, ids: set[str], state: dict) -> None:
    """Pages and pictures of slides no longer in the list (a results folder rescanned from scratch)."""
    for p in (report / "slides").glob("*.html"):
        if p.stem not in ids:
            p.unlink(missing_ok=True)
    for d in (report / "img").iterdir():
        if d.is_dir() and d.name not in ids:
            shutil.rmtree(d, ignore_errors=True)
    for k in [k for k in state if k not in ids]:
        del state[k]


# -- the index -----------------------------------------------------------------------------------------


def _scan_state(results: Path) -> str:
    from ..triage import read_state

    st = read_state(results)
    if not st:
        return "No scan state recorded: the list may not be final."
    if st.get("state") == "complete":
        return f"The scan ended at {st.get('updated', '?')}: the list is final."
    if st.get("state") in ("running", "stopping"):
        return f"A scan is still running (last update {st.get('updated', '?')}): this report grows after every slide."
    return (f"The scan was interrupted ({st.get('why') or 'stopped'}): the list holds the slides finished up to "
            f"{st.get('updated', '?')} and is NOT final.")


def index_row(r: dict, sid: str, known_paths: list[str]) -> list[str]:
    """One row of the index table (ready HTML cells)."""
    cells = [f'<td class="num">{esc(r.get("rank"))}</td>',
             f'<a href="slides/{esc(sid)}.html">{esc(r.get("slide") or sid)}</a><br>'
             f'<code class="small">{esc(sid)}</code>',
             esc(r.get("case") or "–"), status_chip(r.get("status") or ""),
             f'<td class="num">{fmt(r.get("suspicion"))}</td>',
             f'<td class="num">{fmt(r.get("p_apl_vs_aml"))}</td>',
             f'<td class="num">{fmt(r.get("p_apl_vs_healthy"))}</td>']
    for h in HEADS:
        v, lo, hi = r.get(f"{h}_ratio"), r.get(f"{h}_ci_low"), r.get(f"{h}_ci_high")
        ci = "" if lo is None or hi is None else f" ({100 * lo:.1f}–{100 * hi:.1f})"
        cells.append(f'<td class="nowrap">{ci_bar(v, lo, hi, colour=HEAD_COLOURS[h])}<br>'
                     f'<span class="small">{fmt(v, 2, pct=True)}{ci}</span></td>')
    cells.append(f'<td class="num">{esc(r.get("cells") if r.get("cells") is not None else "–")}</td>')
    qc = [scrub(q.strip(), known_paths) for q in (r.get("qc") or "").split(" | ") if q.strip()]
    reason = scrub(r.get("reason") or "", known_paths)
    words = [esc(reason)] if reason else []
    words += [f"QC: {esc(q)}" for q in qc]
    cells.append(f'<td class="qc">{"<br>".join(words) or "–"}</td>')
    return cells


def index_html(rows: list[dict], ents: list[Entry], results: Path, known_paths: list[str], scan_bundle: str = ""
               ) -> str:
    """The index: the list's rows in its order, with chips, numbers, CI bars and links to the pages."""
    from .data import slide_id

    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("status") or ""] = counts.get(r.get("status") or "", 0) + 1
    summary = " ".join(f'{status_chip(s)} {counts[s]}' for s in sorted(counts, key=lambda s: TRIAGE_ORDER.get(s, 9)))
    labels = sorted({r.get("bundle") or "" for r in rows} - {""})
    body = [f"<h1>APL triage: expert review ({len(rows)} slide file(s))</h1>",
            f"<p>{summary or 'No slides in triage.csv yet.'}</p>",
            f"<p>{esc(_scan_state(results))} Ranked as in triage.csv: flagged first (highest suspicion), then "
            "inconclusive, failed and not analysed (an expert must look), not flagged last.</p>",
            '<p class="small">' + " ".join(f"{status_chip(s)} {esc(w)}." for s, w in STATUS_WORDS.items()) + "</p>"]
    if labels:
        body.append(f'<p class="small">Bundle: {esc(scrub("; ".join(labels), known_paths))}</p>')
    trs = [index_row(r, slide_id(r), known_paths) for r in rows]
    heads = ["#", "slide", "case", "status", "suspicion", "P(APL vs AML)", "P(APL vs healthy)",
             "promyelocytes", "blasts", "Auer rods", "cells", "reason and quality control"]
    body.append(table(heads, trs, "index"))
    body.append('<p class="small">Ratio bars: 0 % at the left to 100 % of the counted cells at the right; the band '
                "is the 95 % confidence interval (two-level bootstrap over areas and cells), the tick the ratio. "
                "Slide ids are the first 16 hex digits of the fingerprint column of triage.csv.</p>")
    if not any(e.status == Status.FLAGGED for e in ents) and rows:
        body.append(f"<p>No slide is flagged. {esc(DECISION_SUPPORT)}</p>")
    return page("APL triage: expert review", "".join(body), banner=synthetic_banner([*labels, scan_bundle]))
