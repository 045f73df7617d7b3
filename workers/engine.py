"""Areas in, cells out, on one device: the batched path a GPU worker takes, and the CPU's.

:func:`analyse_images` takes one or several area images of the same size and runs the stages below,
each timed in ``timings`` (seconds, summed over the batch):

- ``upload``: the uint8 pixels go to the device once, from pinned host memory on a GPU (the copy
  overlaps the work already queued), and are converted to floats there;
- ``detect``: one Faster R-CNN forward pass over the whole batch (several areas at once where the
  card has room), bf16 autocast on CUDA;
- ``crop``: every cell's classifier crop and gallery crop cut by ``roi_align`` on the device from
  the image already there (:func:`workers.crops.crops_on_device`): no crop is cut on the host;
- ``classify``: all the batch's cells in chunks of ``cell_batch``, channels-last, bf16 on CUDA;
- ``download`` and ``measure``: the uint8 crops come back once, and the morphometrics run on the
  host (:func:`workers.crops.morphometrics`; a thread pool where ``measure_threads`` > 1).

On a CPU with one image this is exactly what the scan always did (same crops, same probabilities;
``tests/workers/test_engine.py`` checks it against the per-step functions). ``benchmarks/gpu_bench.py``
measures it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .classifier import classify, probabilities
from .crops import MORPHOMETRICS, cell_centres, crops_on_device, morphometrics, pixels
from .detector import detections, set_capacity

if TYPE_CHECKING:  # the models are loaded by workers.area, which runs this engine
    from .area import LoadedModels

#: Side of the small crops kept per cell for the report's galleries.
GALLERY_PX = 48


@dataclass
class ImageCells:
    """The cells of one area image: boxes in the image's pixels, and what the models said of each."""

    boxes: np.ndarray               # (n, 4) float32, image pixels
    scores: np.ndarray              # (n,) detector scores
    cut: np.ndarray                 # (n,) bool, touching the image border
    probs: dict[str, np.ndarray]    # head -> (n,) probability
    morph: dict[str, np.ndarray]    # morphometrics, (n,) each
    gallery: np.ndarray             # (n, GALLERY_PX, GALLERY_PX, 3) uint8 crops
    timings: dict[str, float]       # seconds per stage (this image's share of the batch's)


@dataclass
class EngineOptions:
    """How the stages run; the defaults are the scan's."""

    cell_batch: int = 256          # crops per classifier forward pass (on a CPU capped by CPU_BATCH_PIXELS)
    amp: bool = True               # bf16 autocast on CUDA (never on a CPU: it is slower there)
    measure_threads: int = 1       # host threads for the morphometrics
    measure: bool = True           # False: skip the morphometrics (NaN), e.g. to time the models alone
    max_cells: int = 0             # > 0: keep at most this many cells per area, best scores first (benchmarks)


def _to_device(images: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """(h, w, 3) uint8 arrays -> (3, h, w) uint8 tensors on ``device`` (pinned, non-blocking on CUDA)."""
    if device.type != "cuda":
        return [pixels(im) for im in images]
    return [pixels(im).pin_memory().to(device, non_blocking=True) for im in images]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA GPU; nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_host(crops: torch.Tensor) -> np.ndarray:
    """(n, 3, p, p) whole-valued floats on the device -> (n, p, p, 3) uint8 on the host."""
    return crops.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def analyse_images(images: list[np.ndarray], models: "LoadedModels", cell_images: list[np.ndarray] | None = None,
                   opts: EngineOptions | None = None) -> tuple[list[ImageCells], dict[str, float]]:
    """Detect, crop, classify and measure the cells of several area images (same size, bundle mpp).

    ``cell_images``: the same areas at the cells' finer pixel size (:func:`workers.area.cell_read`),
    which the crops are cut from; default: ``images``. Returns one :class:`ImageCells` per image and
    the batch's stage timings.
    """
    # channels-last weights (outside inference mode, so the weights stay trainable): the heads always
    # (as classify does), the detector's backbone on a GPU, where cuDNN's NHWC kernels are faster
    models.cells.to(memory_format=torch.channels_last)
    if models.device.type == "cuda":
        models.detector.backbone.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return _analyse(images, models, cell_images, opts or EngineOptions())


def _analyse(images: list[np.ndarray], models: "LoadedModels", cell_images: list[np.ndarray] | None,
             opts: EngineOptions) -> tuple[list[ImageCells], dict[str, float]]:
    dev, cfg, det_cfg = models.device, models.cell_cfg, models.det_cfg
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    xs = _to_device(images, dev)
    srcs = xs if cell_images is None else _to_device(cell_images, dev)
    synchronize(dev)
    t["upload"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = models.detector
    model.eval()
    set_capacity(model, det_cfg, images[0].shape[:2])
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=opts.amp and dev.type == "cuda"):
        outs = model([x.float().div_(255.0) for x in xs])
    found = [detections(o, im.shape, det_cfg, limit=opts.max_cells) for im, o in zip(images, outs)]
    t["detect"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    crops, gallery = [], []
    for im, src, (boxes, _, _) in zip(images, srcs, found):
        centres, scale = cell_centres(boxes, im.shape, tuple(src.shape[1:]) + (3,))
        context_px = cfg.crop_um / models.bundle.mpp * scale
        crops.append(crops_on_device(src, centres, context_px, cfg.crop_px))
        gallery.append(crops_on_device(src, centres, context_px, GALLERY_PX))
    every = torch.cat(crops) if crops else torch.zeros((0, 3, cfg.crop_px, cfg.crop_px), device=dev)
    synchronize(dev)
    t["crop"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    host_crops = None
    if cfg.stain_norm != "none":  # the normaliser works on host uint8 crops
        host_crops = _to_host(every)
        probs = classify(models.cells, host_crops, dev, opts.cell_batch)
    else:
        probs = probabilities(models.cells, len(every), lambda i, j: every[i:j] / 255.0, dev, opts.cell_batch,
                              opts.amp)
    t["classify"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if host_crops is None:
        host_crops = _to_host(every)
    host_gallery = [_to_host(g) for g in gallery]
    t["download"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    counts = [len(f[0]) for f in found]
    parts = np.split(host_crops, np.cumsum(counts)[:-1]) if counts else []
    if not opts.measure:
        morphs = [{k: np.full(len(c), np.nan, np.float32) for k in MORPHOMETRICS} for c in parts]
    elif opts.measure_threads > 1 and len(host_crops) > 1:
        # morphometrics is a per-cell loop in scipy/skimage: chunks of it run in threads
        chunks = [np.array_split(c, opts.measure_threads) for c in parts]
        with ThreadPoolExecutor(opts.measure_threads) as pool:
            done = [list(pool.map(lambda c: morphometrics(c, cfg.crop_mpp), ch)) for ch in chunks]
        morphs = [{k: np.concatenate([d[k] for d in ds]) for k in ds[0]} for ds in done]
    else:
        morphs = [morphometrics(c, cfg.crop_mpp) for c in parts]
    t["measure"] = time.perf_counter() - t0

    result, k = [], 0
    share = 1.0 / max(1, len(images))
    for (boxes, scores, cut), morph, gal in zip(found, morphs, host_gallery):
        n = len(boxes)
        p = probs[k:k + n]
        k += n
        result.append(ImageCells(boxes, scores, cut, {h: p[:, i] for i, h in enumerate(cfg.heads)}, morph, gal,
                                 {s: v * share for s, v in t.items()}))
    return result, t
