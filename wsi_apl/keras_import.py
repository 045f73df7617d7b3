"""Import Keras Xception cell classifiers into a bundle's ``cells`` part (``wsi-apl bundle import-keras``).

The 2022 paper's cell models are Keras ``Xception`` backbones with a dense head, one binary network
per finding. :func:`import_keras` reads one such network (``.keras`` or legacy ``.h5``) in a child
process, copies its weights into the torch :class:`workers.xception.Xception` and a
:class:`workers.classifier.Head`, checks on random images that Keras and torch agree, and adds the
network to a bundle as one more separate backbone + head (``CellConfig(backbone="xception",
separate=True)``). Importing three networks (say myeloblast, promyelocyte, auer_rod) into one
directory gives the paper's three networks; the workers then run them with torch only, no TensorFlow.

What is understood:

* the backbone: Keras' ``Xception`` layers (by their names ``block1_conv1`` ... ``block14_sepconv2_bn``;
  the four unnamed 1x1 residual convolutions and batch norms by their channel counts), nested as a
  model (``Xception(include_top=False)`` used as a layer) or flat (built with ``input_tensor``);
* then ``GlobalAveragePooling2D`` (Xception's ``pooling="avg"`` or a layer of its own) and a dense
  stack: ``Dense(k, relu)`` any number of times (``Dropout`` anywhere, inactive at inference), then
  ``Dense(1, sigmoid)`` or ``Dense(2, softmax)``; the latter becomes one logit ``z_pos - z_neg``
  (softmax over two classes is the sigmoid of the difference), ``positive_class`` says which index
  is the finding (Keras' directory loaders number classes alphabetically);
* input preprocessing: ``Rescaling`` layers before the backbone are folded into the torch model's
  normalisation; without them the model is assumed to take Keras' ``xception.preprocess_input``
  (``x / 127.5 - 1``), i.e. ``image_mean = image_std = 0.5`` on [0, 1] pixels.

Geometry: a new bundle works at ``mpp`` (default 0.0668 µm/px, the paper's 2560x1920 camera frames)
on areas of ``area`` pixels; the crop context of the imported networks is their input size at that
resolution (``crop_um = 299 * mpp`` for 299 px inputs), since the paper cropped cells at the frames'
own pixels. An existing bundle keeps its geometry (``mpp`` must then be left out or equal), and every
network in one bundle must take the same input size and preprocessing.

Safety: Keras model files can run code when loaded (legacy ``.h5`` files ignore Keras' safe mode),
so nothing is loaded without ``trust=True``. Even then the file is loaded only in a child process
(``python -m wsi_apl.keras_import``, :func:`read_in_child`): it imports TensorFlow/Keras, loads the
model (Keras' own safe mode as before), maps it (:func:`analyse_model`, :func:`export_arrays`) and
computes Keras' outputs on the check images; it hands back only a safetensors file of plain arrays and
a JSON of facts. The calling process never imports TensorFlow or Keras, builds the torch model from the
arrays and runs the equality check itself; a child that fails, crashes or outlives
:data:`CHILD_TIMEOUT_S` gives a :class:`KerasImportError` naming the model file. The child is not a
sandbox (it runs as the same user): ``trust`` still means what it says. (``pip install 'wsi-apl[keras]'``)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workers.bundle import BUNDLE_FILE, BundleError, create_bundle, load_bundle, save_part, sha256_file
from workers.classifier import HEADS, CellClassifier, CellConfig
from workers.xception import RESIDUAL_CHANNELS, SeparableConv2d, Xception, keras_name, weighted_modules

DEFAULT_MPP = 0.0668            # µm/px of the paper's 2560x1920 frames
DEFAULT_AREA = (2560, 1920)
TOLERANCE_PROB = 1e-4           # max |p_torch - p_keras| on the check images
TOLERANCE_LOGIT = 1e-4          # max |z_torch - z_keras| <= TOLERANCE_LOGIT * max(1, max |z_keras|)
CHECK_IMAGES = 4
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
CHILD_TIMEOUT_S = 900.0        # the child reading one model (TensorFlow's import, loading, the check) takes ~30 s
CHILD_FACTS, CHILD_ARRAYS, CHILD_ERROR = "facts.json", "arrays.safetensors", "error.txt"
NO_OP_LAYERS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianDropout", "GaussianNoise",
                "AlphaDropout", "ActivityRegularization", "Flatten")


class KerasImportError(Exception):
    """A Keras model that cannot be imported, naming the file and what to do."""


@dataclass
class KerasNetwork:
    """The parts of one Keras classifier that the import maps."""

    model: object
    layers: dict[str, object]                   # Keras layer of each torch backbone module name
    dense: list[list] = field(default_factory=list)  # [Dense layer, activation name] in order
    output: str = "sigmoid"                     # output activation: sigmoid, softmax or linear
    act_holder: object = None                   # the layer whose .activation is the output activation
    input_px: int = 299
    scale: np.ndarray = None                    # Rescaling folded: keras input = scale * x255 + offset
    offset: np.ndarray = None
    rescaling: bool = False
    dropout: float = 0.0

    def describe_head(self) -> str:
        parts = [f"Dense({d.units}, {a})" for d, a in self.dense]
        return " -> ".join(["GlobalAveragePooling2D"] + parts)


def _keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras
        import tensorflow as tf
    except ImportError as exc:
        raise KerasImportError(f"TensorFlow/Keras is not installed ({exc}); install it with: "
                               "pip install 'wsi-apl[keras]'") from exc
    return keras, tf


def _np(keras, v) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float32)


def _act_name(act) -> str:
    return str(getattr(act, "__name__", act))


def _flat_layers(model, keras) -> list:
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(_flat_layers(layer, keras))
        elif type(layer).__name__ != "InputLayer":
            out.append(layer)
    return out


def load_keras_model(path: Path, keras):
    """``keras.saving.load_model(path, compile=False)``: Keras 3 reads ``.keras`` zips itself and legacy
    HDF5 files with its h5 loader (which has no safe mode)."""
    try:
        return keras.saving.load_model(str(path), compile=False)
    except Exception as exc:  # Keras raises many kinds (ValueError, TypeError, OSError, KeyError, ...)
        msg = " ".join(str(exc).split())[:300]
        raise KerasImportError(f"{path}: Keras could not read the model ({type(exc).__name__}: {msg}); "
                               "check that it is a complete .keras or .h5 model file (not weights only) "
                               "saved by Keras/TensorFlow 2.x or 3.x") from exc


def analyse_model(model, keras, path: Path | str = "model") -> KerasNetwork:
    """Find the Xception layers, the preprocessing before them and the dense head after them."""
    flat = _flat_layers(model, keras)
    index: dict[str, list[int]] = {}
    for i, layer in enumerate(flat):
        index.setdefault(layer.name, []).append(i)
    if "block1_conv1" not in index or "block14_sepconv2_act" not in index:
        raise KerasImportError(f"{path}: no Xception inside (no layers block1_conv1 ... block14_sepconv2_act); "
                               "this import reads keras.applications.Xception classifiers only")
    for name in ("block1_conv1", "block14_sepconv2_act"):
        if len(index[name]) > 1:
            raise KerasImportError(f"{path}: {len(index[name])} Xception backbones inside; import one network "
                                   "per file (one per finding)")
    start, end = index["block1_conv1"][0], index["block14_sepconv2_act"][0]
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise KerasImportError(f"{path}: the model has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                               "expected one image input and one output")

    layers: dict[str, object] = {}
    nn_names = [n for n, _ in weighted_modules(_xception_meta())]
    for n in nn_names:
        k = keras_name(n)
        if k is None:
            continue
        hits = [flat[i] for i in index.get(k, []) if start <= i <= end]
        if len(hits) != 1:
            raise KerasImportError(f"{path}: Xception layer {k} {'missing' if not hits else 'found twice'}; "
                                   "the backbone is not keras.applications.Xception")
        layers[n] = hits[0]
    named = {layer.name for layer in layers.values()}
    middle = [lay for lay in flat[start:end + 1] if lay.name not in named]
    convs = [lay for lay in middle if type(lay).__name__ == "Conv2D"]
    bns = [lay for lay in middle if type(lay).__name__ == "BatchNormalization"]
    for block, c in RESIDUAL_CHANNELS.items():
        conv = [lay for lay in convs if lay.filters == c and tuple(lay.kernel_size) == (1, 1)]
        bn = [lay for lay in bns if int(lay.moving_mean.shape[0]) == c]
        if len(conv) != 1 or len(bn) != 1:
            raise KerasImportError(f"{path}: cannot identify the residual 1x1 convolution with {c} channels of "
                                   f"{block} ({len(conv)} convolutions, {len(bn)} batch norms); the backbone is "
                                   "not keras.applications.Xception")
        layers[f"{block}_res_conv"] = conv[0]
        layers[f"{block}_res_bn"] = bn[0]
    extra = [lay.name for lay in convs + bns if lay not in layers.values()]
    if extra:
        raise KerasImportError(f"{path}: unexpected layers inside the Xception backbone ({', '.join(extra[:5])})")
    for lay in layers.values():
        if getattr(lay, "data_format", "channels_last") != "channels_last":
            raise KerasImportError(f"{path}: layer {lay.name} is channels_first; only channels_last models are read")

    net = KerasNetwork(model=model, layers=layers)
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[3] != 3:
        raise KerasImportError(f"{path}: input shape {shape}; expected (batch, height, width, 3) RGB images")
    if shape[1] is not None and shape[1] != shape[2]:
        raise KerasImportError(f"{path}: input {shape[1]}x{shape[2]} is not square; cell crops are square")
    net.input_px = int(shape[1] or 299)

    scale, offset = np.ones(3), np.zeros(3)
    for lay in flat[:start]:
        cls = type(lay).__name__
        if cls == "Rescaling":
            s = np.broadcast_to(np.asarray(lay.scale, np.float64).reshape(-1), (3,))
            o = np.broadcast_to(np.asarray(lay.offset, np.float64).reshape(-1), (3,))
            scale, offset = scale * s, offset * s + o
            net.rescaling = True
        else:
            raise KerasImportError(f"{path}: layer {lay.name} ({cls}) before the backbone is not supported (only "
                                   "Rescaling; remove the preprocessing layer and apply x/127.5-1 outside)")
    net.scale, net.offset = scale, offset

    pooled = False
    for lay in flat[end + 1:]:
        cls = type(lay).__name__
        if cls == "GlobalAveragePooling2D" and not pooled and not net.dense:
            pooled = True
        elif cls in NO_OP_LAYERS:
            net.dropout = max(net.dropout, float(getattr(lay, "rate", 0.0)))
        elif cls == "Dense" and pooled:
            net.dense.append([lay, _act_name(lay.activation)])
            net.act_holder = lay
        elif cls in ("Activation", "ReLU") and net.dense and net.dense[-1][1] == "linear":
            if cls == "ReLU" and (lay.max_value is not None or float(lay.negative_slope) != 0.0
                                  or float(lay.threshold) != 0.0):
                raise KerasImportError(f"{path}: layer {lay.name}: only a plain ReLU is supported in the head")
            net.dense[-1][1] = "relu" if cls == "ReLU" else _act_name(lay.activation)
            net.act_holder = lay if cls == "Activation" else net.act_holder
        elif cls == "GlobalMaxPooling2D":
            raise KerasImportError(f"{path}: global max pooling after Xception; only average pooling "
                                   "(pooling='avg') is reproduced")
        else:
            raise KerasImportError(f"{path}: layer {lay.name} ({cls}) after the backbone is not supported; the head "
                                   "must be GlobalAveragePooling2D, Dense(k, relu)/Dropout layers, then Dense(1, "
                                   "sigmoid) or Dense(2, softmax)")
    if not pooled or not net.dense:
        raise KerasImportError(f"{path}: no GlobalAveragePooling2D + Dense output after the Xception backbone")
    for d, a in net.dense[:-1]:
        if a != "relu":
            raise KerasImportError(f"{path}: hidden layer {d.name} has activation {a}; only relu is supported")
    last, act = net.dense[-1]
    if not ((last.units == 1 and act in ("sigmoid", "linear")) or (last.units == 2 and act in ("softmax", "linear"))):
        raise KerasImportError(f"{path}: output layer {last.name} is Dense({last.units}, {act}); expected "
                               "Dense(1, sigmoid) or Dense(2, softmax), one binary network per finding")
    net.output = act
    if model.outputs[0].shape[-1] != last.units:
        raise KerasImportError(f"{path}: the model's output is not its last Dense layer {last.name}")
    return net


def _xception_meta() -> Xception:
    with torch.device("meta"):
        return Xception()


def _copy(param: torch.Tensor, arr: np.ndarray, what: str, path) -> None:
    if tuple(param.shape) != tuple(arr.shape):
        raise KerasImportError(f"{path}: {what}: Keras weights of shape {tuple(arr.shape)} do not fit "
                               f"{tuple(param.shape)}; the backbone is not keras.applications.Xception")
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(arr)))


def export_arrays(net: KerasNetwork, keras, path="model") -> tuple[dict[str, np.ndarray], dict]:
    """(child) The Keras weights as plain float32 arrays in Keras' layouts, and the facts needed to place
    them: ``backbone.<module>.<kernel|depthwise_kernel|pointwise_kernel|gamma|beta|moving_mean|
    moving_variance>`` per torch backbone module, ``head.<i>.<kernel|bias>`` per Dense layer."""
    arrays: dict[str, np.ndarray] = {}
    epsilon: dict[str, float] = {}
    for name, mod in weighted_modules(_xception_meta()):
        lay, k = net.layers[name], f"backbone.{name}."
        if getattr(lay, "use_bias", False):
            raise KerasImportError(f"{path}: layer {lay.name} has a bias; keras.applications.Xception has none")
        if isinstance(mod, SeparableConv2d):
            if getattr(lay, "depth_multiplier", 1) != 1:
                raise KerasImportError(f"{path}: layer {lay.name} has depth_multiplier {lay.depth_multiplier}")
            arrays[k + "depthwise_kernel"] = _np(keras, lay.depthwise_kernel)
            arrays[k + "pointwise_kernel"] = _np(keras, lay.pointwise_kernel)
        elif isinstance(mod, torch.nn.BatchNorm2d):
            c = int(lay.moving_mean.shape[0])
            arrays[k + "gamma"] = _np(keras, lay.gamma) if lay.scale else np.ones(c, np.float32)
            arrays[k + "beta"] = _np(keras, lay.beta) if lay.center else np.zeros(c, np.float32)
            arrays[k + "moving_mean"] = _np(keras, lay.moving_mean)
            arrays[k + "moving_variance"] = _np(keras, lay.moving_variance)
            epsilon[name] = float(lay.epsilon)
        else:
            arrays[k + "kernel"] = _np(keras, lay.kernel)
    dense = []
    for i, (d, act) in enumerate(net.dense):
        arrays[f"head.{i}.kernel"] = _np(keras, d.kernel)
        arrays[f"head.{i}.bias"] = _np(keras, d.bias) if d.use_bias else np.zeros(d.units, np.float32)
        dense.append({"name": d.name, "units": int(d.units), "activation": act})
    facts = {"layers": {n: lay.name for n, lay in net.layers.items()}, "epsilon": epsilon, "dense": dense}
    return arrays, facts


def _arr(arrays: dict, key: str, path) -> np.ndarray:
    if key not in arrays:
        raise KerasImportError(f"{path}: the Keras child process gave no {key}; nothing was written")
    return arrays[key]


def copy_backbone(arrays: dict[str, np.ndarray], facts: dict, model: Xception, path="model") -> None:
    """Keras Xception weights -> torch: conv HWIO -> OIHW, depthwise (kh, kw, cin, 1) -> (cin, 1, kh, kw)."""
    for name, mod in weighted_modules(model):
        k, what = f"backbone.{name}.", facts["layers"].get(name, name)
        if isinstance(mod, SeparableConv2d):
            _copy(mod.depthwise.weight, _arr(arrays, k + "depthwise_kernel", path).transpose(2, 3, 0, 1), what, path)
            _copy(mod.pointwise.weight, _arr(arrays, k + "pointwise_kernel", path).transpose(3, 2, 0, 1), what, path)
        elif isinstance(mod, torch.nn.BatchNorm2d):
            _copy(mod.weight, _arr(arrays, k + "gamma", path), what, path)
            _copy(mod.bias, _arr(arrays, k + "beta", path), what, path)
            _copy(mod.running_mean, _arr(arrays, k + "moving_mean", path), what, path)
            _copy(mod.running_var, _arr(arrays, k + "moving_variance", path), what, path)
            mod.eps = float(facts["epsilon"][name])
        else:
            _copy(mod.weight, _arr(arrays, k + "kernel", path).transpose(3, 2, 0, 1), what, path)


def copy_head(arrays: dict[str, np.ndarray], facts: dict, head: torch.nn.Module, positive_class: int = 1,
              path="model") -> None:
    """Dense (in, out) -> Linear (out, in); a two-unit softmax output becomes ``z_pos - z_neg``."""
    linears = [head.net[i] for i in head.linear_indices()]
    for i, (d, lin) in enumerate(zip(facts["dense"], linears, strict=True)):
        w, b = _arr(arrays, f"head.{i}.kernel", path), _arr(arrays, f"head.{i}.bias", path)
        if lin is linears[-1] and d["units"] == 2:
            p, q = positive_class, 1 - positive_class
            w, b = (w[:, p] - w[:, q])[:, None], np.asarray([b[p] - b[q]], np.float32)
        _copy(lin.weight, w.T, d["name"], path)
        _copy(lin.bias, b, d["name"], path)


def _keras_outputs(net: KerasNetwork, keras, x: np.ndarray, positive_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Keras probabilities and logits of the finding (the output activation swapped to linear for the logits)."""
    p, q = positive_class, 1 - positive_class
    out = np.asarray(keras.ops.convert_to_numpy(net.model(x, training=False)), np.float64)
    holder, act = net.act_holder, net.act_holder.activation
    holder.activation = keras.activations.linear
    try:
        z = np.asarray(keras.ops.convert_to_numpy(net.model(x, training=False)), np.float64)
    finally:
        holder.activation = act
    z = z[:, 0] if z.shape[1] == 1 else z[:, p] - z[:, q]
    if net.output == "sigmoid":
        prob = out[:, 0]
    elif net.output == "softmax":
        prob = out[:, p]
    else:  # linear: the model gives logits
        prob = 1.0 / (1.0 + np.exp(-z))
    return prob, z


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


