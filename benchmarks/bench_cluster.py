"""What bounds the scan past one machine: the scheduler's task rate, the bytes per task, and how fast
one worker reads and decodes area pixels from a slide file.

    python benchmarks/bench_cluster.py
    python benchmarks/bench_cluster.py --tasks 4000 --slide path/to/slide.svs --area 2560x1920 --mpp 0.25

- *Task rate*: ``--tasks`` trivial tasks through the embedded LocalCluster (TLS, as the scan starts
  it), submitted as the scan does (one keyed ``client.submit`` each, results collected with
  ``as_completed``): tasks per second end to end. The scan needs 1 selection plus 12 area tasks per
  slide, so the rate divided by 13 is the slides per second one scheduler can hand out.
- *Bytes per task*: the pickled arguments of a real area task (slide path, box, ids); no pixels.
- *Reading*: areas read from a slide file through :class:`tile_selector.slide.Slide` by one thread and
  by 4 threads: decoded megapixels/s and the compressed bytes/s they cost (the file's bytes per
  level-0 pixel times the pixels read), i.e. what one worker asks of a shared file system.

Prints one JSON object; the closing arithmetic (how many GPU workers one scheduler feeds) is left
to the reader of the figures, with the per-GPU area rate measured by ``gpu_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _noop(i: int) -> int:
    return i


def task_rate(n: int, workers: int) -> dict:
    from distributed import as_completed

    from cluster.client import start_cluster

    handle = start_cluster(n_workers=workers)
    try:
        client = handle.client
        client.submit(_noop, -1, key="warm").result()
        t = time.perf_counter()
        futs = [client.submit(_noop, i, key=f"noop-{i}", pure=False) for i in range(n)]
        for f in as_completed(futs):
            f.result()
        el = time.perf_counter() - t
    finally:
        handle.close()
    return {"tasks": n, "workers": workers, "seconds": round(el, 2), "tasks_per_s": round(n / el, 1),
            "slides_per_s_at_13_tasks": round(n / el / 13, 1)}


def read_rate(path: Path, area: tuple[int, int], mpp: float, n: int) -> dict:
    from tile_selector.slide import open_slide

    slide = open_slide(path)
    w, h = slide.dimensions
    l0 = (area[0] * mpp / slide.mpp, area[1] * mpp / slide.mpp)
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(n):
        x, y = rng.uniform(0, max(1.0, w - l0[0])), rng.uniform(0, max(1.0, h - l0[1]))
        boxes.append((x, y, x + l0[0], y + l0[1]))
    bytes_per_px = path.stat().st_size / float(w * h)  # all levels' bytes over level 0: an upper bound
    out = {"slide_px": [w, h], "slide_mpp": round(slide.mpp, 4), "area_px": list(area), "area_mpp": mpp,
           "file_bytes_per_level0_px": round(bytes_per_px, 3)}
    for threads in (1, 4):
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda b: slide.read_area(b, area), boxes))
        el = time.perf_counter() - t
        mpx = n * l0[0] * l0[1] / 1e6
        out[f"threads_{threads}"] = {"areas_per_s": round(n / el, 2), "decoded_mpx_per_s": round(mpx / el, 1),
                                     "file_mb_per_s": round(mpx * bytes_per_px / el, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slide", type=Path, default=None, help="default: a synthetic 12000x9000 slide at 0.25 µm/px")
    ap.add_argument("--area", default="2560x1920")
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--reads", type=int, default=24)
    args = ap.parse_args()
    slide = args.slide
    if slide is None:
        folder = Path(tempfile.gettempdir()) / "wsi-apl-bench-cluster-slide"
        if not any(folder.glob("*.tiff")):
            from wsi_apl.synth.cohort import synth_cohort

            synth_cohort(folder, ["healthy"], seed=3, mpp=0.25, size=(12000, 9000))
        slide = sorted(folder.glob("*.tiff"))[0]
    # an area task's arguments as batch.py submits them: path, level-0 box, index, bundle id, reader, mpp, size
    args_bytes = len(pickle.dumps((str(slide.resolve()), (1000.0, 2000.0, 11240.0, 9680.0), 7, "0123456789abcdef",
                                   "auto", None, (2560, 1920))))
    aw, ah = (int(v) for v in args.area.lower().split("x"))
    out = {"task_rate": task_rate(args.tasks, args.workers), "area_task_argument_bytes": args_bytes,
           "reading": read_rate(slide, (aw, ah), args.mpp, args.reads)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
