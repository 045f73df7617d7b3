"""Reading a Keras Xception classifier's graph (in the child process of :mod:`wsi_apl.keras_import`).

:func:`analyse_model` finds, in a loaded Keras model, the layer behind each torch
:class:`workers.xception.Xception` module, the ``Rescaling`` before the backbone and the dense head
after it, and refuses any other layer with a message that says what is understood;
:func:`export_arrays` then hands the weights on as plain float32 arrays in Keras' layouts. Keras is
passed in by the caller, never imported here, so that the calling process can import this module
without TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workers.xception import RESIDUAL_CHANNELS, SeparableConv2d, Xception, keras_name, weighted_modules

from .keras_common import KerasImportError

NO_OP_LAYERS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianDropout", "GaussianNoise",
                "AlphaDropout", "ActivityRegularization", "Flatten")


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


def _xception_meta() -> Xception:
    with torch.device("meta"):
        return Xception()


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
    start, end = _backbone_span(model, index, path)
    net = KerasNetwork(model=model, layers=_backbone_layers(flat, index, start, end, path))
    net.input_px = _input_px(model, path)
    _fold_rescaling(net, flat[:start], path)
    _read_head(net, flat[end + 1:], path)
    _check_output(net, path)
    return net


def _backbone_span(model, index: dict[str, list[int]], path) -> tuple[int, int]:
    """The flat positions of the backbone's first and last layer; one Xception, one input, one output."""
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
    return start, end


def _backbone_layers(flat: list, index: dict[str, list[int]], start: int, end: int, path) -> dict[str, object]:
    """The Keras layer of each torch backbone module: Xception's named layers, then the four unnamed
    residual 1x1 convolutions and batch norms (told apart by their channel counts); nothing else."""
    layers: dict[str, object] = {}
    for n, _ in weighted_modules(_xception_meta()):
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
    layers.update(_residual_layers(convs, bns, path))
    extra = [lay.name for lay in convs + bns if lay not in layers.values()]
    if extra:
        raise KerasImportError(f"{path}: unexpected layers inside the Xception backbone ({', '.join(extra[:5])})")
    for lay in layers.values():
        if getattr(lay, "data_format", "channels_last") != "channels_last":
            raise KerasImportError(f"{path}: layer {lay.name} is channels_first; only channels_last models are read")
    return layers


def _residual_layers(convs: list, bns: list, path) -> dict[str, object]:
    """Keras names the residual 1x1 convolutions and batch norms only by a running number, so they are
    found by their channel counts among the backbone's unnamed layers."""
    layers: dict[str, object] = {}
    for block, c in RESIDUAL_CHANNELS.items():
        conv = [lay for lay in convs if lay.filters == c and tuple(lay.kernel_size) == (1, 1)]
        bn = [lay for lay in bns if int(lay.moving_mean.shape[0]) == c]
        if len(conv) != 1 or len(bn) != 1:
            raise KerasImportError(f"{path}: cannot identify the residual 1x1 convolution with {c} channels of "
                                   f"{block} ({len(conv)} convolutions, {len(bn)} batch norms); the backbone is "
                                   "not keras.applications.Xception")
        layers[f"{block}_res_conv"] = conv[0]
        layers[f"{block}_res_bn"] = bn[0]
    return layers


def _input_px(model, path) -> int:
    """The side of the model's square RGB input (299 when the model leaves it open)."""
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[3] != 3:
        raise KerasImportError(f"{path}: input shape {shape}; expected (batch, height, width, 3) RGB images")
    if shape[1] is not None and shape[1] != shape[2]:
        raise KerasImportError(f"{path}: input {shape[1]}x{shape[2]} is not square; cell crops are square")
    return int(shape[1] or 299)


def _fold_rescaling(net: KerasNetwork, before: list, path) -> None:
    """Fold the ``Rescaling`` layers ``before`` the backbone into ``net.scale`` and ``net.offset`` (the
    torch model's normalisation); any other preprocessing layer is refused."""
    scale, offset = np.ones(3), np.zeros(3)
    for lay in before:
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


def _read_head(net: KerasNetwork, after: list, path) -> None:
    """Collect the layers ``after`` the backbone into ``net.dense``: average pooling, then Dense layers
    (with separate activations folded into them); dropout-like layers only raise ``net.dropout``."""
    pooled = False
    for lay in after:
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


def _check_output(net: KerasNetwork, path) -> None:
    """Hidden Dense layers must be relu and the last one a binary output (Dense(1, sigmoid) or
    Dense(2, softmax), or either linear) that is the model's output; sets ``net.output``."""
    for d, a in net.dense[:-1]:
        if a != "relu":
            raise KerasImportError(f"{path}: hidden layer {d.name} has activation {a}; only relu is supported")
    last, act = net.dense[-1]
    if not ((last.units == 1 and act in ("sigmoid", "linear")) or (last.units == 2 and act in ("softmax", "linear"))):
        raise KerasImportError(f"{path}: output layer {last.name} is Dense({last.units}, {act}); expected "
                               "Dense(1, sigmoid) or Dense(2, softmax), one binary network per finding")
    net.output = act
    if net.model.outputs[0].shape[-1] != last.units:
        raise KerasImportError(f"{path}: the model's output is not its last Dense layer {last.name}")


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
