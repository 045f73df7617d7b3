"""Verification by the lab: experts' verdicts on slides, and how the tool did on them.

A verdict is one small JSON file per slide, ``RESULTS/verdicts/verdict-<slide id>.json`` (the slide id
is the fingerprint's first 16 hex digits, as on the report's pages)::

    {"slide_id": "...", "fingerprint": "<64 hex>", "says": "apl" | "not_apl" | "unreadable",
     "comment": "...", "at": "<ISO time>"}

``wsi-apl verdict`` writes one; the HTML report offers the same file as a download (put it into the
folder's ``verdicts/``). ``wsi-apl verify`` gathers the verdicts of one or more results folders of one
bundle, joins them with triage.csv and reports at the bundle's thresholds sensitivity, specificity and
PPV with Wilson 95 % intervals (flagged = positive, not_flagged = negative; inconclusive, failed and
not_analysed slides are counted apart and never as negatives; ``unreadable`` verdicts are left out
and counted), and drift: this set's suspicions, counted cells, focus and QC-inconclusive share against
the figures of the slides the bundle's slide-level nets were validated on (``bundle.json``,
``parts.slide_nets.metrics.reference``).

Decision support only: these figures describe the tool on the lab's slides; they do not make a
not_flagged call exclude APL.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from workers.bundle import replace_atomically

from .export import find_slide, read_ledger
from .status import DECISION_SUPPORT, RESULTS, Status
from .triage import TRIAGE, unneutralise

VERDICTS = "verdicts"
SAYS = ("apl", "not_apl", "unreadable")
KEYS = ("slide_id", "fingerprint", "says", "comment", "at")
#: Drift is judged only with at least this many slides on each side.
MIN_DRIFT_SLIDES = 5
#: A two-sample KS test below this p-value calls two distributions different.
DRIFT_P = 0.01
_FP = re.compile(r"[0-9a-f]{64}")
_BUNDLE_ID = re.compile(r"@([0-9a-f]{16})")
_NO_CALL = (Status.INCONCLUSIVE, Status.FAILED, Status.NOT_ANALYSED)


class VerifyError(ValueError):
    """Verification refused or impossible, in plain words: which folder or file, and what to do."""


# -- verdict files ----------------------------------------------------------------------------------


def verdict_path(results: Path, slide_id: str) -> Path:
    return Path(results) / VERDICTS / f"verdict-{slide_id}.json"


def make_verdict(fingerprint: str, says: str, comment: str = "", at: str | None = None) -> dict:
    """A verdict with exactly the keys of the format (the report's download writes the same)."""
    if says not in SAYS:
        raise VerifyError(f"--says {says!r}: say one of {', '.join(SAYS)}")
    at = at or dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"slide_id": fingerprint[:16], "fingerprint": fingerprint, "says": says, "comment": comment, "at": at}


