"""Import Keras Xception cell classifiers into a bundle's ``cells`` part (``wsi-apl bundle import-keras``).

The 2022 paper's cell models are Keras ``Xception`` backbones with a dense head, one binary network
per finding. :func:`import_keras` reads one such network (``.keras`` or legacy ``.h5``), copies its
weights into the torch :class:`workers.xception.Xception` and a :class:`workers.classifier.Head`,
checks on random images that Keras and torch agree, and adds the network to a bundle as one more
separate backbone + head (``CellConfig(backbone="xception", separate=True)``). Importing three
networks (say myeloblast, promyelocyte, auer_rod) into one directory gives the paper's three
networks; the workers then run them with torch only, no TensorFlow.

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
so nothing is loaded without ``trust=True``. TensorFlow is imported only inside these functions
(``pip install 'wsi-apl[keras]'``).
"""

from __future__ import annotations

import os
import re
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


def copy_backbone(net: KerasNetwork, model: Xception, keras, path="model") -> None:
    """Keras Xception weights -> torch: conv HWIO -> OIHW, depthwise (kh, kw, cin, 1) -> (cin, 1, kh, kw)."""
    for name, mod in weighted_modules(model):
        lay = net.layers[name]
        if getattr(lay, "use_bias", False):
            raise KerasImportError(f"{path}: layer {lay.name} has a bias; keras.applications.Xception has none")
        if isinstance(mod, SeparableConv2d):
            if getattr(lay, "depth_multiplier", 1) != 1:
                raise KerasImportError(f"{path}: layer {lay.name} has depth_multiplier {lay.depth_multiplier}")
            _copy(mod.depthwise.weight, _np(keras, lay.depthwise_kernel).transpose(2, 3, 0, 1), lay.name, path)
            _copy(mod.pointwise.weight, _np(keras, lay.pointwise_kernel).transpose(3, 2, 0, 1), lay.name, path)
        elif isinstance(mod, torch.nn.BatchNorm2d):
            c = mod.num_features
            _copy(mod.weight, _np(keras, lay.gamma) if lay.scale else np.ones(c, np.float32), lay.name, path)
            _copy(mod.bias, _np(keras, lay.beta) if lay.center else np.zeros(c, np.float32), lay.name, path)
            _copy(mod.running_mean, _np(keras, lay.moving_mean), lay.name, path)
            _copy(mod.running_var, _np(keras, lay.moving_variance), lay.name, path)
            mod.eps = float(lay.epsilon)
        else:
            _copy(mod.weight, _np(keras, lay.kernel).transpose(3, 2, 0, 1), lay.name, path)


def copy_head(net: KerasNetwork, head: torch.nn.Module, keras, positive_class: int = 1, path="model") -> None:
    """Dense (in, out) -> Linear (out, in); a two-unit softmax output becomes ``z_pos - z_neg``."""
    linears = [head.net[i] for i in head.linear_indices()]
    for (d, _), lin in zip(net.dense, linears, strict=True):
        w = _np(keras, d.kernel)
        b = _np(keras, d.bias) if d.use_bias else np.zeros(d.units, np.float32)
        if lin is linears[-1] and d.units == 2:
            p, q = positive_class, 1 - positive_class
            w, b = (w[:, p] - w[:, q])[:, None], np.asarray([b[p] - b[q]], np.float32)
        _copy(lin.weight, w.T, d.name, path)
        _copy(lin.bias, b, d.name, path)


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


def check_equal(net: KerasNetwork, torch_model: CellClassifier, keras, n: int = CHECK_IMAGES, seed: int = 0,
                positive_class: int = 1) -> dict:
    """Run Keras and torch on the same random images; the max abs differences and whether they pass."""
    px = torch_model.cfg.crop_px
    x255 = check_images(n, px, seed).astype(np.float32)
    # a model with Rescaling layers takes 0-255 pixels; otherwise Keras' xception.preprocess_input is applied
    keras_in = x255 if net.rescaling else x255 / 127.5 - 1.0
    p_k, z_k = _keras_outputs(net, keras, keras_in, positive_class)
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
                 name: str | None = None) -> dict:
    """Import one Keras Xception classifier as head ``head`` into the bundle ``out_bundle``.

    A new bundle is created at ``mpp`` µm/px (default 0.0668, the paper's frames) with areas of
    ``area`` pixels and crop context ``input_px * mpp`` µm; an existing bundle keeps its geometry and
    its other parts, and gets ``head`` as one more separate backbone + head (re-importing a head
    replaces it). Nothing is written unless Keras and torch agree on the check images within
    :data:`TOLERANCE_PROB` (probabilities) and :data:`TOLERANCE_LOGIT` (logits, relative to their scale).
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

    keras, tf = _keras()
    t0 = time.time()
    log(f"Reading {path} (Keras {keras.__version__}, TensorFlow {tf.__version__})")
    kmodel = load_keras_model(path, keras)
    net = analyse_model(kmodel, keras, path)
    log(f"  Xception {net.input_px}x{net.input_px} + {net.describe_head()}"
        + (f" (positive class {positive_class})" if net.dense[-1][0].units == 2 else ""))
    if net.rescaling:
        mean = tuple(float(v) for v in -net.offset / (255.0 * net.scale))
        std = tuple(float(v) for v in 1.0 / (255.0 * net.scale))
        pre = f"Rescaling in the model (scale {net.scale.tolist()}, offset {net.offset.tolist()} on 0-255 pixels)"
    else:
        mean = std = (0.5, 0.5, 0.5)
        pre = "x / 127.5 - 1 (keras xception.preprocess_input, applied outside the model)"
    sizes = [int(d.units) for d, _ in net.dense[:-1]]
    cfg = CellConfig(backbone="xception", heads=(head,), separate=True, crop_px=net.input_px,
                     crop_um=round(net.input_px * work_mpp, 6), image_mean=mean, image_std=std,
                     head_sizes={head: sizes}, dropout=net.dropout or 0.3)
    model = CellClassifier(cfg)
    copy_backbone(net, model.backbones[head], keras, path)
    copy_head(net, model.heads[head], keras, positive_class, path)
    check = check_equal(net, model, keras, n=n_check, positive_class=positive_class)
    log(f"  check on {check['images']} random {check['px']}x{check['px']} images: max |Δp| "
        f"{check['max_abs_diff_prob']:.2e} (tolerance {TOLERANCE_PROB:g}), max |Δlogit| "
        f"{check['max_abs_diff_logit']:.2e} (tolerance {check['tolerance_logit']:.2e}); Keras probabilities "
        f"{check['keras_prob_range'][0]:.3f}-{check['keras_prob_range'][1]:.3f}")
    if not check["passed"]:
        raise KerasImportError(f"{path}: torch and Keras disagree (max |Δp| {check['max_abs_diff_prob']:.2e}, "
                               f"max |Δlogit| {check['max_abs_diff_logit']:.2e}); nothing was written; the model "
                               "has a layer this import does not reproduce")
    provenance = {"source": path.name, "sha256": sha256_file(path), "format": path.suffix.lower().lstrip("."),
                  "keras_model": str(kmodel.name), "keras": keras.__version__, "tensorflow": tf.__version__,
                  "torch": torch.__version__, "head": net.describe_head(), "preprocessing": pre,
                  "positive_class": positive_class if net.dense[-1][0].units == 2 else None,
                  "check": check, "imported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    state = model.state_dict()
    del kmodel, net
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
