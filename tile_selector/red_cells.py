"""The pixel size of pictures that do not state one, estimated from the red cells they show.

A red cell in a dried, May-Grünwald-Giemsa-stained smear is about 7.5 µm across (``RED_CELL_UM``), so
the median diameter of the red cells in pixels gives µm per pixel. Single-cell pictures show red cells
mostly cut by the picture's border, so each red cell is measured by a circle fitted to the visible
part of its outline (RANSAC), not by its area:

1. optical density, three classes by multi-Otsu: glass, red cells and cytoplasm, nuclei;
2. the middle class, closed and hole-filled (central pallor), without components that touch a
   nucleus (a nucleated cell's cytoplasm is not a red cell);
3. per component, a circle fitted to its outline away from the picture's border; kept where the
   fit follows at least 40 % of the circumference, the component fills the circle and does not
   spill out of it (a disc, not a clump of red cells or a fragment).

The estimate is the most common diameter (:func:`diameter_mode`). It is as good as the red cells: read the spread it prints, and prefer a stage
micrometer when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Diameter of a normal red cell in a dried smear, µm.
RED_CELL_UM = 7.5


@dataclass
class PixelSizeEstimate:
    """Red cells measured on pictures, and the pixel size they imply."""

    mpp: float               # µm per pixel (red_cell_um / the most common diameter)
    mode_px: float           # the most common red-cell diameter, pixels (the estimate)
    median_px: float         # median red-cell diameter, pixels (pulled down by fragments and cut cells)
    quartiles_px: tuple[float, float]
    red_cells: int           # red cells measured
    pictures: int            # pictures with at least one measured red cell
    pictures_read: int
    red_cell_um: float = RED_CELL_UM

    def to_json(self) -> dict:
        return {"mpp": self.mpp, "mode_px": self.mode_px, "median_px": self.median_px, "quartiles_px": list(self.quartiles_px),
                "red_cells": self.red_cells, "pictures": self.pictures, "pictures_read": self.pictures_read,
                "red_cell_um": self.red_cell_um}


def red_cell_circles(image: np.ndarray, r_min: float = 8.0, r_max: float = 150.0,
                     seed: int = 0) -> list[tuple[float, float, float]]:
    """Circles ``(x, y, radius)`` in pixels fitted to the red cells of an RGB uint8 picture."""
    from skimage import filters, measure, morphology

    od = -np.log10(np.clip((image.astype(np.float32) + 1.0) / 256.0, 1e-3, 1.0)).sum(axis=2)
    od = ndimage.gaussian_filter(od, 1.0)
    try:
        t1, t2 = filters.threshold_multiotsu(od, classes=3)
    except ValueError:  # a flat picture
        return []
    fg = morphology.closing(od > t1, morphology.disk(3))
    fg = ndimage.binary_fill_holes(fg)
    fg = morphology.opening(fg, morphology.disk(2))
    near_nucleus = morphology.dilation(od > t2, morphology.disk(2))
    lab = measure.label(fg)
    h, w = fg.shape
    yy, xx = np.ogrid[:h, :w]
    rng = np.random.default_rng(seed)
    out = []
    for reg in measure.regionprops(lab):
        if reg.area < np.pi * r_min ** 2 * 0.5:
            continue
        comp = lab == reg.label
        if (near_nucleus & comp).any():
            continue
        contours = measure.find_contours(comp.astype(np.float32), 0.5)
        if not contours:
            continue
        c = max(contours, key=len)
        inner = (c[:, 0] > 2) & (c[:, 0] < h - 3) & (c[:, 1] > 2) & (c[:, 1] < w - 3)
        pts = c[inner][:, ::-1]  # (x, y)
        if len(pts) < 30:
            continue
        model, inliers = measure.ransac(pts, measure.CircleModel, min_samples=3, residual_threshold=1.5,
                                        max_trials=200, rng=rng)
        if model is None or inliers is None:
            continue
        (x, y), r = (float(v) for v in model.center), float(model.radius)
        if not r_min <= r <= r_max or inliers.mean() < 0.7 or inliers.sum() < 0.8 * np.pi * r:
            continue
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        inside = int(disc.sum())
        if inside == 0 or (comp & disc).sum() < 0.85 * inside or (comp & ~disc).sum() > 0.1 * inside:
            continue
        out.append((x, y, r))
    return out


def diameter_mode(d: np.ndarray) -> float:
    """The most common diameter: the peak of a Gaussian kernel density (bandwidth 5 % of the median).
    Fragments of red cells and cut outlines fit small circles; the mode is the intact red cells'."""
    d = np.asarray(d, np.float64)
    bw = max(1.0, 0.05 * float(np.median(d)))
    grid = np.arange(d.min(), d.max() + 0.25, 0.25)
    dens = np.exp(-0.5 * ((grid[:, None] - d[None, :]) / bw) ** 2).sum(axis=1)
    return float(grid[int(np.argmax(dens))])


def estimate_mpp(images, red_cell_um: float = RED_CELL_UM) -> PixelSizeEstimate:
    """The pixel size implied by the red cells of ``images`` (an iterable of RGB uint8 arrays).

    Raises ValueError when fewer than five red cells could be measured.
    """
    diameters, with_cells, n = [], 0, 0
    for img in images:
        n += 1
        circles = red_cell_circles(img)
        diameters += [2.0 * r for _, _, r in circles]
        with_cells += bool(circles)
    if len(diameters) < 5:
        raise ValueError(f"only {len(diameters)} red cells could be measured on {n} pictures: too few for a "
                         "pixel size (use a stage micrometer or the scanner's documentation)")
    d = np.asarray(diameters)
    med = float(np.median(d))
    q1, q3 = (float(v) for v in np.percentile(d, [25, 75]))
    mode = diameter_mode(d)
    return PixelSizeEstimate(mpp=float(red_cell_um / mode), mode_px=mode, median_px=med, quartiles_px=(q1, q3),
                             red_cells=len(d), pictures=with_cells, pictures_read=n, red_cell_um=red_cell_um)
