"""The child process of :mod:`wsi_apl.keras_import`: the only place that imports TensorFlow/Keras and
loads a model file.

``python -m wsi_apl.keras_import`` runs :func:`child_main`, which reads the model
(:func:`read_keras_model`: load, map with :mod:`wsi_apl.keras_graph`, and Keras' outputs on the check
images) and hands back only plain arrays and a JSON of facts, in the files named in
:mod:`wsi_apl.keras_common`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .keras_common import CHECK_IMAGES, CHILD_ARRAYS, CHILD_ERROR, CHILD_FACTS, KerasImportError
from .keras_graph import KerasNetwork, analyse_model, export_arrays, load_keras_model
from .keras_torch import check_images


def _keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras
        import tensorflow as tf
    except ImportError as exc:
        raise KerasImportError(f"TensorFlow/Keras is not installed ({exc}); install it with: "
                               "pip install 'wsi-apl[keras]'") from exc
    return keras, tf


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


def child_main(argv: list[str]) -> int:
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
