"""Do two scans of the same slides with the same bundle give the same results? (refactoring guard)

A refactoring must not change what a scan writes. Scan a small cohort before and after the change
(same slides, same bundle, same options), then compare the two results folders::

    git worktree add /tmp/before OLD_COMMIT
    (cd /tmp/before && PYTHONPATH=/tmp/before python /path/to/benchmarks/same_output.py \
        scan SLIDES_DIR BUNDLE_DIR RESULTS_BEFORE)                                  # the old code
    python benchmarks/same_output.py scan SLIDES_DIR BUNDLE_DIR RESULTS_AFTER       # the new code
    python benchmarks/same_output.py compare RESULTS_BEFORE RESULTS_AFTER

(The scan runs ``wsi-apl scan`` in a child process that imports the packages of its working
directory first, so the old commit's code runs from its worktree even with this checkout installed.)

``compare`` checks triage.csv (every column but the scan time) and every array of every slide group
of the zarr store, plus each group's ``result`` and ``areas`` attributes (timings excluded). Floats
must agree to 1e-5 relative: the same code on the same machine gives the same bits, but a change in
the order of additions (a refactored sum) may move the last digit. It prints each difference and
exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

#: Columns that hold when the scan ran, not what it found.
TIME_COLUMNS = {"scanned_at"}
#: Attribute keys of a slide group that hold timings.
TIME_KEYS = {"timings", "seconds", "scanned_at", "elapsed_s", "started_at", "finished_at"}
RTOL = 1e-5


def scan(slides: Path, bundle: Path, out: Path) -> int:
    cmd = [sys.executable, "-c", "import sys; from wsi_apl.cli import main; sys.exit(main())", "scan", str(slides), "--out", str(out), "--bundle", str(bundle),
           "--allow-synthetic", "--workers", "1", "--no-report"]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIME_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return bool(np.isclose(float(a), float(b), rtol=RTOL, atol=1e-8, equal_nan=True))
        except (TypeError, ValueError):
            return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def compare_triage(a: Path, b: Path) -> list[str]:
    import pandas as pd

    ta = pd.read_csv(a / "triage.csv", dtype=str, keep_default_na=False)
    tb = pd.read_csv(b / "triage.csv", dtype=str, keep_default_na=False)
    diffs = []
    if list(ta.columns) != list(tb.columns):
        return [f"triage.csv columns differ: {list(ta.columns)} vs {list(tb.columns)}"]
    if len(ta) != len(tb):
        return [f"triage.csv has {len(ta)} rows vs {len(tb)}"]
    for col in ta.columns:
        if col in TIME_COLUMNS:
            continue
        for k, (x, y) in enumerate(zip(ta[col], tb[col])):
            if x != y and not _numbers_close(x, y):
                diffs.append(f"triage.csv row {k + 1} ({ta['slide'][k]}) column {col}: {x!r} vs {y!r}")
    return diffs


def _numbers_close(x: str, y: str) -> bool:
    try:
        return bool(np.isclose(float(x), float(y), rtol=RTOL, atol=1e-8))
    except ValueError:
        return False


def compare_store(a: Path, b: Path) -> list[str]:
    from wsi_apl.store import read_slide_group, slide_groups

    ga, gb = slide_groups(a), slide_groups(b)
    diffs = [f"slide group {g} only in {a}" for g in sorted(set(ga) - set(gb))]
    diffs += [f"slide group {g} only in {b}" for g in sorted(set(gb) - set(ga))]
    for g in sorted(set(ga) & set(gb)):
        ca, aa = read_slide_group(a, g)
        cb, ab = read_slide_group(b, g)
        if sorted(ca) != sorted(cb):
            diffs.append(f"{g}: arrays {sorted(ca)} vs {sorted(cb)}")
            continue
        for name in sorted(ca):
            x, y = np.asarray(ca[name]), np.asarray(cb[name])
            if x.shape != y.shape or x.dtype != y.dtype:
                diffs.append(f"{g}/{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
            elif x.dtype.kind == "f":
                if not np.allclose(x, y, rtol=RTOL, atol=1e-6, equal_nan=True):
                    diffs.append(f"{g}/{name}: largest difference {float(np.nanmax(np.abs(x - y))):.3g}")
            elif not np.array_equal(x, y):
                diffs.append(f"{g}/{name}: {int(np.sum(x != y))} values differ")
        for key in ("result", "areas", "rejected", "qc"):
            if not _same(_strip(aa.get(key)), _strip(ab.get(key))):
                diffs.append(f"{g}: attribute {key!r} differs: {json.dumps(_strip(aa.get(key)))[:300]} vs "
                             f"{json.dumps(_strip(ab.get(key)))[:300]}")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scan")
    s.add_argument("slides", type=Path)
    s.add_argument("bundle", type=Path)
    s.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "scan":
        return scan(args.slides, args.bundle, args.out)
    diffs = compare_triage(args.a, args.b) + compare_store(args.a, args.b)
    for d in diffs:
        print(d)
    from wsi_apl.store import slide_groups

    print(f"{len(diffs)} difference(s) between {args.a} and {args.b} ({len(slide_groups(args.a))} slide groups in "
          f"{args.a})")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