def write_verdict(results: Path, slide: str, says: str, comment: str = "") -> tuple[Path, dict | None]:
    """Write the verdict on ``slide`` (a name in triage.csv, a file name or a fingerprint prefix)
    atomically; returns (file, the verdict it replaced or None)."""
    ref = find_slide(results, slide)
    v = make_verdict(ref.fingerprint, says, comment)
    path = verdict_path(results, ref.slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = read_verdict(path) if path.exists() else None
    except VerifyError:
        old = None
    text = json.dumps(v, indent=2, ensure_ascii=False) + "\n"
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path, old


def read_verdict(path: Path) -> dict:
    """One verdict file, checked: exactly the format's keys, a 64-hex fingerprint whose first 16 digits
    are the slide id, ``says`` one of apl / not_apl / unreadable, an ISO time."""
    fix = "write it again with 'wsi-apl verdict' or the report's download"
    try:
        v = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise VerifyError(f"{path}: not a readable JSON file ({exc}); {fix}") from exc
    if not isinstance(v, dict) or set(v) != set(KEYS):
        got = sorted(v) if isinstance(v, dict) else type(v).__name__
        raise VerifyError(f"{path}: a verdict holds exactly the keys {', '.join(KEYS)} (found {got}); {fix}")
    if not isinstance(v["fingerprint"], str) or not _FP.fullmatch(v["fingerprint"]):
        raise VerifyError(f"{path}: 'fingerprint' is not the 64 hex digits of a slide's SHA-256; {fix}")
    if v["slide_id"] != v["fingerprint"][:16]:
        raise VerifyError(f"{path}: 'slide_id' is not the first 16 digits of 'fingerprint'; {fix}")
    if v["says"] not in SAYS:
        raise VerifyError(f"{path}: 'says' is {v['says']!r}, not one of {', '.join(SAYS)}; {fix}")
    if not isinstance(v["comment"], str):
        raise VerifyError(f"{path}: 'comment' is not text; {fix}")
    try:
        dt.datetime.fromisoformat(str(v["at"]))
    except ValueError:
        raise VerifyError(f"{path}: 'at' is {v['at']!r}, not an ISO time such as 2026-03-01T08:15:00+01:00; "
                          f"{fix}") from None
    return v


def read_verdicts(results: Path) -> tuple[pd.DataFrame, list[str]]:
    """The verdicts of ``results/verdicts/*.json`` (columns: the format's keys, ``file``), and one line per
    file that is not a verdict (named, with the fix: skipped, never guessed at)."""
    rows, problems = [], []
    folder = Path(results) / VERDICTS
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rows.append({**read_verdict(path), "file": str(path)})
        except VerifyError as exc:
            problems.append(str(exc))
    return pd.DataFrame(rows, columns=[*KEYS, "file"]), problems


# -- the results folders ------------------------------------------------------------------------------


def read_triage(results: Path) -> pd.DataFrame:
    """triage.csv as text, one row per slide file, in the list's order."""
    path = Path(results) / TRIAGE
    if not path.exists():
        raise VerifyError(f"{results}: no {TRIAGE}; give the --out folder of a 'wsi-apl scan' (or run 'wsi-apl "
                          f"triage {results}' to write it from the ledger)")
    t = pd.read_csv(path, dtype=str, keep_default_na=False)
    return t.map(unneutralise)


def bundle_ids(results: Path, triage: pd.DataFrame) -> dict[str, str]:
    """id → label of every bundle a folder's results name (triage.csv's bundle column, the ledger's latest)."""
    out = {}
    for label in triage.get("bundle", pd.Series(dtype=str)):
        m = _BUNDLE_ID.search(label or "")
        if m:
            out[m.group(1)] = label
    try:
        _, meta = read_ledger(results)
    except ValueError:
        meta = {}
    if "bundle" in meta:
        b = json.loads(meta["bundle"])
        out.setdefault(b["id"], b.get("label", b["id"]))
    return out


@dataclass
class Folder:
    results: Path
    triage: pd.DataFrame
    bundles: dict[str, str]


def load_folders(folders: list[Path], bundle) -> list[Folder]:
    """Read every results folder; refuse (VerifyError) a mix of bundles, or results of another bundle than
    ``bundle``: thresholds and validation figures belong to one bundle."""
    out = []
    for f in map(Path, folders):
        triage = read_triage(f)
        out.append(Folder(f, triage, bundle_ids(f, triage)))
    seen: dict[str, list[str]] = {}
    labels: dict[str, str] = {}
    for f in out:
        for bid, label in f.bundles.items():
            seen.setdefault(bid, []).append(str(f.results))
            labels[bid] = label
    if not seen:
        raise VerifyError("no results of any bundle in " + ", ".join(str(f) for f in folders)
                          + "; scan slides first")
    if len(seen) > 1:
        raise VerifyError("the results mix bundles: " + "; ".join(f"{labels[b]} in {', '.join(fs)}"
                                                                  for b, fs in seen.items())
                          + ". Verify the results of one bundle at a time (scan again with one bundle, or give "
                            "only its folders)")
    (only,) = seen
    if only != bundle.id:
        raise VerifyError(f"the results were made with bundle {labels[only]}, not with {bundle.label} "
                          f"({bundle.path}); give that bundle with --bundle")
    return out


def slides_of(folders: list[Folder]) -> pd.DataFrame:
    """One row per slide (fingerprint; the best-ranked row of a file seen under two names, the first folder
    of a slide scanned in two), with its folder."""
    parts = [f.triage.assign(results=str(f.results)) for f in folders]
    t = pd.concat(parts, ignore_index=True)
    t = t[t["fingerprint"] != ""]
    return t.drop_duplicates("fingerprint", keep="first").reset_index(drop=True)


# -- the figures ------------------------------------------------------------------------------------


def wilson(k: int, n: int) -> tuple[float | None, float | None]:
    """Wilson score 95 % interval of k of n (statsmodels when installed, else scipy); None for n = 0."""
    if n <= 0:
        return None, None
    try:
        from statsmodels.stats.proportion import proportion_confint
    except ImportError:
        from scipy.stats import binomtest

        ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
        return float(ci.low), float(ci.high)
    lo, hi = proportion_confint(int(k), int(n), alpha=0.05, method="wilson")
    return float(lo), float(hi)


def proportion(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"value": k / n if n else None, "ci_low": lo, "ci_high": hi, "k": int(k), "n": int(n)}


def _numbers(s: pd.Series) -> np.ndarray:
    v = pd.to_numeric(s, errors="coerce").to_numpy(np.float64)
    return v[np.isfinite(v)]


def compare(name: str, here: np.ndarray, ref: list | None, unit: str = "") -> dict:
    """This set's values against the bundle's validation values: quantiles side by side and a two-sample
    Kolmogorov-Smirnov test, said in plain words."""
    from scipy.stats import ks_2samp

    q = (10, 50, 90)
    d: dict = {"n": len(here), "reference_n": len(ref) if ref is not None else 0,
               "quantiles_10_50_90": [float(v) for v in np.percentile(here, q)] if len(here) else None}
    if ref is None:
        d.update(verdict="not assessed", words=f"{name}: the bundle holds no validation figures for it (trained "
                 "before they were recorded); retrain its slide-level nets ('wsi-apl train enn') to get them")
        return d
    ref = np.asarray(ref, np.float64)
    d["reference_quantiles_10_50_90"] = [float(v) for v in np.percentile(ref, q)] if len(ref) else None

    def fmt(v):
        return f"{v[1]:.3g}{unit} (10-90 %: {v[0]:.3g}-{v[2]:.3g})"

    if len(here) < MIN_DRIFT_SLIDES or len(ref) < MIN_DRIFT_SLIDES:
        d.update(verdict="too few slides", words=f"{name}: too few slides to judge ({len(here)} here, {len(ref)} "
                 f"in validation; at least {MIN_DRIFT_SLIDES} each)")
        return d
    ks = ks_2samp(here, ref)
    d.update(ks_statistic=float(ks.statistic), p_value=float(ks.pvalue))
    same = ks.pvalue >= DRIFT_P
    d["verdict"] = "similar" if same else "differs"
    d["words"] = (f"{name}: median {fmt(d['quantiles_10_50_90'])} on {len(here)} slides here, "
                  f"{fmt(d['reference_quantiles_10_50_90'])} on {len(ref)} validation slides; "
                  f"KS D = {ks.statistic:.2f}, p = {ks.pvalue:.3g}: "
                  + ("no sign that the slides differ from those the bundle was validated on" if same else
                     "the slides differ from those the bundle was validated on (another scanner, stain, "
                     "population?); its thresholds and figures may not hold here"))
    return d


def compare_share(name: str, k: int, n: int, ref_k: int | None, ref_n: int | None) -> dict:
    """A share here (with its Wilson interval) against the validation share: differs when the validation
    share lies outside this set's interval."""
    d = {"here": proportion(k, n)}
    if ref_k is None or not ref_n:
        d.update(verdict="not assessed", words=f"{name}: the bundle holds no validation figure for it")
        return d
    ref = ref_k / ref_n
    d["reference"] = {"value": ref, "k": int(ref_k), "n": int(ref_n)}
    if n < MIN_DRIFT_SLIDES:
        d.update(verdict="too few slides", words=f"{name}: too few slides to judge ({n} here)")
        return d
    h = d["here"]
    inside = h["ci_low"] <= ref <= h["ci_high"]
    d["verdict"] = "similar" if inside else "differs"
    d["words"] = (f"{name}: {100 * h['value']:.0f} % here ({k} of {n}; 95 % CI {100 * h['ci_low']:.0f}-"
                  f"{100 * h['ci_high']:.0f} %), {100 * ref:.0f} % ({ref_k} of {ref_n}) in validation: "
                  + ("within this set's interval" if inside else
                     "outside this set's interval: the slides' quality differs from the validation slides'"))
    return d


def _calls(df: pd.DataFrame) -> dict[str, int]:
    return {str(s): int((df["status"] == s).sum()) for s in Status}


def verify(folders: list[Path], bundle) -> dict:
    """The verification of ``folders`` (results of ``bundle``) on their verdicts; see the module docstring."""
    loaded = load_folders([Path(f) for f in folders], bundle)
    slides = slides_of(loaded)
    verdicts, problems = [], []
    for f in loaded:
        v, p = read_verdicts(f.results)
        verdicts.append(v)
        problems += p
    v = pd.concat(verdicts, ignore_index=True) if verdicts else pd.DataFrame(columns=[*KEYS, "file"])
    n_files = len(v)
    v = v.assign(_t=pd.to_datetime(v["at"], utc=True, format="ISO8601")).sort_values("_t", kind="stable")
    v = v.drop_duplicates("fingerprint", keep="last")  # the latest verdict on a slide counts
    joined = v.merge(slides[["fingerprint", "status", "slide", "results"]], on="fingerprint", how="left")
    unmatched = joined[joined["status"].isna()]
    joined = joined[joined["status"].notna()]
    unreadable = joined[joined["says"] == "unreadable"]
    used = joined[joined["says"] != "unreadable"]
    apl, neg = used[used["says"] == "apl"], used[used["says"] == "not_apl"]
    tp = int((apl["status"] == Status.FLAGGED).sum())
    fn = int((apl["status"] == Status.NOT_FLAGGED).sum())
    fp = int((neg["status"] == Status.FLAGGED).sum())
    tn = int((neg["status"] == Status.NOT_FLAGGED).sum())
    slide_nets = bundle.part("slide_nets") or {}
    rule = slide_nets.get("decision") or {}
    return {
        "bundle": {"id": bundle.id, "label": bundle.label},
        "results": [str(f.results) for f in loaded],
        "slides": len(slides),
        "verdicts": {"files": int(n_files), "slides": len(v), "superseded": int(n_files - len(v)),
                     "used": len(used), "unreadable": len(unreadable),
                     "without_slide": len(unmatched), "not_verdicts": problems},
        "thresholds": {"per_net": rule.get("thresholds"), "suspicion": rule.get("threshold"),
                       "min_cells": rule.get("min_cells"),
                       "blast_inconclusive_percent": rule.get("blast_inconclusive_percent")},
        "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
        "sensitivity": proportion(tp, tp + fn),
        "specificity": proportion(tn, tn + fp),
        "ppv": proportion(tp, tp + fp),
        "calls": {"apl": _calls(apl), "not_apl": _calls(neg)},
        "no_call": {"apl": int(apl["status"].isin(_NO_CALL).sum()), "not_apl": int(neg["status"].isin(_NO_CALL).sum())},
        "validation": {"sensitivity": rule.get("oof_sensitivity"), "specificity": rule.get("oof_specificity"),
                       "apl_slides": rule.get("apl_slides"), "non_apl_slides": rule.get("non_apl_slides")},
        "drift": drift(slides, slide_nets, int(rule.get("min_cells", 200) or 200)),
        "note": DECISION_SUPPORT,
    }


def drift(slides: pd.DataFrame, slide_nets: dict, min_cells: int) -> dict:
    """This set's analysed slides against the bundle's validation figures."""
    ref = (slide_nets.get("metrics") or {}).get("reference") or {}
    done = slides[slides["status"].isin(list(RESULTS))]
    cells = pd.to_numeric(done["cells"], errors="coerce").fillna(0)
    areas = pd.to_numeric(done["areas"], errors="coerce").fillna(0)
    qc_k = int(((areas == 0) | (cells < min_cells)).sum())
    return {
        "slides_analysed": len(done),
        "inconclusive": proportion(int((done["status"] == Status.INCONCLUSIVE).sum()), len(done)),
        "suspicion": compare("suspicion", _numbers(done["suspicion"]), ref.get("suspicion_oof")),
        "cells": compare("counted cells", _numbers(done["cells"]), ref.get("cells")),
        "mean_focus": compare("mean focus", _numbers(done["mean_focus"]), ref.get("mean_focus"), " µm⁻¹"),
        "qc_inconclusive": compare_share(f"inconclusive for QC (no area, or fewer than {min_cells} cells)", qc_k,
                                         len(done), ref.get("qc_inconclusive"), ref.get("slides")),
    }


def _pct(p: dict) -> str:
    if p["value"] is None:
        return f"not estimable (0 slides; {p['k']} of {p['n']})"
    return (f"{100 * p['value']:.0f} % (95 % CI {100 * p['ci_low']:.0f}-{100 * p['ci_high']:.0f} %; "
            f"{p['k']} of {p['n']})")


def report_lines(r: dict) -> list[str]:
    """The verification in plain words."""
    v, t = r["verdicts"], r["thresholds"]
    lines = [(f"Verification of {r['bundle']['label']} on {len(r['results'])} results folder(s): {r['slides']} "
              f"slides, {v['slides']} with a verdict ({v['used']} used, {v['unreadable']} unreadable and left out, "
              f"{v['without_slide']} for slides not in these folders, {v['superseded']} replaced by a later one)")]
    rule = (", ".join(f"{k} ≥ {x:.3f}" for k, x in t["per_net"].items()) if t.get("per_net")
            else f"suspicion ≥ {t['suspicion']:.3f}" if t.get("suspicion") is not None else "the bundle's rule")
    lines += [f"At the bundle's thresholds ({rule}; flagged = positive, not_flagged = negative):",
              f"  sensitivity {_pct(r['sensitivity'])} APL slides flagged",
              f"  specificity {_pct(r['specificity'])} not-APL slides not flagged",
              f"  PPV         {_pct(r['ppv'])} flagged slides that are APL"]
    for who, shown in (("apl", "APL"), ("not_apl", "not-APL")):
        c = r["calls"][who]
        lines.append(f"  {shown} slides without a call (counted apart, never as negatives): "
                     f"{c['inconclusive']} inconclusive, {c['failed']} failed, {c['not_analysed']} not analysed")
    val = r["validation"]
    if val.get("sensitivity") is not None:
        lines.append(f"The bundle's own validation (out of fold, {val.get('apl_slides')} APL and "
                     f"{val.get('non_apl_slides')} other slides): sensitivity {100 * val['sensitivity']:.0f} %, "
                     f"specificity {100 * val['specificity']:.0f} %")
    d = r["drift"]
    lines.append(f"Drift, {d['slides_analysed']} analysed slides against the bundle's validation slides:")
    for key in ("suspicion", "cells", "mean_focus", "qc_inconclusive"):
        lines.append(f"  {d[key]['words']}")
    for p in v["not_verdicts"]:
        lines.append(f"  skipped: {p}")
    lines.append(r["note"])
    return lines
