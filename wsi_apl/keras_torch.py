"""Keras weights into torch, and the check that both agree (the calling side of :mod:`wsi_apl.keras_import`).

:func:`copy_backbone` and :func:`copy_head` place the plain arrays that the child process exported
(:func:`wsi_apl.keras_graph.export_arrays`) into a :class:`workers.xception.Xception` and a
:class:`workers.classifier.Head`, turning Keras' layouts into torch's; :func:`check_equal` runs the
torch model on the :func:`check_images` that the child ran Keras on and says whether the outputs agree
within :data:`TOLERANCE_PROB` and :data:`TOLERANCE_LOGIT`. No TensorFlow or Keras here.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.classifier import CellClassifier
from workers.xception import SeparableConv2d, Xception, weighted_modules

from .keras_common import KerasImportError, child_array

TOLERANCE_PROB = 1e-4           # max |p_torch - p_keras| on the check images
TOLERANCE_LOGIT = 1e-4          # max |z_torch - z_keras| <= TOLERANCE_LOGIT * max(1, max |z_keras|)


def _copy(param: torch.Tensor, arr: np.ndarray, what: str, path) -> None:
    if tuple(param.shape) != tuple(arr.shape):
        raise KerasImportError(f"{path}: {what}: Keras weights of shape {tuple(arr.shape)} do not fit "
                               f"{tuple(param.shape)}; the backbone is not keras.applications.Xception")
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(arr)))


def copy_backbone(arrays: dict[str, np.ndarray], facts: dict, model: Xception, path="model") -> None:
    """Keras Xception weights -> torch: conv HWIO -> OIHW, depthwise (kh, kw, cin, 1) -> (cin, 1, kh, kw)."""
    for name, mod in weighted_modules(model):
        k, what = f"backbone.{name}.", facts["layers"].get(name, name)
        if isinstance(mod, SeparableConv2d):
            _copy(mod.depthwise.weight, child_array(arrays, k + "depthwise_kernel", path).transpose(2, 3, 0, 1),
                  what, path)
            _copy(mod.pointwise.weight, child_array(arrays, k + "pointwise_kernel", path).transpose(3, 2, 0, 1),
                  what, path)
        elif isinstance(mod, torch.nn.BatchNorm2d):
            _copy(mod.weight, child_array(arrays, k + "gamma", path), what, path)
            _copy(mod.bias, child_array(arrays, k + "beta", path), what, path)
            _copy(mod.running_mean, child_array(arrays, k + "moving_mean", path), what, path)
            _copy(mod.running_var, child_array(arrays, k + "moving_variance", path), what, path)
            mod.eps = float(facts["epsilon"][name])
        else:
            _copy(mod.weight, child_array(arrays, k + "kernel", path).transpose(3, 2, 0, 1), what, path)


def copy_head(arrays: dict[str, np.ndarray], facts: dict, head: torch.nn.Module, positive_class: int = 1,
              path="model") -> None:
    """Dense (in, out) -> Linear (out, in); a two-unit softmax output becomes ``z_pos - z_neg``."""
    linears = [head.net[i] for i in head.linear_indices()]
    for i, (d, lin) in enumerate(zip(facts["dense"], linears, strict=True)):
        w, b = child_array(arrays, f"head.{i}.kernel", path), child_array(arrays, f"head.{i}.bias", path)
        if lin is linears[-1] and d["units"] == 2:
            p, q = positive_class, 1 - positive_class
            w, b = (w[:, p] - w[:, q])[:, None], np.asarray([b[p] - b[q]], np.float32)
        _copy(lin.weight, w.T, d["name"], path)
        _copy(lin.bias, b, d["name"], path)


def check_images(n: int, px: int, seed: int = 0) -> np.ndarray:
    """``n`` varied (n, px, px, 3) uint8 images: coarse colour patterns of random contrast and brightness
    plus pixel noise (images that differ, so the check is not dominated by one saturated output)."""
    rng = np.random.default_rng(seed)
    cells = int(np.ceil(px / 8))
    out = np.empty((n, px, px, 3), np.uint8)
    for i in range(n):
        pattern = np.kron(rng.uniform(-127, 128, (8, 8, 3)), np.ones((cells, cells, 1)))[:px, :px]
        img = 128 + rng.uniform(-60, 60) + pattern * rng.uniform(0.2, 1.0) + rng.normal(0, rng.uniform(2, 50), (px, px, 3))
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def check_equal(torch_model: CellClassifier, images: np.ndarray, keras_prob: np.ndarray,
                keras_logit: np.ndarray) -> dict:
    """Run torch on the check ``images`` (n, px, px, 3 uint8) and compare with Keras' probabilities and
    logits of the finding on the same images (computed by the child); the max abs differences and
    whether they pass."""
    px = torch_model.cfg.crop_px
    n = int(images.shape[0])
    if images.shape[1:] != (px, px, 3) or keras_prob.shape != (n,) or keras_logit.shape != (n,):
        raise KerasImportError(f"check images {images.shape} / outputs {keras_prob.shape} do not fit {px} px crops")
    x255 = images.astype(np.float32)
    p_k, z_k = keras_prob.astype(np.float64), keras_logit.astype(np.float64)
    torch_model.eval()
    with torch.inference_mode():
        z_t = torch_model(torch.from_numpy(x255 / 255.0).permute(0, 3, 1, 2).float())[:, 0].double().numpy()
    p_t = 1.0 / (1.0 + np.exp(-z_t))
    d_prob = float(np.max(np.abs(p_t - p_k)))
    d_logit = float(np.max(np.abs(z_t - z_k)))
    logit_tol = TOLERANCE_LOGIT * max(1.0, float(np.max(np.abs(z_k))))
    return {"images": n, "px": px, "max_abs_diff_prob": d_prob, "max_abs_diff_logit": d_logit,
            "tolerance_prob": TOLERANCE_PROB, "tolerance_logit": logit_tol,
            "keras_prob_range": [float(p_k.min()), float(p_k.max())],
            "keras_logit_range": [float(z_k.min()), float(z_k.max())],
            "passed": bool(d_prob <= TOLERANCE_PROB and d_logit <= logit_tol)}
