"""HTML pieces of the report: one inline style sheet, status chips, confidence-interval bars, the
synthetic-bundle banner, small SVG box plots and the verdict form.

Everything is inline (no CDN, fonts, scripts or server): the report is opened from ``file://`` and
mailed as a zip. Text from the data is always escaped.
"""

from __future__ import annotations

from html import escape

import numpy as np

from ..status import DECISION_SUPPORT, Status

#: Chip colours per status (background, text): what needs an expert first is the loudest.
STATUS_COLOURS: dict[str, tuple[str, str]] = {
    Status.FLAGGED: ("#c92a2a", "#ffffff"),
    Status.INCONCLUSIVE: ("#f59f00", "#212529"),
    Status.FAILED: ("#5f3dc4", "#ffffff"),
    Status.NOT_ANALYSED: ("#868e96", "#ffffff"),
    Status.NOT_FLAGGED: ("#2b8a3e", "#ffffff"),
}
STATUS_WORDS = {
    Status.FLAGGED: "suspected APL, review first",
    Status.INCONCLUSIVE: "the tool could not earn a call, review",
    Status.FAILED: "could not be analysed, review",
    Status.NOT_ANALYSED: "no result of this scan's models, review",
    Status.NOT_FLAGGED: "the rule did not fire (does not exclude APL)",
}
#: Outline colours of the heads in area pictures and plots (other cells grey).
HEAD_COLOURS = {"promyelocyte": "#e8590c", "myeloblast": "#1c7ed6", "auer_rod": "#d6336c", "other": "#8c8c8c"}
HEAD_NAMES = {"promyelocyte": "promyelocytes", "myeloblast": "blasts", "auer_rod": "Auer-rod cells",
              "other": "other cells"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:0;color:#212529;
background:#f8f9fa;font-size:14px}
header,main,footer{max-width:1320px;margin:0 auto;padding:8px 20px}
h1{font-size:22px;margin:10px 0}h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid #dee2e6}
h3{font-size:15px;margin:14px 0 6px}
a{color:#1864ab}
.support{background:#fff3bf;border:1px solid #fab005;padding:6px 10px;border-radius:4px;font-weight:600}
.banner{background:#c92a2a;color:#fff;padding:10px 14px;font-size:16px;font-weight:700;border-radius:4px;margin:8px 0}
.chip{display:inline-block;padding:2px 8px;border-radius:10px;font-size:12px;font-weight:600;white-space:nowrap}
""" + "".join(f".chip-{s}{{background:{bg};color:{fg}}}\n" for s, (bg, fg) in STATUS_COLOURS.items()) + """
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #dee2e6;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f1f3f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.index td{font-size:13px}.small{font-size:12px;color:#495057}
.qc{max-width:300px;font-size:12px}.nowrap{white-space:nowrap}
.ci{vertical-align:middle}
.cols{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.card{background:#fff;border:1px solid #dee2e6;border-radius:4px;padding:8px}
.gallery{display:flex;flex-wrap:wrap;gap:6px}
.cell{background:#fff;border:1px solid #dee2e6;border-radius:4px;padding:3px;text-align:center;font-size:11px;
width:82px}
.cell img{width:72px;height:72px;display:block;margin:0 auto}
.occ{display:flex;flex-wrap:wrap;gap:10px}
.occ figure{margin:0;background:#fff;border:1px solid #dee2e6;padding:4px;font-size:11px}
.area{margin:0;max-width:650px}.area img{max-width:100%;height:auto;border:1px solid #adb5bd}
.legend span{display:inline-block;margin-right:12px}
.sw{display:inline-block;width:12px;height:12px;border:2px solid;margin-right:4px;vertical-align:middle}
.verdict{background:#fff;border:2px solid #1864ab;border-radius:4px;padding:10px;max-width:720px}
.verdict textarea{width:100%;height:60px}
.why{font-size:15px;font-weight:600}
"""


def esc(v) -> str:
    return escape("" if v is None else str(v), quote=True)


def fmt(v, digits: int = 2, pct: bool = False) -> str:
    """A number for people ("–" for none); shares as percent where ``pct``."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if pct:
        return f"{100 * float(v):.{max(0, digits - 1)}f} %"
    return f"{float(v):.{digits}f}"


def status_chip(status: str) -> str:
    """A coloured chip for a status (unknown statuses get the not-analysed grey)."""
    s = status if status in STATUS_COLOURS else Status.NOT_ANALYSED
    return f'<span class="chip chip-{esc(s)}" title="{esc(s)}: {esc(STATUS_WORDS[s])}">{esc(status or s)}</span>'


def ci_bar(value: float | None, lo: float | None, hi: float | None, width: int = 120, height: int = 14,
           colour: str = "#1c7ed6") -> str:
    """An inline SVG of a share on a 0-1 scale: the 95 % interval as a band, the ratio as a tick.

    Linear, from 0 at the left to 1 at the right edge, so bars of different rows compare directly.
    """
    if value is None:
        return f'<svg class="ci" width="{width}" height="{height}" role="img" aria-label="no ratio"></svg>'

    def x(v: float) -> float:
        return round(min(1.0, max(0.0, float(v))) * width, 2)

    lo_v = value if lo is None else lo
    hi_v = value if hi is None else hi
    band_x, band_w = x(lo_v), max(0.0, round(x(hi_v) - x(lo_v), 2))
    tx = x(value)
    label = f"{fmt(value, 3)} (95% CI {fmt(lo, 3)}-{fmt(hi, 3)})"
    return (f'<svg class="ci" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{esc(label)}"><title>{esc(label)}</title>'
            f'<rect class="track" x="0" y="{height / 2 - 1}" width="{width}" height="2" fill="#dee2e6"/>'
            f'<rect class="band" x="{band_x}" y="2" width="{band_w}" height="{height - 4}" fill="{colour}" '
            f'fill-opacity="0.35"/>'
            f'<line class="value" x1="{tx}" x2="{tx}" y1="0" y2="{height}" stroke="{colour}" stroke-width="2"/></svg>')


def is_synthetic(label: str) -> bool:
    """Whether a bundle label says it is a demo model or trained on synthetic data."""
    low = (label or "").lower()
    return "synthetic" in low or "demo" in low


def synthetic_banner(labels) -> str:
    """The banner for results of a demo/synthetic bundle ('' for any other bundle)."""
    if not any(is_synthetic(lbl) for lbl in labels):
        return ""
    return ('<div class="banner" id="synthetic-banner">DEMO MODEL trained on synthetic data: these results are '
            'not for diagnosis.</div>')


def page(title: str, body: str, *, banner: str = "", up: str = "") -> str:
    """A whole HTML document: inline style, the banner and the decision-support sentence at the top and
    at the bottom of every page."""
    back = f'<p><a href="{esc(up)}">&larr; all slides</a></p>' if up else ""
    support = f'<p class="support">{esc(DECISION_SUPPORT)}</p>'
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><style>{CSS}</style></head><body>\n'
            f'<header>{back}{banner}{support}</header>\n<main>\n{body}\n</main>\n'
            f'<footer>{support}<p class="small">wsi-apl expert-review report; made offline, no data leave '
            f'this folder.</p></footer>\n</body></html>\n')


def table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table of ready HTML cells (the caller escapes text)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def box_plot(groups: list[tuple[str, str, np.ndarray]], lo: float, hi: float, unit: str,
             width: int = 440, row_h: int = 24) -> str:
    """A tiny horizontal box plot (median, IQR, 5-95 % whiskers) with the values as a strip, one row per
    group ``(name, colour, values)`` on a common ``lo``-``hi`` scale."""
    left, right = 110, 12
    span = max(hi - lo, 1e-9)
    h = row_h * len(groups) + 18

    def x(v: float) -> float:
        return round(left + (min(hi, max(lo, float(v))) - lo) / span * (width - left - right), 1)

    parts = [f'<svg width="{width}" height="{h}" viewBox="0 0 {width} {h}" role="img" aria-label="{esc(unit)}">']
    rng = np.random.default_rng(0)
    for k, (name, colour, vals) in enumerate(groups):
        y = row_h * k + row_h / 2
        parts.append(f'<text x="0" y="{y + 4}" font-size="11">{esc(name)}</text>')
        vals = np.asarray(vals, float)
        vals = vals[np.isfinite(vals)]
        if not len(vals):
            parts.append(f'<text x="{left}" y="{y + 4}" font-size="11" fill="#868e96">no cells</text>')
            continue
        for v in vals[:400]:
            parts.append(f'<circle cx="{x(v)}" cy="{round(y + rng.uniform(-5, 5), 1)}" r="1.3" fill="{colour}" '
                         'fill-opacity="0.45"/>')
        p5, q1, med, q3, p95 = np.percentile(vals, [5, 25, 50, 75, 95])
        parts.append(f'<line x1="{x(p5)}" x2="{x(p95)}" y1="{y}" y2="{y}" stroke="#495057"/>')
        parts.append(f'<rect x="{x(q1)}" y="{y - 6}" width="{max(1.0, x(q3) - x(q1))}" height="12" fill="none" '
                     f'stroke="{colour}" stroke-width="1.5"/>')
        parts.append(f'<line x1="{x(med)}" x2="{x(med)}" y1="{y - 7}" y2="{y + 7}" stroke="#212529" stroke-width="2"/>')
    yb = row_h * len(groups) + 12
    parts.append(f'<text x="{left}" y="{yb}" font-size="10" fill="#495057">{lo:g}</text>')
    parts.append(f'<text x="{width - right}" y="{yb}" font-size="10" fill="#495057" text-anchor="end">{hi:g} '
                 f'{esc(unit)}</text></svg>')
    return "".join(parts)


VERDICT_JS = """
function wsiVerdict(form){
  var says=form.querySelector('input[name=says]:checked');
  var out=form.querySelector('.verdict-json');
  if(!says){out.textContent='Choose one of the three answers first.';return false;}
  var v={slide_id:form.dataset.slideId,fingerprint:form.dataset.fingerprint,says:says.value,
         comment:form.querySelector('textarea').value,at:new Date().toISOString()};
  var text=JSON.stringify(v,null,2);
  out.textContent=text;
  var a=form.querySelector('.verdict-download');
  a.href=URL.createObjectURL(new Blob([text],{type:'application/json'}));
  a.download='verdict-'+v.slide_id+'.json';
  a.style.display='inline';
  a.click();
  return false;
}
"""


def verdict_form(sid: str, fingerprint: str) -> str:
    """Radio buttons and a comment; the button builds ``{"slide_id", "fingerprint", "says", "comment",
    "at"}`` and offers it as ``verdict-<id>.json`` (no server: the expert saves it into
    RESULTS/verdicts/, where ``wsi-apl verdict`` reads it)."""
    options = [("apl", "confirmed APL"), ("not_apl", "not APL"), ("unreadable", "unreadable")]
    radios = "".join(f'<label style="margin-right:14px"><input type="radio" name="says" value="{v}"> {t}</label>'
                     for v, t in options)
    return (f'<form class="verdict" id="verdict" data-slide-id="{esc(sid)}" data-fingerprint="{esc(fingerprint)}" '
            f'onsubmit="return wsiVerdict(this)"><p>{radios}</p>'
            f'<p><label>Comment<br><textarea name="comment"></textarea></label></p>'
            f'<p><button type="submit">Save verdict</button> '
            f'<a class="verdict-download" style="display:none">download verdict-{esc(sid)}.json again</a></p>'
            f'<p class="small">The browser downloads <b>verdict-{esc(sid)}.json</b>: save it into the folder '
            f'<b>RESULTS/verdicts/</b> of this scan (next to triage.csv), where <code>wsi-apl verdict</code> reads '
            f'it. Nothing is sent anywhere.</p><pre class="verdict-json small"></pre></form>'
            f'<script>{VERDICT_JS}</script>')
