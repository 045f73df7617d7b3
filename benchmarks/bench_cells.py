"""Cell classification speed: our way (one shared backbone, all heads, batched crops) against the
paper's way (one network per head, one cell at a time, PIL crops of the tight box).

    python benchmarks/bench_cells.py                       # Xception at 299x299, 24 cells, this CPU
    python benchmarks/bench_cells.py --backbone small --cells 200

Same backbone family, the same backbone weights in every network, float32, the same CPU and thread
count; each way runs in its own process, so its peak resident memory is its own. The cells are the
truth cells of a synthetic 2560x1920 picture at 0.5 µm/px. Prints cells per second of each way, the
ratio and the peak memory. Our way uses channels-last memory (as the workers do); the paper's way
runs in PyTorch's default layout unless ``--paper-channels-last``, which isolates what sharing the
backbone and batching gain.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADS = ("myeloblast", "promyelocyte", "auer_rod")


def _cells(n: int, mpp: float = 0.5):
    import numpy as np
    from PIL import Image

    cache = Path(tempfile.gettempdir()) / "wsi-apl-bench-cells"
    if not (cache / "labels.csv").exists():
        from wsi_apl.synth.cohort import parse_diagnoses, synth_cohort

        synth_cohort(cache, parse_diagnoses("apl:1"), seed=5, mpp=mpp, size=(2560, 1920), plain=True)
    truth = json.loads(next((cache / "truth").glob("*.json")).read_text())
    img = np.asarray(Image.open(cache / truth["file"]).convert("RGB"))
    boxes = np.array([c["box"] for c in truth["cells"] if c["type"] != "smudge"], np.float32)[:n]
    return img, boxes


def _models(backbone: str):
    import torch

    from workers.classifier import CellClassifier, CellConfig

    torch.manual_seed(0)
    ours = CellClassifier(CellConfig(backbone=backbone, heads=HEADS)).eval()
    singles = []
    for h in HEADS:  # the paper: one network per finding, here with the same backbone weights
        m = CellClassifier(CellConfig(backbone=backbone, heads=(h,))).eval()
        m.backbone.load_state_dict(ours.backbone.state_dict())
        m.heads[h].load_state_dict(ours.heads[h].state_dict())
        singles.append(m)
    return ours, singles


def run(way: str, backbone: str, n: int, threads: int, paper_channels_last: bool = False) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from workers.classifier import classify
    from workers.crops import cell_centres, extract_crops

    torch.set_num_threads(threads)
    img, boxes = _cells(n)
    ours, singles = _models(backbone)
    cfg = ours.cfg
    context_px = cfg.crop_um / 0.5
    centres, _ = cell_centres(boxes, img.shape)
    if way == "ours":
        classify(ours, extract_crops(img, centres[:2], context_px, cfg.crop_px))  # warm-up
        t0 = time.perf_counter()
        crops = extract_crops(img, centres, context_px, cfg.crop_px)
        probs = classify(ours, crops)
        dt = time.perf_counter() - t0
    else:
        pil = Image.fromarray(img)
        fmt = torch.channels_last if paper_channels_last else torch.contiguous_format
        for m in singles:
            m.to(memory_format=fmt)
        with torch.no_grad():
            for m in singles:  # warm-up
                m(torch.zeros(1, 3, cfg.crop_px, cfg.crop_px))
        t0 = time.perf_counter()
        probs = np.zeros((len(boxes), len(HEADS)), np.float32)
        for i, b in enumerate(boxes):
            crop = pil.crop(tuple(int(round(v)) for v in b)).resize((cfg.crop_px, cfg.crop_px))  # tight box, stretched
            x = torch.from_numpy(np.asarray(crop, np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
            x = x.contiguous(memory_format=fmt)
            with torch.no_grad():
                for j, m in enumerate(singles):
                    probs[i, j] = float(torch.sigmoid(m(x))[0, 0])
        dt = time.perf_counter() - t0
    return {"way": way, "backbone": backbone, "cells": int(len(boxes)), "crop_px": cfg.crop_px, "seconds": dt,
            "cells_per_second": len(boxes) / dt, "threads": threads, "finite": bool(np.isfinite(probs).all()),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="xception", choices=["xception", "small"])
    ap.add_argument("--cells", type=int, default=24)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--paper-channels-last", action="store_true",
                    help="give the paper's way channels-last memory too (what sharing and batching gain alone)")
    ap.add_argument("--way", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.way:
        print(json.dumps(run(args.way, args.backbone, args.cells, args.threads, args.paper_channels_last)))
        return
    res = {}
    for way in ("paper", "ours"):
        cmd = [sys.executable, __file__, "--way", way, "--backbone", args.backbone, "--cells", str(args.cells),
               "--threads", str(args.threads)] + (["--paper-channels-last"] if args.paper_channels_last else [])
        res[way] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        r = res[way]
        label = ("paper: one network per head, one cell at a time" if way == "paper"
                 else "ours: shared backbone, all heads, batched")
        print(f"{label:50s} {r['backbone']:9s} {r['crop_px']}px {r['cells']:4d} cells {r['seconds']:7.2f} s "
              f"{r['cells_per_second']:7.2f} cells/s  peak {r['peak_rss_mb']:.0f} MB", flush=True)
    print(f"speed-up: {res['ours']['cells_per_second'] / res['paper']['cells_per_second']:.1f}x "
          f"({args.threads} threads, float32)")


if __name__ == "__main__":
    main()
