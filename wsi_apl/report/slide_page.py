"""One slide's page: summary and why, overview, areas with outlined cells, galleries, occlusion maps,
ratios against thresholds, morphometrics and the verdict form.

Pictures need the slide file and maps need the bundle; when either is missing the page says so in
plain words and keeps everything else. Pictures are written before the page that shows them.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..status import Status
from ..store import read_slide_group
from .data import HEADS, BundleInfo, Entry, scrub
from .html import HEAD_COLOURS, HEAD_NAMES, esc, fmt, page, status_chip, synthetic_banner, table, verdict_form
from .pictures import area_picture, cell_kind, crop_picture, heat_overlay, overview_picture, save_picture
from .sections import fired, morphometrics_section, qc_words, ratios_section, why_line

GALLERY_SIZE = 12
OCCLUSION_CELLS = 4          # per gallery
TAGS = {"promyelocyte": "P", "myeloblast": "B", "auer_rod": "A"}


@dataclass
class Context:
    """What every page of one report run shares."""

    results: Path
    report: Path
    binfo: BundleInfo
    known_paths: list[str]
    occlusion: bool = True
    log: object = print
    occlusion_cells: int = OCCLUSION_CELLS     # per gallery
    scan_bundle: str = ""                      # the label of the latest scan's bundle (the ledger's)

    def banner(self, row: dict) -> str:
        return synthetic_banner([row.get("bundle") or "", self.scan_bundle])


@dataclass
class SlidePage:
    html: str
    images: list[Path] = field(default_factory=list)
    occlusion_s: float | None = None
    seconds: float = 0.0


def render_slide(e: Entry, ctx: Context) -> SlidePage:
    """The page of one slide; pictures go to ``report/img/<id>/``."""
    t0 = time.perf_counter()
    out = SlidePage("")
    row = e.row
    cols = attrs = None
    if e.analysed and e.group:
        try:
            cols, attrs = read_slide_group(ctx.results, e.group)
        except Exception:  # zarr raises its own types for a missing or damaged group
            cols = attrs = None
    made_by = ((attrs or {}).get("provenance") or {}).get("bundle_id") or label_id(row.get("bundle") or "")
    rule_why = ctx.binfo.matches(made_by)
    body = [_summary(e, ctx, rule_why)]
    if cols is None:
        body.append(_no_cells(e))
        if any(row.get(f"{h}_ratio") is not None for h in HEADS):
            body.append("<h2>Ratios and thresholds</h2>" + ratios_section(row, ctx.binfo, rule_why))
    else:
        body.append(_analysed(e, ctx, cols, attrs, rule_why, out))
    body.append("<h2 id=\"verdict-form\">Your verdict</h2>" + verdict_form(e.id, e.fingerprint))
    title = f"Slide {e.id} – {row.get('status')}"
    out.html = page(title, f"<h1>Slide {esc(e.id)} {status_chip(e.status)}</h1>" + "".join(body),
                    banner=ctx.banner(row), up="../index.html")
    out.seconds = time.perf_counter() - t0
    return out


def label_id(label: str) -> str | None:
    """The bundle id in a bundle label (``name@id (...)``), or None."""
    m = re.search(r"@([0-9a-f]{8,})", label or "")
    return m.group(1) if m else None


def _summary(e: Entry, ctx: Context, rule_why: str) -> str:
    row = e.row
    why = why_line(row, ctx.binfo.rule() if not rule_why else {}, ctx.known_paths)
    qc = qc_words(row, ctx.known_paths)
    cases = sorted({r.get("case") or "" for r in e.rows} - {""})
    names = sorted({r.get("slide") or "" for r in e.rows} - {""})
    facts = [
        ["listed as", esc(", ".join(names) or "–")],
        ["case", esc(", ".join(cases) or "–")],
        ["slide id", f"<code>{esc(e.id)}</code> (first 16 hex digits of the fingerprint in triage.csv)"],
        ["rank in the list", esc(", ".join(str(r.get("rank")) for r in e.rows))],
    ]
    if row.get("suspicion") is not None or row.get("cells"):  # a result: its numbers
        facts += [
            ["suspicion (95 % CI)", f"{fmt(row.get('suspicion'))} ({fmt(row.get('suspicion_ci_low'))} – "
                                    f"{fmt(row.get('suspicion_ci_high'))})"],
            ["P(APL vs AML)", fmt(row.get("p_apl_vs_aml"))],
            ["P(APL vs healthy marrow)", fmt(row.get("p_apl_vs_healthy"))],
            ["counted cells / areas", f"{esc(row.get('cells') if row.get('cells') is not None else '–')} / "
                                      f"{esc(row.get('areas') if row.get('areas') is not None else '–')}"],
            ["blasts and blast equivalents", f"{fmt(row.get('blast_percent'), 1)} %"],
        ]
    facts += [["quality control", "<br>".join(esc(q) for q in qc) or "no warnings"],
              ["bundle", esc(scrub(row.get("bundle") or "–", ctx.known_paths))],
              ["scanned at", esc(row.get("scanned_at") or "–")]]
    if len(e.rows) > 1:
        facts.append(["note", f"the same file is listed {len(e.rows)} times (under {len(e.rows)} names)"])
    return f'<p class="why">{esc(why)}</p>' + table(["", ""], facts)


def _no_cells(e: Entry) -> str:
    """Why a slide has no cell pictures, in plain words."""
    if e.status == Status.FAILED:
        words = ("The scan could not analyse this slide, so there are no cells to show. The reason above says what "
                 "went wrong and what to do; look at the slide yourself.")
    elif e.status == Status.NOT_ANALYSED:
        words = ("This slide has no result of this scan's models (the scan ended, was stopped, or the result came "
                 "from other models), so there are no cells to show. Look at the slide yourself.")
    elif e.group:
        words = ("The cell store holds no cells for this slide (it was removed or could not be read), so only the "
                 "numbers of triage.csv are shown.")
    else:
        words = ("The slide was not analysed far enough to store cells (for example no usable area was found), so "
                 "there are no cells to show. Look at the slide yourself.")
    return f'<h2>Cells</h2><p id="no-cells">{esc(words)}</p>'


def _open(e: Entry, attrs: dict):
    """The slide file the scan read, opened (None, why) when it is gone or unreadable."""
    from tile_selector.errors import SlideError
    from tile_selector.slide import open_slide

    mpp = (attrs.get("slide") or {}).get("mpp")
    mpp = float(np.mean(mpp)) if isinstance(mpp, list) and mpp else None
    problems = []
    for p in e.paths:
        if not Path(p).exists():
            problems.append("the slide file is no longer where the scan read it")
            continue
        try:
            return open_slide(p, mpp=mpp), ""
        except (SlideError, OSError, ValueError) as exc:
            problems.append(f"the slide file could not be opened ({type(exc).__name__})")
    return None, (problems[0] if problems else "the ledger names no slide file for this slide")


def _analysed(e: Entry, ctx: Context, cols: dict, attrs: dict, rule_why: str, out: SlidePage) -> str:
    img_dir = ctx.report / "img" / e.id
    rel = f"../img/{e.id}"
    thresholds = ctx.binfo.head_thresholds() if not rule_why else {}
    areas = list(attrs.get("areas") or [])
    kinds = fired(cols, thresholds)
    galleries = _galleries(cols)
    tags = {(h, i): f"{TAGS[h]}{k + 1}" for h in galleries for k, i in enumerate(galleries[h])}
    cell_tags: dict[int, str] = {}
    for (h, i), tag in tags.items():
        cell_tags[i] = f"{cell_tags[i]}/{tag}" if i in cell_tags else tag
    slide, slide_why = _open(e, attrs)
    toc = [("ratios", "ratios and thresholds"), ("overview", "overview"), ("cells", "highest-scoring cells"),
           ("occlusion", "occlusion maps"), ("areas", "areas"), ("morphometrics", "morphometrics"),
           ("verdict-form", "your verdict")]
    parts = ['<p class="small">' + " · ".join(f'<a href="#{k}">{t}</a>' for k, t in toc) + "</p>"]
    # (d) why: the ratios against the bundle's thresholds
    parts.append('<h2 id="ratios">Ratios and thresholds</h2>' + ratios_section(e.row, ctx.binfo, rule_why))
    # (a) overview
    parts.append('<h2 id="overview">Overview</h2>')
    near = [str(a.get("rank", "?")) for a in areas if (a.get("scores") or {}).get("near_blur")]
    many = len(near) > 1
    near_note = (f"; red-orange: area{'s' if many else ''} {', '.join(near)}, taken next to an out-of-focus patch: "
                 f"check {'their' if many else 'its'} focus" if near else "")
    if slide is not None:
        try:
            out.images.append(save_picture(overview_picture(slide, areas), img_dir / "overview.jpg"))
            parts.append(f'<p><img src="{rel}/overview.jpg" alt="overview of the slide with the chosen areas '
                         f'numbered" style="max-width:100%;border:1px solid #adb5bd"></p>'
                         f'<p class="small">{len(areas)} chosen areas, numbered by rank (yellow boxes{near_note}); '
                         f'the numbers lead to the <a href="#areas">area pictures</a>.</p>')
        except Exception as exc:  # a reader error on one picture must not lose the page
            parts.append(f"<p>The overview could not be drawn ({esc(type(exc).__name__)}).</p>")
    else:
        parts.append(f"<p>No pictures: {esc(slide_why)}.</p>")
    # (c) galleries, each cell linked to its area picture
    parts.append('<h2 id="cells">Highest-scoring cells</h2>' + _legend(thresholds, rule_why))
    for h, idx in galleries.items():
        parts.append(f"<h3>{esc(HEAD_NAMES[h].capitalize())} (top {len(idx)} by probability)</h3>"
                     + _gallery(h, idx, cols, tags, img_dir, rel, out))
    parts.append('<h2 id="occlusion">What the cell heads look at (occlusion maps)</h2>'
                 + _occlusion(e, ctx, cols, areas, galleries, tags, slide, slide_why, rule_why, img_dir, rel, out))
    # (b) areas
    parts.append('<h2 id="areas">Areas</h2>' + _legend(thresholds, rule_why)
                 + _areas(ctx, cols, areas, thresholds, cell_tags, slide, img_dir, rel, out))
    # (e) morphometrics
    parts.append('<h2 id="morphometrics">Morphometrics</h2>' + morphometrics_section(cols, kinds))
    return "".join(parts)


def _areas(ctx: Context, cols: dict, areas: list[dict], thresholds: dict, cell_tags: dict, slide, img_dir: Path,
           rel: str, out: SlidePage) -> str:
    """Each area's picture with its cells outlined by the head that fired, gallery cells labelled."""
    if not areas:
        return "<p>No area was chosen on this slide.</p>"
    area_of = np.asarray(cols.get("area", np.zeros(0, int)))
    parts = []
    for a in areas:
        rank = int(a.get("rank", 0))
        members = np.flatnonzero(area_of == rank - 1)
        parts.append(f'<div class="area card" id="area-{rank}"><h3>Area {rank}</h3><p class="small">'
                     f'{esc(scrub(a.get("why") or "", ctx.known_paths))}; {len(members)} cells detected.</p>')
        if slide is not None:
            cells = [dict(zip(("kind", "rod"), cell_kind(_probs(cols, i), thresholds)), box=cols["box_px"][i],
                          tag=cell_tags.get(int(i), "")) for i in members]
            try:
                img, _ = area_picture(slide, a, cells)
                name = f"area-{rank:02d}.jpg"
                out.images.append(save_picture(img, img_dir / name))
                parts.append(f'<img src="{rel}/{name}" alt="area {rank} with its cells outlined" '
                             f'width="{img.size[0]}" height="{img.size[1]}">')
            except Exception as exc:
                parts.append(f"<p>The area could not be drawn ({esc(type(exc).__name__)}).</p>")
        parts.append("</div>")
    return f'<div class="cols">{"".join(parts)}</div>'