# ---------------------------------------------------------------------------------------------
# the child process: the only place that imports TensorFlow/Keras and loads the model file


def read_keras_model(path: Path, positive_class: int = 1, n_check: int = CHECK_IMAGES,
                     seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """(child) Load and map the model; its arrays (weights, check images and Keras' outputs on them:
    ``check.images``, ``check.keras_prob``, ``check.keras_logit``) and JSON-able facts."""
    keras, tf = _keras()
    kmodel = load_keras_model(path, keras)
    net = analyse_model(kmodel, keras, path)
    arrays, facts = export_arrays(net, keras, path)
    x255 = check_images(n_check, net.input_px, seed)
    # a model with Rescaling layers takes 0-255 pixels; otherwise Keras' xception.preprocess_input is applied
    xf = x255.astype(np.float32)
    p_k, z_k = _keras_outputs(net, keras, xf if net.rescaling else xf / 127.5 - 1.0, positive_class)
    arrays.update({"check.images": x255, "check.keras_prob": np.asarray(p_k, np.float64),
                   "check.keras_logit": np.asarray(z_k, np.float64)})
    facts.update({"keras": keras.__version__, "tensorflow": tf.__version__, "keras_model": str(kmodel.name),
                  "input_px": int(net.input_px), "rescaling": bool(net.rescaling),
                  "scale": [float(v) for v in net.scale], "offset": [float(v) for v in net.offset],
                  "dropout": float(net.dropout), "output": net.output, "head": net.describe_head()})
    return facts, arrays


def _child_main(argv: list[str]) -> int:
    """``python -m wsi_apl.keras_import MODEL OUT_DIR --trust [...]``: writes OUT_DIR/arrays.safetensors and
    then OUT_DIR/facts.json, or OUT_DIR/error.txt (a :class:`KerasImportError`'s one line) and exits 2."""
    import argparse

    from safetensors.numpy import save_file

    ap = argparse.ArgumentParser(prog="python -m wsi_apl.keras_import",
                                 description="Read a Keras model for wsi-apl bundle import-keras (its child process).")
    ap.add_argument("model")
    ap.add_argument("out_dir")
    ap.add_argument("--trust", action="store_true")
    ap.add_argument("--positive-class", type=int, default=1)
    ap.add_argument("--n-check", type=int, default=CHECK_IMAGES)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    try:
        if not a.trust:
            raise KerasImportError(f"{a.model}: not loaded without --trust (Keras model files can run code)")
        facts, arrays = read_keras_model(Path(a.model), a.positive_class, a.n_check, a.seed)
    except KerasImportError as exc:
        (out / CHILD_ERROR).write_text(str(exc), encoding="utf-8")
        return 2
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / CHILD_ARRAYS))
    (out / CHILD_FACTS).write_text(json.dumps(facts), encoding="utf-8")  # last: its presence means done
    return 0


