"""Batch scanning throughput: areas per second and slides per hour with 1 and 2 workers of the
embedded LocalCluster, where the time goes, and what the client sends to the workers.

    python benchmarks/bench_scan.py --bundle demo_out/bundle
    python benchmarks/bench_scan.py --bundle demo_out/bundle --slides 8 --size 12000x9000 --workers 1,2
    python benchmarks/bench_scan.py --bundle demo_out/bundle --torch-threads 1 --no-report   # worker scaling

The slides are synthetic smears (one per diagnosis, cycling) at 0.25 µm/px, written once into a
cache folder; each run scans them into a fresh results folder through the real scan (selection
and area tasks on the workers, zarr, ledger, triage). The time shares are worker seconds (reading
pixels, detecting, classifying, measuring the cells, choosing the areas) and client seconds
(aggregating and writing the zarr group), as parts of their sum. "Bytes to workers per area" is the
pickled size of every task's arguments, divided by the areas: the client ships paths and boxes,
never pixels.

Two questions, two settings. *Throughput of a scan as a lab runs it*: the defaults (each worker's
torch threads share the cores; the expert-review report and its occlusion maps are written by the
client as the scan goes and at its end). *Scaling with workers*: ``--torch-threads 1 --no-report``,
every worker with one core, the client's report left out, so N workers have N times the means of one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _slides(n: int, size: tuple[int, int], seed: int) -> Path:
    folder = Path(tempfile.gettempdir()) / f"wsi-apl-bench-scan-{n}-{size[0]}x{size[1]}-{seed}"
    if not any(folder.glob("*.tiff")):
        from wsi_apl.synth.cohort import DIAGNOSES, synth_cohort

        synth_cohort(folder, [DIAGNOSES[i % len(DIAGNOSES)] for i in range(n)], seed=seed, mpp=0.25, size=size)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("demo_out/bundle"))
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", default="8000x6000", help="slide size in level-0 pixels at 0.25 µm/px")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, one run each")
    ap.add_argument("--max-areas", type=int, default=6)
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--no-report", action="store_true", help="leave out the expert-review report and occlusion maps")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    folder = _slides(args.slides, (w, h), args.seed)

    from wsi_apl.scan import ScanOptions, scan

    rows = []
    for n in (int(v) for v in args.workers.split(",")):
        out = Path(tempfile.mkdtemp(prefix=f"bench-scan-{n}w-"))
        opts = ScanOptions(slides=folder, out=out, bundle=args.bundle, allow_synthetic=True, workers=n,
                           max_areas=args.max_areas, target_cells=0, torch_threads=args.torch_threads,
                           report=not args.no_report, occlusion_cells=0 if args.no_report else 2)
        t0 = time.time()
        s = scan(opts, log=lambda _m: None)
        el = time.time() - t0
        stages = s["stage_seconds"]
        total = sum(stages.values()) or 1.0
        rows.append((n, s, el, {k: v / total for k, v in stages.items()}))
        print(f"{n} worker(s) x {args.torch_threads or 'cores/workers'} torch thread(s), report "
              f"{'off' if args.no_report else 'on'}: {s['areas']} areas, {s['cells']} cells, {args.slides} slides "
              f"in {el:.1f} s "
              f"(cluster start included) -> {s['areas'] / el:.2f} areas/s, {3600 * args.slides / el:.0f} slides/h, "
              f"{s['cells'] / el:.0f} cells/s; statuses {s['counts']}")
        print(f"   without starting and stopping the cluster: {s['analysis_seconds']:.1f} s -> "
              f"{s['areas'] / max(1e-6, s['analysis_seconds']):.2f} areas/s")
        print("   time shares: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(rows[-1][3].items(),
                                                                                      key=lambda kv: -kv[1])))
        print(f"   bytes to workers: {s['bytes_to_workers']} in {s['area_tasks']} area tasks + {args.slides} "
              f"selections = {s['bytes_to_workers'] / max(1, s['area_tasks'] + args.slides):.0f} bytes per task "
              "(paths, boxes, ids; no pixels)")
    if len(rows) == 2:
        (n1, s1, e1, _), (n2, s2, e2, _) = rows
        print(f"speed-up {n2} vs {n1} worker(s): {e1 / e2:.2f}x with the cluster's start, "
              f"{s1['analysis_seconds'] / max(1e-6, s2['analysis_seconds']):.2f}x without")


if __name__ == "__main__":
    main()
