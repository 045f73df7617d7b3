"""Text and tables of a slide page that need no pixels: why the slide got its status, the ratios next
to the bundle's thresholds, the morphometrics of each finding against the slide's other cells.
"""

from __future__ import annotations

import numpy as np

from ..status import Status
from .data import HEADS, BundleInfo, scrub
from .html import HEAD_COLOURS, HEAD_NAMES, box_plot, ci_bar, esc, fmt, table


def why_line(row: dict, rule: dict, known_paths: list[str]) -> str:
    """One plain sentence on why the slide got its status (from the list's status, reason and QC)."""
    status = row.get("status")
    reason = scrub(row.get("reason") or "", known_paths)
    per_net = rule.get("thresholds") or {}
    p1, p2 = row.get("p_apl_vs_aml"), row.get("p_apl_vs_healthy")
    if status == Status.FLAGGED:
        if per_net:
            s = (f"Flagged: both slide-level nets reached their thresholds (APL vs AML {fmt(p1)} ≥ "
                 f"{fmt(per_net.get('apl_vs_aml'))}, APL vs healthy marrow {fmt(p2)} ≥ "
                 f"{fmt(per_net.get('apl_vs_healthy'))}).")
        else:
            s = (f"Flagged: the bundle's flag rule fired (APL vs AML {fmt(p1)}, APL vs healthy marrow {fmt(p2)}, "
                 f"suspicion {fmt(row.get('suspicion'))}).")
    elif status == Status.NOT_FLAGGED:
        s = ("Not flagged: the slide-level nets did not both reach their thresholds, the bootstrap interval did not "
             "reach the flag and blasts stayed below the cutoff. This does not exclude APL.")
    elif status == Status.INCONCLUSIVE:
        s = f"Inconclusive: {reason or 'the tool could not earn a call'}. An expert must look at this slide."
    elif status == Status.FAILED:
        s = f"Failed: the slide could not be analysed: {reason or 'no reason recorded'}. Look at it yourself."
    else:
        s = f"Not analysed: {reason or 'no result of this scan'}. Look at this slide yourself."
    if reason and status in (Status.FLAGGED, Status.NOT_FLAGGED):
        s += f" ({reason})"
    return s


def qc_words(row: dict, known_paths: list[str]) -> list[str]:
    return [scrub(q.strip(), known_paths) for q in (row.get("qc") or "").split(" | ") if q.strip()]


def ratios_section(row: dict, binfo: BundleInfo, why_not: str) -> str:
    """The three ratios with their 95 % intervals, each head's counting threshold, and the decision
    rule's thresholds next to this slide's numbers (or why the thresholds are unavailable)."""
    heads_t = binfo.head_thresholds() if not why_not else {}
    rows = []
    for h in HEADS:
        v, lo, hi = row.get(f"{h}_ratio"), row.get(f"{h}_ci_low"), row.get(f"{h}_ci_high")
        t = heads_t.get(h)
        rows.append([esc(HEAD_NAMES[h]), f'<td class="num">{fmt(v, 3, pct=True)}</td>',
                     f'<td class="num">{fmt(lo, 3, pct=True)} – {fmt(hi, 3, pct=True)}</td>',
                     ci_bar(v, lo, hi, 180, colour=HEAD_COLOURS[h]),
                     f'<td class="num">p ≥ {fmt(t)}</td>' if t is not None else "unavailable"])
    out = ["<h3>Ratios of counted cells (95 % confidence interval, two-level bootstrap)</h3>",
           table(["finding", "ratio", "95 % CI", "0 – 100 %", "a cell counts when"], rows)]
    if why_not:
        out.append(f"<p><b>Thresholds unavailable:</b> {esc(why_not)}.</p>")
        return "".join(out)
    rule = binfo.rule()
    rule_rows = []
    per_net = rule.get("thresholds") or {}
    for key, name in (("apl_vs_aml", "APL vs AML net"), ("apl_vs_healthy", "APL vs healthy-marrow net")):
        v, t = row.get(f"p_{key}"), per_net.get(key)
        met = "–" if v is None or t is None else ("yes" if v >= t else "no")
        rule_rows.append([esc(name), f'<td class="num">{fmt(v)}</td>', f'<td class="num">≥ {fmt(t)}</td>', met])
    if not per_net and rule.get("threshold") is not None:
        v, t = row.get("suspicion"), rule.get("threshold")
        rule_rows.append(["suspicion", f'<td class="num">{fmt(v)}</td>', f'<td class="num">≥ {fmt(t)}</td>',
                          "–" if v is None else ("yes" if v >= t else "no")])
    cells, need = row.get("cells"), rule.get("min_cells")
    if need is not None:
        rule_rows.append(["counted cells (else inconclusive)", f'<td class="num">{esc(cells)}</td>',
                          f'<td class="num">≥ {int(need)}</td>', "–" if cells is None else
                          ("yes" if cells >= need else "no")])
    b, cut = row.get("blast_percent"), rule.get("blast_inconclusive_percent")
    if cut is not None:
        rule_rows.append(["blasts and equivalents (not flagged: inconclusive from)",
                          f'<td class="num">{fmt(b, 1)} %</td>', f'<td class="num">≥ {fmt(cut, 1)} %</td>',
                          "–" if b is None else ("yes" if b >= cut else "no")])
    out.append("<h3>The bundle's decision rule</h3>")
    out.append(table(["rule", "this slide", "threshold", "reached"], rule_rows))
    n_apl = rule.get("apl_slides")
    if n_apl is not None:
        out.append(f'<p class="small">Thresholds chosen for {fmt(rule.get("target_sensitivity"), 2, pct=True)} '
                   f'sensitivity on {int(n_apl)} APL and {int(rule.get("non_apl_slides", 0))} other slides.</p>')
    return "".join(out)


