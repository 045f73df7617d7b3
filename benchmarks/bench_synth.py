"""Synthetic slide generator: seconds per slide and peak memory.

    python benchmarks/bench_synth.py                 # 20000x15000 px at 0.125 µm/px (the issue's figure)
    python benchmarks/bench_synth.py --size 100000x80000 --slides 1   # the selector benchmark's big slide

Prints one line per slide (seconds, megapixels per second, nucleated cells) and the peak resident
memory of the process (bounded: the slide is rendered band by band and written tile by tile; the
second pyramid level is kept in a memmap on disk when large).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="20000x15000")
    ap.add_argument("--mpp", type=float, default=0.125)
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--out", default=None, help="keep the slides here (default: a temporary folder)")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    from wsi_apl.synth.cohort import DIAGNOSES, synth_cohort

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-synth-"))
    try:
        times = []
        for i in range(args.slides):
            t0 = time.perf_counter()
            rec = synth_cohort(out, [DIAGNOSES[i % 4]], seed=args.seed + i, mpp=args.mpp, size=(w, h))[0]
            dt = time.perf_counter() - t0
            times.append(dt)
            import json

            n = len(json.loads((out / rec.truth).read_text())["cells"])
            size_mb = (out / rec.path).stat().st_size / 1e6
            print(f"{rec.slide}: {w}x{h} px at {args.mpp} µm/px, {dt:.1f} s, {w * h / 1e6 / dt:.1f} MP/s, "
                  f"{n} nucleated cells, {size_mb:.0f} MB file")
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"mean {sum(times) / len(times):.1f} s per slide of {w}x{h} px; peak resident memory {peak_mb:.0f} MB")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