# ---------------------------------------------------------------------------------------------
# the calling process: never imports TensorFlow/Keras


def _require_keras() -> None:
    missing = [m for m in ("tensorflow", "keras") if importlib.util.find_spec(m) is None]
    if missing:
        raise KerasImportError(f"TensorFlow/Keras is not installed (no {', '.join(missing)}); install it with: "
                               "pip install 'wsi-apl[keras]'")


def _child_command() -> list[str]:
    return [sys.executable, "-m", "wsi_apl.keras_import"]


def _tail(text: str, lines: int = 6, chars: int = 600) -> str:
    last = [ln.strip() for ln in (text or "").splitlines() if ln.strip()][-lines:]
    return " | ".join(last)[-chars:] or "nothing"


def read_in_child(path: Path, positive_class: int = 1, n_check: int = CHECK_IMAGES, seed: int = 0,
                  timeout_s: float = CHILD_TIMEOUT_S) -> tuple[dict, dict[str, np.ndarray]]:
    """Run :func:`read_keras_model` in a child Python process and return its facts and arrays.
    Raises :class:`KerasImportError` naming ``path`` when the child refuses the model, fails, is killed
    or runs longer than ``timeout_s``."""
    from safetensors.numpy import load_file

    root = str(Path(__file__).resolve().parents[1])   # the child imports this very copy of wsi_apl
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="wsi-apl-keras-") as tmp:
        cmd = _child_command() + ["--trust", "--positive-class", str(int(positive_class)), "--n-check",
                                  str(int(n_check)), "--seed", str(int(seed)), "--", str(path), tmp]
        try:
            proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace", timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise KerasImportError(f"{path}: reading the model in its Keras child process took longer than "
                                   f"{timeout_s:g} s; the child was stopped and nothing was written") from exc
        except OSError as exc:
            raise KerasImportError(f"{path}: cannot start the Keras child process ({exc}); "
                                   "nothing was written") from exc
        tmp_dir = Path(tmp)
        if (tmp_dir / CHILD_ERROR).is_file():
            raise KerasImportError((tmp_dir / CHILD_ERROR).read_text(encoding="utf-8"))
        if proc.returncode != 0 or not (tmp_dir / CHILD_FACTS).is_file():
            rc = proc.returncode
            if rc < 0:
                try:
                    how = f"was killed by signal {signal.Signals(-rc).name}"
                except ValueError:
                    how = f"was killed by signal {-rc}"
            else:
                how = f"failed (exit code {rc})"
            raise KerasImportError(f"{path}: the Keras child process reading the model {how}; nothing was written; "
                                   f"its last output: {_tail(proc.stderr or proc.stdout)}")
        try:
            facts = json.loads((tmp_dir / CHILD_FACTS).read_text(encoding="utf-8"))
            arrays = load_file(str(tmp_dir / CHILD_ARRAYS))
        except Exception as exc:
            raise KerasImportError(f"{path}: the Keras child process left unreadable results ({type(exc).__name__}: "
                                   f"{exc}); nothing was written") from exc
    return facts, arrays