def _probs(cols: dict, i: int) -> dict[str, float]:
    return {h: float(cols[f"p_{h}"][i]) for h in HEADS if f"p_{h}" in cols}


def _legend(thresholds: dict[str, float], rule_why: str) -> str:
    def t(h: str) -> str:
        return f"p ≥ {fmt(thresholds.get(h, 0.5))}"

    note = ("" if thresholds else f' <span class="small">(the bundle\'s thresholds are unavailable, '
            f'so p ≥ 0.50 is used: {esc(rule_why)})</span>')
    items = [f'<span><i class="sw" style="border-color:{HEAD_COLOURS[h]}"></i>{esc(HEAD_NAMES[h])} ({t(h)})</span>'
             for h in ("promyelocyte", "myeloblast")]
    items.append(f'<span><i class="sw" style="border-color:{HEAD_COLOURS["auer_rod"]};border-width:3px"></i>'
                 f'outer ring: Auer rods ({t("auer_rod")})</span>')
    items.append(f'<span><i class="sw" style="border-color:{HEAD_COLOURS["other"]};border-width:1px"></i>'
                 'other cells</span>')
    return f'<p class="legend">{"".join(items)}{note}</p>'


def _galleries(cols: dict) -> dict[str, list[int]]:
    """The indices of the highest-scoring cells per head (at most GALLERY_SIZE each)."""
    out = {}
    for h in HEADS:
        if f"p_{h}" in cols and len(cols[f"p_{h}"]):
            p = np.asarray(cols[f"p_{h}"], float)
            out[h] = [int(i) for i in np.argsort(-p, kind="stable")[:GALLERY_SIZE]]
    return out


