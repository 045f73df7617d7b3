"""Focus of a synthetic slide: a slight whole-slide softness and out-of-focus patches.

:func:`draw_blur` lays the patches out over the smear; :func:`apply_blur` blurs a rendered
transmission region where the scene is out of focus, with box-filter Gaussians (:func:`gauss_box`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .smear import SmearGeometry


@dataclass
class BlurPatch:
    x: float       # µm, centre
    y: float
    rx: float      # µm, radii
    ry: float
    angle: float
    sigma: float   # µm, Gaussian blur at the centre

    def weight(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Blur weight in [0, 1] (1 inside, smooth fall-off over the outer 30 %)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = ((X - self.x) * c + (Y - self.y) * s) / self.rx
        v = (-(X - self.x) * s + (Y - self.y) * c) / self.ry
        r = np.sqrt(u * u + v * v)
        return np.clip((1.15 - r) / 0.3, 0.0, 1.0)


def draw_blur(rng: np.random.Generator, g: SmearGeometry, patches: tuple[int, int],
              blurred: bool) -> tuple[list[BlurPatch], float]:
    """Out-of-focus patches (between ``patches[0]`` and ``patches[1]`` of them) over the smear ``g``,
    and the whole-slide blur sigma (µm); a ``blurred`` slide is soft all over, without patches."""
    blur = []
    n_blur = int(rng.integers(patches[0], patches[1] + 1))
    for _ in range(n_blur):
        u = float(rng.uniform(0.1, 0.95)) * g.length
        v = float(rng.uniform(-0.6, 0.6)) * g.half_width
        c, s = math.cos(g.theta), math.sin(g.theta)
        r = float(rng.uniform(0.04, 0.14)) * g.length
        blur.append(BlurPatch(g.ox + u * c - v * s, g.oy + u * s + v * c, r, r * float(rng.uniform(0.5, 1.0)),
                              float(rng.uniform(0, math.pi)), float(rng.choice([1.2, 2.0, 3.0, 4.0]))))
    base_blur = float(rng.uniform(0.15, 0.3))  # an oil objective's softness (generator 1: 0.05-0.2 µm)
    if blurred:
        base_blur = float(rng.uniform(1.5, 3.0))
        blur = []
    return blur, base_blur


def blur_sigma(patches: list[BlurPatch], base_blur: float, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Blur sigma (µm) at µm positions: the largest of the slide's softness and every patch's
    ``sigma * weight``. The truth maps (:meth:`Scene.blur_at`) and the pixels (:func:`apply_blur`) both
    use it, so that they agree."""
    out = np.full(np.shape(X), base_blur, np.float32)
    for p in patches:
        out = np.maximum(out, p.sigma * p.weight(X, Y))
    return out


#: Extra blur (µm, on top of the whole-slide softness) at which a patch's image is computed; a pixel
#: between two of them is interpolated in variance between the two neighbouring images.
BLUR_LEVELS_UM = (0.0, 0.3, 0.6, 0.9, 1.2, 1.6, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)


