"""Cell detector speed: areas per second and peak memory for both backbones at 2560x1920.

    python benchmarks/bench_detector.py                      # both backbones, 3 areas each, this CPU
    python benchmarks/bench_detector.py --bundle DIR         # a trained bundle's detector instead

Each backbone runs in its own process (so the peak resident memory is its own), on one synthetic
2560x1920 area picture at the bundle's working resolution (the model sees it pixel for pixel,
nothing is downscaled) with up to 1000 detections. Untrained weights give the same compute as
trained ones except for the number of boxes surviving the score threshold; a trained bundle
(``--bundle``) measures the real thing. Prints seconds per area, areas per second, detections and
peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one(backbone: str, n: int, size: tuple[int, int], bundle: str | None, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from workers.detector import DetectorConfig, build_detector, detect

    if bundle:
        from workers.area import load_detector

        model, cfg, _ = load_detector(bundle, device="cpu")
        backbone = cfg.backbone
    else:
        cfg = DetectorConfig(backbone=backbone, mpp=0.125)
        torch.manual_seed(0)
        model = build_detector(cfg).eval()
    img = area_picture(size, cfg.mpp if cfg.mpp_known else 0.125)
    detect(model, img[:256, :256], cfg, "cpu", score_threshold=0.05)  # warm-up
    times, counts = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        boxes, _, _ = detect(model, img, cfg, "cpu", score_threshold=0.05)
        times.append(time.perf_counter() - t0)
        counts.append(len(boxes))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"backbone": backbone, "size": list(size), "threads": threads, "seconds_per_area": float(np.median(times)),
            "areas_per_second": 1.0 / float(np.median(times)), "detections": int(np.median(counts)),
            "peak_rss_mb": round(peak, 1)}


def area_picture(size: tuple[int, int], mpp: float):
    """A 2560x1920 marrow picture from the synthetic generator (rendered once, cached in /tmp)."""
    import tempfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    cache = Path(tempfile.gettempdir()) / f"wsi-apl-bench-area-{size[0]}x{size[1]}-{mpp}.png"
    if not cache.exists():
        from wsi_apl.synth.cohort import parse_diagnoses, synth_cohort

        out = Path(tempfile.mkdtemp())
        synth_cohort(out, parse_diagnoses("apl:1"), seed=3, mpp=mpp, size=size, plain=True)
        Image.open(next(out.glob("*.png"))).convert("RGB").save(cache)
    return np.asarray(Image.open(cache).convert("RGB"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="mobilenet_v3,resnet50_fpn_v2")
    ap.add_argument("--areas", type=int, default=3)
    ap.add_argument("--size", default="2560x1920")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    if args.one:
        print(json.dumps(one(args.one, args.areas, size, args.bundle, args.threads)))
        return
    backbones = ["bundle"] if args.bundle else args.backbones.split(",")
    print(f"{'backbone':18s} {'area':>10s} {'threads':>7s} {'s/area':>8s} {'areas/s':>8s} {'boxes':>6s} {'peak MB':>8s}")
    for b in backbones:
        cmd = [sys.executable, __file__, "--one", b, "--areas", str(args.areas), "--size", args.size,
               "--threads", str(args.threads)] + (["--bundle", args.bundle] if args.bundle else [])
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{r['backbone']:18s} {'x'.join(map(str, r['size'])):>10s} {r['threads']:7d} {r['seconds_per_area']:8.2f} "
              f"{r['areas_per_second']:8.3f} {r['detections']:6d} {r['peak_rss_mb']:8.0f}", flush=True)


if __name__ == "__main__":
    main()