def _gallery(head: str, idx: list[int], cols: dict, tags: dict, img_dir: Path, rel: str, out: SlidePage) -> str:
    items = []
    for i in idx:
        tag = tags[(head, i)]
        name = f"cell-{tag}.png"
        out.images.append(save_picture(crop_picture(cols["crops"][i]), img_dir / name))
        rank = int(cols["area"][i]) + 1
        p = float(cols[f"p_{head}"][i])
        cut = " cut" if bool(cols["cut"][i]) else ""
        items.append(f'<a class="cell" id="cell-{tag}" href="#area-{rank}" title="{esc(HEAD_NAMES[head])} '
                     f'p={p:.3f}, area {rank}{cut}"><img src="{rel}/{name}" alt="cell {tag}">'
                     f'<b>{tag}</b> p {p:.2f}<br>area {rank}{cut}</a>')
    return f'<div class="gallery">{"".join(items)}</div>'


def _occlusion(e, ctx: Context, cols, areas, galleries, tags, slide, slide_why, rule_why, img_dir, rel,
               out: SlidePage) -> str:
    """Maps for the top cells of each gallery, or why there are none."""
    if not ctx.occlusion:
        return "<p>Occlusion maps were not made for this report (--no-occlusion).</p>"
    why = slide_why if slide is None else rule_why
    if not why and ctx.binfo.bundle is not None and not ctx.binfo.bundle.has("cells"):
        why = "the bundle has no cell classifier"
    if why:
        return f"<p>The occlusion maps could not be made: {esc(why)}.</p>"
    from .occlusion import cell_model, timed_maps

    by_rank = {int(a.get("rank", 0)) - 1: a for a in areas}
    wanted = [(i, h) for h, idx in galleries.items() for i in idx[:ctx.occlusion_cells]
              if int(cols["area"][i]) in by_rank]
    if not wanted:
        return "<p>No cells to explain.</p>"
    cells: dict[int, tuple] = {}
    for i, h in wanted:
        cells.setdefault(i, (int(cols["area"][i]), cols["box_px"][i], []))[2].append(h)
    try:
        model, cfg = cell_model(ctx.binfo.bundle)
        maps, secs = timed_maps(model, cfg, slide, ctx.binfo.bundle.mpp, by_rank, cells)
    except Exception as exc:  # the report is written even when the models cannot run
        return f"<p>The occlusion maps could not be made: {esc(scrub(str(exc), ctx.known_paths))}.</p>"
    out.occlusion_s = secs
    figs = []
    for i, h in wanted:
        m = maps[(i, h)]
        tag = tags[(h, i)]
        top = float(m.drop.max())
        vmax = max(0.01, top)
        name = f"occ-{tag}.jpg"
        out.images.append(save_picture(heat_overlay(m.crop, m.drop, vmax), img_dir / name, quality=85))
        stored = float(cols[f"p_{h}"][i])
        figs.append(f'<figure><a href="#cell-{tag}"><img src="{rel}/{name}" alt="occlusion map of cell {tag}"></a>'
                    f'<figcaption><b>{tag}</b> {esc(HEAD_NAMES[h])}: p {stored:.2f} stored, {m.p:.2f} re-read;<br>'
                    f'largest drop {top:.3f} (= yellow)</figcaption></figure>')
    return (f'<div class="occ">{"".join(figs)}</div><p class="small">Left: the crop the head saw; right: the drop '
            f'of its probability when a grey patch of 1/8 of the crop hides each part (stride 1/16), from none '
            f'(no tint) to the largest drop of that cell (yellow). {len(cells)} cells, {len(wanted)} maps in '
            f'<span id="occlusion-seconds">{secs:.1f}</span> s (occlusion seconds for this slide).</p>')


def error_page(e: Entry, exc: BaseException, ctx: Context) -> str:
    """A page that says the slide's page could not be made (the index still links somewhere useful)."""
    msg = scrub(f"{type(exc).__name__}: {exc}", ctx.known_paths)
    body = (f"<h1>Slide {esc(e.id)} {status_chip(e.status)}</h1><p>This page could not be made ({esc(msg)}). "
            f"The row in triage.csv is unaffected; look at the slide yourself.</p>"
            + "<h2>Your verdict</h2>" + verdict_form(e.id, e.fingerprint))
    return page(f"Slide {e.id}", body, banner=ctx.banner(e.row), up="../index.html")