def _geometry(out: Path, mpp: float | None) -> tuple[object | None, float]:
    if not (out / BUNDLE_FILE).exists():
        return None, float(mpp if mpp is not None else DEFAULT_MPP)
    b = load_bundle(out, verify=False)
    if not b.mpp_known:
        raise KerasImportError(f"{out}: this bundle works on pictures without a pixel size; import the Keras "
                               "models into a new bundle directory (with --mpp)")
    if mpp is not None and abs(mpp - b.mpp) > 1e-9:
        raise KerasImportError(f"{out}: the bundle works at {b.mpp} µm/px, not {mpp}; leave out --mpp to add to "
                               "it, or import into a new bundle directory")
    return b, b.mpp


def import_keras(model_path: str | os.PathLike, head: str, out_bundle: str | os.PathLike, trust: bool,
                 log: Callable[[str], None] = print, *, mpp: float | None = None,
                 area: tuple[int, int] = DEFAULT_AREA, positive_class: int = 1, n_check: int = CHECK_IMAGES,
                 name: str | None = None, timeout_s: float = CHILD_TIMEOUT_S) -> dict:
    """Import one Keras Xception classifier as head ``head`` into the bundle ``out_bundle``.

    A new bundle is created at ``mpp`` µm/px (default 0.0668, the paper's frames) with areas of
    ``area`` pixels and crop context ``input_px * mpp`` µm; an existing bundle keeps its geometry and
    its other parts, and gets ``head`` as one more separate backbone + head (re-importing a head
    replaces it). Nothing is written unless Keras and torch agree on the check images within
    :data:`TOLERANCE_PROB` (probabilities) and :data:`TOLERANCE_LOGIT` (logits, relative to their scale).
    The model file is loaded with Keras only in a child process (:func:`read_in_child`, stopped after
    ``timeout_s``); this process never imports TensorFlow or Keras.
    Returns the check results and the provenance recorded in bundle.json.
    """
    path, out = Path(model_path), Path(out_bundle)
    if not trust:
        raise KerasImportError(f"{path}: not loaded: Keras model files can run code when they are loaded (legacy "
                               ".h5 files ignore Keras' safe mode); pass --trust only for a file from a source you trust")
    if not path.is_file():
        raise KerasImportError(f"{path}: no such file (give a .keras or .h5 model file)")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise KerasImportError(f"{path}: not a Keras model file (expected {', '.join(MODEL_SUFFIXES)})")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", head):
        raise KerasImportError(f"--head {head!r}: use lower-case letters, digits and _ (e.g. promyelocyte)")
    bundle, work_mpp = _geometry(out, mpp)

    _require_keras()
    t0 = time.time()
    sha = sha256_file(path)
    log(f"Reading {path} with Keras in a child process")
    facts, arrays = read_in_child(path, positive_class, n_check, timeout_s=timeout_s)
    if sha256_file(path) != sha:
        raise KerasImportError(f"{path}: the file changed while it was read; nothing was written; import it again")
    two_units = facts["dense"][-1]["units"] == 2
    log(f"  Keras {facts['keras']}, TensorFlow {facts['tensorflow']}: Xception {facts['input_px']}x{facts['input_px']} "
        f"+ {facts['head']}" + (f" (positive class {positive_class})" if two_units else ""))
    scale, offset = np.asarray(facts["scale"], np.float64), np.asarray(facts["offset"], np.float64)
    if facts["rescaling"]:
        mean = tuple(float(v) for v in -offset / (255.0 * scale))
        std = tuple(float(v) for v in 1.0 / (255.0 * scale))
        pre = f"Rescaling in the model (scale {scale.tolist()}, offset {offset.tolist()} on 0-255 pixels)"
    else:
        mean = std = (0.5, 0.5, 0.5)
        pre = "x / 127.5 - 1 (keras xception.preprocess_input, applied outside the model)"
    px = int(facts["input_px"])
    sizes = [int(d["units"]) for d in facts["dense"][:-1]]
    cfg = CellConfig(backbone="xception", heads=(head,), separate=True, crop_px=px,
                     crop_um=round(px * work_mpp, 6), image_mean=mean, image_std=std,
                     head_sizes={head: sizes}, dropout=facts["dropout"] or 0.3)
    model = CellClassifier(cfg)
    copy_backbone(arrays, facts, model.backbones[head], path)
    copy_head(arrays, facts, model.heads[head], positive_class, path)
    check = check_equal(model, _arr(arrays, "check.images", path), _arr(arrays, "check.keras_prob", path),
                        _arr(arrays, "check.keras_logit", path))
    log(f"  check on {check['images']} random {check['px']}x{check['px']} images: max |Δp| "
        f"{check['max_abs_diff_prob']:.2e} (tolerance {TOLERANCE_PROB:g}), max |Δlogit| "
        f"{check['max_abs_diff_logit']:.2e} (tolerance {check['tolerance_logit']:.2e}); Keras probabilities "
        f"{check['keras_prob_range'][0]:.3f}-{check['keras_prob_range'][1]:.3f}")
    if not check["passed"]:
        raise KerasImportError(f"{path}: torch and Keras disagree (max |Δp| {check['max_abs_diff_prob']:.2e}, "
                               f"max |Δlogit| {check['max_abs_diff_logit']:.2e}); nothing was written; the model "
                               "has a layer this import does not reproduce")
    provenance = {"source": path.name, "sha256": sha, "format": path.suffix.lower().lstrip("."),
                  "keras_model": facts["keras_model"], "keras": facts["keras"], "tensorflow": facts["tensorflow"],
                  "torch": torch.__version__, "head": facts["head"], "preprocessing": pre,
                  "positive_class": positive_class if two_units else None,
                  "check": check, "imported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    state = model.state_dict()
    del arrays
    bundle = _write(out, head, cfg, state, provenance, bundle, work_mpp, area, name, log)
    log(f"  {head}: written to {out} ({time.time() - t0:.0f} s); bundle {bundle.label}, heads {', '.join(bundle.heads)}")
    return {"bundle": str(out), "head": head, "heads": bundle.heads, "check": check, "provenance": provenance}


def _write(out: Path, head: str, cfg: CellConfig, state: dict, provenance: dict, bundle, work_mpp: float,
           area: tuple[int, int], name: str | None, log: Callable[[str], None]):
    """Add (or replace) ``head``'s backbone and head in the bundle's cells part, keeping every other part."""
    tensors = dict(state)
    heads, head_sizes, thresholds, prov = [head], dict(cfg.head_sizes), {}, {"heads": {head: provenance}}
    old = bundle.part("cells") if bundle is not None else None
    if old is not None:
        oc = CellConfig.from_json(old["config"])
        if oc.backbone != "xception" or not oc.separate:
            raise KerasImportError(f"{out}: its cells part is a {oc.backbone} classifier"
                                   f"{'' if oc.separate else ' with a shared backbone'}, not imported Keras networks; "
                                   "import into a new bundle directory")
        same = (oc.crop_px == cfg.crop_px and abs(oc.crop_um - cfg.crop_um) < 1e-6
                and np.allclose(oc.image_mean, cfg.image_mean) and np.allclose(oc.image_std, cfg.image_std))
        if not same:
            raise KerasImportError(f"{out}: its networks take {oc.crop_px} px crops of {oc.crop_um:g} µm normalised "
                                   f"with mean {list(oc.image_mean)}, std {list(oc.image_std)}; this one takes "
                                   f"{cfg.crop_px} px, {cfg.crop_um:g} µm, mean {list(cfg.image_mean)}, std "
                                   f"{list(cfg.image_std)}; import it into another bundle directory")
        kept = {k: v for k, v in bundle.load_tensors("cells").items()
                if not k.startswith((f"backbones.{head}.", f"heads.{head}."))}
        kept.update(tensors)
        tensors = kept
        heads = list(oc.heads) + ([] if head in oc.heads else [head])
        head_sizes = {**oc.head_sizes, head: cfg.head_sizes[head]}
        thresholds = {h: t for h, t in oc.thresholds.items() if h != head}
        prov = dict(old.get("provenance", {}))
        prov["heads"] = {**prov.get("heads", {}), head: provenance}
        if head in oc.heads:
            log(f"  replacing the bundle's {head} network")
    cfg = CellConfig.from_json({**cfg.to_json(), "heads": heads, "head_sizes": head_sizes, "thresholds": thresholds})
    with torch.device("meta"):
        expect = CellClassifier(cfg).state_dict()
    bad = sorted(set(expect) ^ set(tensors)) + [k for k in expect if k in tensors
                                                and tuple(expect[k].shape) != tuple(tensors[k].shape)]
    if bad:
        raise BundleError(f"{out}: the cells weights do not match their config ({', '.join(bad[:3])}); "
                          "import into a new bundle directory")
    if bundle is None:
        bundle = create_bundle(out, name=name or out.name, mpp=work_mpp, area_size=area, heads=heads, synthetic=False,
                               description="Keras Xception cell classifiers imported with wsi-apl bundle import-keras")
    else:
        bundle = create_bundle(out, name=bundle.name, mpp=bundle.meta.get("mpp"), area_size=bundle.area_size,
                               heads=heads, synthetic=bundle.synthetic, description=bundle.meta.get("description", ""))
    metrics = {"import_check": {h: p["check"] for h, p in prov["heads"].items() if "check" in p}}
    bundle = save_part(bundle, "cells", tensors, config=cfg.to_json(), metrics=metrics, provenance=prov)
    if head not in HEADS:
        log(f"  note: the triage list reports {', '.join(HEADS)}; {head} is scanned and kept in the cell tables only")
    if bundle.has("slide_nets"):
        log("  note: the slide-level nets were trained on the previous cell outputs; retrain them "
            f"(wsi-apl train enn --bundle {out} --slides LABELS.csv)")
    if not bundle.has("detector"):
        w, h = bundle.area_size
        log(f"  the bundle has no detector yet: train one into {out} at {bundle.mpp:g} µm/px with {w}x{h} px areas "
            "(wsi-apl train detector --out ...); a bundle re-created at another geometry drops its parts")
    return bundle


if __name__ == "__main__":  # the child process of read_in_child
    sys.exit(_child_main(sys.argv[1:]))