def apply_blur(trans: np.ndarray, blur: list[BlurPatch], base_blur: float, mpp: float, ex0: int, ey0: int) -> None:
    """Blur ``trans`` in place where the scene is out of focus (box-filter Gaussians).

    ``trans`` is the level-0 pixel region whose top-left corner is ``(ex0, ey0)``. Each pixel ends
    blurred by the truth's sigma there (:func:`blur_sigma`: the largest of the slide's softness and
    every patch's ``sigma * weight``), as a defocus would: the image at the nearest two of
    :data:`BLUR_LEVELS_UM`, interpolated in variance. (Generator 2 blended the sharp image with the
    patch's full blur by the weight: at the patch's fall-off its pixels kept the edges of a 0.5-0.8-µm
    blur where its truth said 1-2 µm.)
    """
    h, w = trans.shape[:2]
    if base_blur / mpp >= 0.6:
        gauss_box(trans, base_blur / mpp)
    boxes = []
    for p in blur:
        if p.sigma <= base_blur:
            continue
        ext = max(p.rx, p.ry) * 1.2
        bx0, by0 = int((p.x - ext) / mpp) - ex0, int((p.y - ext) / mpp) - ey0
        bx1, by1 = int((p.x + ext) / mpp) - ex0 + 1, int((p.y + ext) / mpp) - ey0 + 1
        cx0, cy0, cx1, cy1 = max(0, bx0), max(0, by0), min(w, bx1), min(h, by1)
        if cx1 > cx0 and cy1 > cy0:
            boxes.append((p, cx0, cy0, cx1, cy1))
    if not boxes:
        return
    cx0, cy0 = min(b[1] for b in boxes), min(b[2] for b in boxes)
    cx1, cy1 = max(b[3] for b in boxes), max(b[4] for b in boxes)
    X, Y = np.meshgrid((np.arange(cx0, cx1) + ex0 + 0.5) * mpp, (np.arange(cy0, cy1) + ey0 + 0.5) * mpp)
    sigma = blur_sigma([b[0] for b in boxes], base_blur, X, Y).astype(np.float32)
    # the blur still to add to the slide's softness (variances add), in pixels
    extra = np.sqrt(np.maximum(sigma * sigma - base_blur * base_blur, 0.0)) / mpp
    top = float(extra.max())
    if top < 0.3:
        return
    levels = [0.0]
    for um in BLUR_LEVELS_UM[1:]:
        eff = box_sigma(um / mpp)
        if eff > levels[-1] + 0.25:
            levels.append(eff)
        if eff >= top:
            break
    pad = int(3 * levels[-1]) + 1
    rx0, ry0, rx1, ry1 = max(0, cx0 - pad), max(0, cy0 - pad), min(w, cx1 + pad), min(h, cy1 + pad)
    region = trans[ry0:ry1, rx0:rx1]
    inner = (slice(cy0 - ry0, cy1 - ry0), slice(cx0 - rx0, cx1 - rx0))
    out = trans[cy0:cy1, cx0:cx1].copy()
    lower = region[inner]
    for k in range(1, len(levels)):
        s0, s1 = levels[k - 1], levels[k]
        sel = (extra > s0) & ((extra <= s1) | (k == len(levels) - 1))
        upper_img = region.copy()
        gauss_box(upper_img, s1)
        upper = upper_img[inner]
        if sel.any():
            a = np.clip((extra[sel] ** 2 - s0 * s0) / (s1 * s1 - s0 * s0), 0.0, 1.0)[:, None]
            out[sel] = lower[sel] * (1.0 - a) + upper[sel] * a
        lower = upper
    trans[cy0:cy1, cx0:cx1] = out


def box_sigma(sigma_px: float) -> float:
    """The sigma (pixels) that :func:`gauss_box` delivers when asked for ``sigma_px``: three passes of an
    odd box width ``w`` give a variance of (w² - 1) / 4; wide blurs (the reduced path) are as asked."""
    if int(sigma_px // 3) >= 2:
        return float(sigma_px)
    width = 2 * int(round((math.sqrt(4.0 * sigma_px * sigma_px + 1.0) - 1.0) / 2.0)) + 1
    return math.sqrt((width * width - 1) / 4.0)


def gauss_box(img: np.ndarray, sigma_px: float) -> None:
    """Approximate a Gaussian blur of ``sigma_px`` in place with three box filters per axis.

    Wide blurs are computed on a copy reduced by an integer factor and enlarged back (bilinear):
    the result is smooth at that scale anyway, and the cost no longer grows with the blur.
    """
    f = int(sigma_px // 3)
    if f >= 2:
        h, w = img.shape[:2]
        hh, ww = (h + f - 1) // f, (w + f - 1) // f
        padded = np.pad(img, ((0, hh * f - h), (0, ww * f - w), (0, 0)), mode="edge")
        small = padded.reshape(hh, f, ww, f, img.shape[2]).mean(axis=(1, 3))
        gauss_box(small, math.sqrt(max(0.25, sigma_px * sigma_px - (f * f - 1) / 12.0)) / f)
        big = ndimage.zoom(small, (f, f, 1), order=1, grid_mode=True, mode="nearest")
        img[...] = big[:h, :w]
        return
    # three passes of an odd box width w give a variance of (w² - 1) / 4 (odd: no half-pixel shift)
    width = 2 * int(round((math.sqrt(4.0 * sigma_px * sigma_px + 1.0) - 1.0) / 2.0)) + 1
    if width <= 1:
        return
    for axis in (0, 1):
        for _ in range(3):
            ndimage.uniform_filter1d(img, width, axis=axis, output=img, mode="nearest")