def _iqr(v: np.ndarray) -> str:
    v = v[np.isfinite(v)]
    if not len(v):
        return "–"
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return f"{med:.2f} [{q1:.2f}–{q3:.2f}]"


def morphometrics_section(cols: dict, kinds: dict[str, np.ndarray]) -> str:
    """Diameter (µm) and N:C ratio of each finding's cells against the slide's other counted cells:
    median [IQR] and a box plot with the cells as a strip."""
    keep = ~np.asarray(cols.get("cut", np.zeros(0, bool)), bool)
    if "diameter_um" not in cols or not keep.any():
        return "<p>No counted cells to measure.</p>"
    groups = [(HEAD_NAMES[h], HEAD_COLOURS[h], kinds[h] & keep) for h in (*HEADS, "other") if h in kinds]
    rows = []
    for name, _, m in groups:
        rows.append([esc(name), f'<td class="num">{int(m.sum())}</td>',
                     f'<td class="num">{_iqr(np.asarray(cols["diameter_um"], float)[m])}</td>',
                     f'<td class="num">{_iqr(np.asarray(cols["nc_ratio"], float)[m])}</td>'])
    d = np.asarray(cols["diameter_um"], float)[keep]
    d = d[np.isfinite(d)]
    hi = float(np.ceil(np.percentile(d, 99) / 5) * 5) if len(d) else 30.0
    plots = [box_plot([(n, c, np.asarray(cols["diameter_um"], float)[m]) for n, c, m in groups], 0.0, max(hi, 5.0),
                      "µm diameter"),
             box_plot([(n, c, np.asarray(cols["nc_ratio"], float)[m]) for n, c, m in groups], 0.0, 1.0,
                      "N:C ratio")]
    return (table(["cells", "n", "diameter µm, median [IQR]", "N:C ratio, median [IQR]"], rows)
            + '<div class="cols" style="margin-top:8px">' + "".join(f'<div class="card">{p}</div>' for p in plots)
            + "</div><p class=\"small\">Counted cells only (cells cut by an area border are left out). A cell "
            "counts for a finding when its head reaches the threshold; a promyelocyte with Auer rods counts for "
            "both; other cells = none of the three.</p>")


def fired(cols: dict, thresholds: dict[str, float]) -> dict[str, np.ndarray]:
    """Masks of the cells each head fired on (at its threshold) and of the others."""
    n = len(cols.get("score", []))
    kinds = {h: np.asarray(cols[f"p_{h}"], float) >= thresholds.get(h, 0.5) for h in HEADS if f"p_{h}" in cols}
    any_ = np.zeros(n, bool)
    for m in kinds.values():
        any_ |= m
    kinds["other"] = ~any_
    return kinds
