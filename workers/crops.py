"""Cell crops at a fixed physical context, and per-cell morphometrics.

Crops are centred on each detected cell and cover ``crop_um`` µm whatever the cell's size, so the
classifier still sees how large a cell is. Cells near the area border are padded with white (glass),
not dropped.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from skimage.measure import regionprops
from torchvision.ops import roi_align

MORPHOMETRICS = ("diameter_um", "area_um2", "eccentricity", "intensity", "contrast", "nc_ratio")


def cell_centres(boxes: np.ndarray, image_shape: tuple, cell_shape: tuple | None = None) -> tuple[np.ndarray, float]:
    """Centres (n, 2) of ``boxes`` (n, 4; pixels of an image of ``image_shape``) in the pixels of the
    image the crops are cut from (``cell_shape``: the area's finer second read; default the same
    image), and how many of those pixels one image pixel is."""
    cell_shape = image_shape if cell_shape is None else cell_shape
    scale = np.array([cell_shape[1] / image_shape[1], cell_shape[0] / image_shape[0]], np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1) * scale
    return centres.astype(np.float32), float(scale.mean())


def pixels(image: np.ndarray) -> torch.Tensor:
    """(h, w, 3) uint8 array -> (3, h, w) uint8 tensor sharing its memory where it can (a copy of a
    read-only or non-contiguous array, such as PIL's, which torch must not write through)."""
    arr = image if image.flags.writeable and image.flags.c_contiguous else np.array(image, order="C")
    return torch.from_numpy(arr).permute(2, 0, 1)


def extract_crops(image: np.ndarray, centres: np.ndarray, context_px: float, out_px: int) -> np.ndarray:
    """Square crops of side ``context_px`` (area pixels) around ``centres`` (n, 2) resampled to ``out_px``.

    Bilinear with adaptive sampling (an average over the source pixels each output pixel covers),
    so downsampled crops are antialiased. Returns (n, out_px, out_px, 3) uint8.
    """
    if len(centres) == 0:
        return np.zeros((0, out_px, out_px, 3), np.uint8)
    with torch.inference_mode():
        return crops_on_device(pixels(image), centres, context_px, out_px).permute(0, 2, 3, 1).to(torch.uint8).numpy()


def crops_on_device(image: torch.Tensor, centres: np.ndarray, context_px: float, out_px: int) -> torch.Tensor:
    """:func:`extract_crops` where ``image`` (3, h, w; uint8 or 0-255 floats) already lies: on a GPU
    the crops never leave it. Returns (n, 3, out_px, out_px) floats holding whole values 0-255 (the
    uint8 crops :func:`extract_crops` returns); outside the image is white (glass), not dropped."""
    n = len(centres)
    if n == 0:
        return torch.zeros((0, 3, out_px, out_px), device=image.device)
    pad = int(math.ceil(context_px / 2)) + 2
    x = torch.nn.functional.pad(image.float().unsqueeze(0), (pad, pad, pad, pad), value=255.0)
    half = context_px / 2.0
    c = torch.as_tensor(np.asarray(centres, np.float32), device=image.device) + pad
    boxes = torch.cat([torch.zeros(n, 1, device=image.device), c[:, :1] - half, c[:, 1:] - half,
                       c[:, :1] + half, c[:, 1:] + half], 1)
    out = roi_align(x, boxes, output_size=(out_px, out_px), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.clamp_(0, 255).round_()


def morphometrics(crops: np.ndarray, crop_mpp: float, box_sizes_um: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-cell shape and stain measures from crops centred on the cells.

    The cell is the stained component under the crop centre (optical density of the three channels
    above 0.15); its nucleus the part dark in the red channel. Returns arrays (n,) for
    equivalent diameter (µm), area (µm²), eccentricity, mean grey intensity (0-255), grey contrast
    (standard deviation) and the nucleus-to-cell area ratio.
    """
    n = len(crops)
    out = {k: np.full(n, np.nan, np.float32) for k in MORPHOMETRICS}
    if n == 0:
        return out
    f = crops.astype(np.float32)
    od = -np.log10(np.clip((f + 1.0) / 256.0, 1e-3, 1.0))
    od_sum = od.sum(axis=3)
    grey = f.mean(axis=3)
    h, w = crops.shape[1:3]
    cy, cx = h // 2, w // 2
    px_area = crop_mpp * crop_mpp
    for i in range(n):
        mask = od_sum[i] > 0.15
        mask = ndimage.binary_opening(mask)
        lab, k = ndimage.label(mask)
        if k == 0:
            continue
        lid = lab[cy, cx]
        if lid == 0:
            # the centre pixel is pale (central pallor, nucleolus): take the nearest component
            d = ndimage.distance_transform_edt(lab == 0, return_indices=True)[1]
            lid = lab[d[0][cy, cx], d[1][cy, cx]]
        comp = lab == lid
        props = regionprops(comp.astype(np.uint8))[0]
        area = float(props.area) * px_area
        out["area_um2"][i] = area
        out["diameter_um"][i] = 2.0 * math.sqrt(area / math.pi)
        out["eccentricity"][i] = float(props.eccentricity)
        vals = grey[i][comp]
        out["intensity"][i] = float(vals.mean())
        out["contrast"][i] = float(vals.std())
        nuc = comp & (od[i, ..., 0] > max(0.22, 0.35 * float(od[i, ..., 0][comp].max())))
        out["nc_ratio"][i] = float(nuc.sum()) / max(1.0, float(comp.sum()))
    return out
