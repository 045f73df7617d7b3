"""Throughput of the area analysis at full resolution on one device, against the paper's per-cell way.

    python benchmarks/gpu_bench.py                       # a CUDA GPU, about 5-8 minutes
    python benchmarks/gpu_bench.py --device cpu --quick  # the same code on a CPU, about a minute

Prints one JSON object. What it measures (the paper took 45.3 s per 2560x1920 image: 5 s loading,
4.4 s FRCNN, 0.2 s per cell for the classifiers, 2.1 s for the slide nets):

- ``steady``: areas/s, per-area latency (p50, p95) and cells/s through :mod:`workers.engine`, for
  1 and 4 areas per forward pass (``--batches``), with the next areas read from the slide file by a reader pool
  while the device works; the stage profile (seconds per area) of each;
- ``classify``: crops/s of the classifier alone (Xception heads and the small heads), with and
  without ``torch.compile`` where ``--compile`` asks for it;
- ``slide``: a whole slide, the selection on the slide file plus 12 areas, in seconds, and slides/hour;
- ``paper_way``: the same area the paper's way, in the same run: the image shrunk for the FRCNN
  (torchvision's default resize to 800 px), then one Xception network per head, one cell at a time,
  float32; its seconds per area and the ratio to the batched path;
- ``peak_memory_gib`` on a GPU.

The models are built with untrained weights (the timing does not depend on them; no weights are
downloaded): ResNet-50-FPN v2 detector, Xception (299x299) and small (128x128) cell heads. An
untrained detector's scores say nothing, so its best ``--cells-per-area`` boxes per area stand in
for the cells (``EngineOptions.max_cells``; the synthetic truth's count in the areas read is printed
next to it); the detector still computes every proposal and detection it would for a real area. The slide is a
synthetic smear rendered once into a cache folder at 0.25 µm/px; the areas are 2560x1920 px at the
slide's own 0.25 µm/px (640x480 µm), the crops cut from the same pixels.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from workers.area import LoadedModels  # noqa: E402
from workers.classifier import CellClassifier, CellConfig, probabilities  # noqa: E402
from workers.crops import crops_on_device  # noqa: E402
from workers.detector import DetectorConfig, build_detector  # noqa: E402
from workers.engine import EngineOptions, analyse_images, synchronize  # noqa: E402


def _slide(size: tuple[int, int], seed: int) -> Path:
    folder = Path(tempfile.gettempdir()) / f"wsi-apl-gpu-bench-{size[0]}x{size[1]}-{seed}"
    found = sorted(folder.glob("*.tiff"))
    if not found:
        from wsi_apl.synth.cohort import synth_cohort

        synth_cohort(folder, ["apl"], seed=seed, mpp=0.25, size=size)
        found = sorted(folder.glob("*.tiff"))
    return found[0]


def _models(args, dev: torch.device, backbone: str, cells: str) -> LoadedModels:
    torch.manual_seed(0)
    det_cfg = DetectorConfig(backbone=backbone, mpp=args.mpp, fpn_channels=256 if backbone != "mobilenet_v3" else 64,
                             representation=1024 if backbone != "mobilenet_v3" else 256,
                             score_threshold=0.0, max_detections=args.cells_per_area)
    det = build_detector(det_cfg).to(dev).eval()
    cell_cfg = CellConfig(backbone=cells)
    cls = CellClassifier(cell_cfg).to(dev).eval()
    return LoadedModels(SimpleNamespace(mpp=args.mpp), det, det_cfg, cls, cell_cfg, dev)


def _boxes(slide, n: int, area_l0: tuple[int, int], rng) -> list[tuple[int, int, int, int]]:
    """``n`` area boxes inside the slide (the steady state reads anywhere; the whole slide reads the
    selection's areas)."""
    w, h = slide.dimensions
    out = []
    for _ in range(n):
        x = int(rng.integers(0, max(1, w - area_l0[0])))
        y = int(rng.integers(0, max(1, h - area_l0[1])))
        out.append((x, y, x + area_l0[0], y + area_l0[1]))
    return out


def _run_areas(slide, boxes, size, models, per_batch: int, readers: int, opts: EngineOptions) -> dict:
    """Analyse ``boxes`` in batches of ``per_batch`` with the next batch read meanwhile."""
    batches = [boxes[i:i + per_batch] for i in range(0, len(boxes), per_batch)]
    lat, cells, prof = [], 0, {}
    with ThreadPoolExecutor(1) as ahead, ThreadPoolExecutor(max(1, readers)) as pool:
        def read(batch):
            return list(pool.map(lambda b: slide.read_area(b, size).image, batch))

        nxt = ahead.submit(read, batches[0])
        t_start = time.perf_counter()
        for k in range(len(batches)):
            t0 = time.perf_counter()
            imgs = nxt.result()
            wait = time.perf_counter() - t0
            if k + 1 < len(batches):
                nxt = ahead.submit(read, batches[k + 1])  # read while the device works on this batch
            found, t = analyse_images(imgs, models, opts=opts)
            synchronize(models.device)
            t["read_wait"] = wait
            for s, v in t.items():
                prof[s] = prof.get(s, 0.0) + v
            lat += [time.perf_counter() - t0] * len(imgs)
            cells += sum(len(f.boxes) for f in found)
        el = time.perf_counter() - t_start
    n = len(boxes)
    return {"areas": n, "seconds": round(el, 3), "areas_per_s": round(n / el, 3), "cells_per_s": round(cells / el, 1),
            "cells_per_area": round(cells / n, 1),
            "latency_p50_s": round(statistics.median(lat), 4), "latency_p95_s": round(float(np.percentile(lat, 95)), 4),
            "profile_s_per_area": {s: round(v / n, 4) for s, v in prof.items()}}


@torch.inference_mode()
def _classify_rate(models: LoadedModels, n: int, batch: int, compile_: bool) -> dict:
    """Crops per second of the heads alone, on crops already on the device."""
    p = models.cell_cfg.crop_px
    crops = torch.randint(0, 256, (n, 3, p, p), device=models.device).float()

    def scaled(i: int, j: int) -> torch.Tensor:
        return crops[i:j] / 255.0

    out = {}
    dev = models.device
    variants = [("eager", models.cells)]
    if compile_:
        try:
            variants.append(("compiled", torch.compile(models.cells)))
        except Exception as exc:  # noqa: BLE001 - report why, keep measuring
            out["compile_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for name, heads in variants:
        try:
            probabilities(heads, batch, scaled, dev, batch)  # warm-up (and compilation)
            synchronize(dev)
            t = time.perf_counter()
            probabilities(heads, n, scaled, dev, batch)
            synchronize(dev)
            out[f"{name}_crops_per_s"] = round(n / (time.perf_counter() - t), 1)
        except Exception as exc:  # noqa: BLE001
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


@torch.inference_mode()
def _paper_way(image: np.ndarray, dev: torch.device, args, n_cells: int, measured: int) -> dict:
    """The paper's way on one area: FRCNN on the image shrunk by torchvision's default transform,
    then one Xception network per head, one 299x299 crop at a time, float32."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

    torch.manual_seed(0)
    det = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=2).to(dev).eval()
    nets = {h: CellClassifier(CellConfig(backbone="xception", heads=(h,))).to(dev).eval()
            for h in ("myeloblast", "promyelocyte", "auer_rod")}
    x = torch.from_numpy(image).to(dev).permute(2, 0, 1).float() / 255.0
    det([x])  # warm-up
    synchronize(dev)
    t = time.perf_counter()
    det([x])
    synchronize(dev)
    t_det = time.perf_counter() - t
    rng = np.random.default_rng(0)
    h, w = image.shape[:2]
    centres = np.stack([rng.uniform(0, w, measured), rng.uniform(0, h, measured)], 1).astype(np.float32)
    src = torch.from_numpy(image).to(dev).permute(2, 0, 1)
    ctx = 32.0 / args.mpp
    for net in nets.values():  # warm-up
        net(crops_on_device(src, centres[:1], ctx, 299) / 255.0)
    synchronize(dev)
    t = time.perf_counter()
    for c in centres:
        crop = crops_on_device(src, c[None], ctx, 299) / 255.0
        for net in nets.values():
            torch.sigmoid(net(crop)).cpu()
    synchronize(dev)
    per_cell = (time.perf_counter() - t) / measured
    return {"detect_s": round(t_det, 3), "classify_s_per_cell": round(per_cell, 4), "cells_timed": measured,
            "seconds_per_area": round(t_det + per_cell * n_cells, 2),
            "note": "FRCNN on the image shrunk to 800 px (torchvision default); 3 Xception nets, batch 1, float32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small areas and models: a check that it runs (CPU, CI)")
    ap.add_argument("--areas", type=int, default=24, help="areas per steady-state run")
    ap.add_argument("--batches", default="1,4", help="areas per forward pass, one run each")
    ap.add_argument("--cells-per-area", type=int, default=500)
    ap.add_argument("--readers", type=int, default=4, help="reader threads (prefetch)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the heads")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here; run with --device cpu --quick")
    args.mpp = 0.25
    if args.quick:
        size, slide_px, backbone, args.areas = (512, 384), (4000, 3000), "mobilenet_v3", min(args.areas, 4)
        args.cells_per_area = min(args.cells_per_area, 8)
        batches, n_classify, paper_cells = [1, 2], 8, 2
    else:
        size, slide_px, backbone = (2560, 1920), (24000, 18000), "resnet50_fpn_v2"
        batches, n_classify, paper_cells = [int(v) for v in args.batches.split(",")], 4096, 64
    t_all = time.perf_counter()
    path = _slide(slide_px, args.seed)
    from tile_selector.select import SelectorConfig, select_areas
    from tile_selector.slide import open_slide

    slide = open_slide(path)
    area_l0 = (int(size[0] * args.mpp / slide.mpp), int(size[1] * args.mpp / slide.mpp))
    out: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "quick": args.quick, "area_px": list(size), "area_mpp": args.mpp,
                 "detector": backbone, "cells_per_area": args.cells_per_area}
    t = time.perf_counter()
    models = {"xception": _models(args, dev, backbone, "xception"), "small": _models(args, dev, backbone, "small")}
    out["model_build_s"] = round(time.perf_counter() - t, 2)
    rng = np.random.default_rng(args.seed)
    # the morphometrics run on the host, per cell: on a GPU machine they get the host's threads
    import os

    opts = EngineOptions(measure_threads=min(8, os.cpu_count() or 1) if dev.type == "cuda" else 1,
                         max_cells=args.cells_per_area)
    warm = _boxes(slide, 2, area_l0, rng)
    for m in models.values():
        _run_areas(slide, warm, size, m, 1, args.readers, opts)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    out["steady"] = {}
    boxes = _boxes(slide, args.areas, area_l0, rng)
    for name, m in models.items():
        for b in batches:
            out["steady"][f"{name}_heads_{b}_per_batch"] = _run_areas(slide, boxes, size, m, b, args.readers, opts)
    out["classify"] = {name: _classify_rate(m, n_classify, 256 if dev.type == "cuda" else 4, args.compile)
                       for name, m in models.items()}
    t = time.perf_counter()
    sel = select_areas(slide, size, args.mpp, SelectorConfig(max_areas=12))
    t_sel = time.perf_counter() - t
    chosen = [a.box for a in sel.areas][:12]
    chosen += _boxes(slide, 12 - len(chosen), area_l0, rng)
    best = max(batches)
    whole = _run_areas(slide, chosen, size, models["xception"], best, args.readers, opts)
    out["slide"] = {"selection_s": round(t_sel, 2), "areas_selected": len(sel.areas), "areas_analysed": 12,
                    "areas_s": whole["seconds"], "seconds": round(t_sel + whole["seconds"], 2),
                    "slides_per_hour": round(3600 / (t_sel + whole["seconds"]), 1),
                    "note": "the selection's areas, completed to 12 with further positions where it chose fewer"}
    if dev.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
    img = slide.read_area(chosen[0], size).image
    paper = _paper_way(img, dev, args, args.cells_per_area, paper_cells)
    ours = out["steady"][f"xception_heads_{best}_per_batch"]["areas_per_s"]
    paper["ratio_batched_vs_paper"] = round(paper["seconds_per_area"] * ours, 1)
    out["paper_way"] = paper
    out["truth_cells_per_area"] = _truth_cells(path, chosen, slide.mpp)
    out["total_s"] = round(time.perf_counter() - t_all, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


def _truth_cells(path: Path, boxes, mpp: float) -> float | None:
    """Mean nucleated cells per area in the synthetic truth (what the stand-in box count models)."""
    truth = path.parent / "truth" / f"{path.stem}.json"
    if not truth.exists():
        return None
    cells = json.loads(truth.read_text()).get("cells", [])
    if not cells or "box" not in cells[0]:
        return None
    c = np.array([[(x["box"][0] + x["box"][2]) / 2, (x["box"][1] + x["box"][3]) / 2] for x in cells])
    n = [int(((c[:, 0] >= b[0]) & (c[:, 0] < b[2]) & (c[:, 1] >= b[1]) & (c[:, 1] < b[3])).sum()) for b in boxes]
    return round(float(np.mean(n)), 1)


if __name__ == "__main__":
    main()
