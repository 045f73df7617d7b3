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

The pieces: :mod:`wsi_apl.keras_common` (the error and the child's result files),
:mod:`wsi_apl.keras_graph` (reading the Keras graph), :mod:`wsi_apl.keras_child` (the child process),
:mod:`wsi_apl.keras_torch` (weights into torch and the equality check) and :mod:`wsi_apl.keras_bundle`
(writing into the bundle); this module runs the import and re-exports their public names.
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
from pathlib import Path

import numpy as np
import torch

from workers.bundle import sha256_file
from workers.classifier import CellClassifier, CellConfig

from .keras_bundle import DEFAULT_AREA, DEFAULT_MPP, bundle_geometry, write_cells
from .keras_child import child_main, read_keras_model
from .keras_common import CHECK_IMAGES, CHILD_ARRAYS, CHILD_ERROR, CHILD_FACTS, KerasImportError, child_array
from .keras_graph import NO_OP_LAYERS, KerasNetwork, analyse_model, export_arrays, load_keras_model
from .keras_torch import TOLERANCE_LOGIT, TOLERANCE_PROB, check_equal, check_images, copy_backbone, copy_head

__all__ = ["CHECK_IMAGES", "CHILD_ARRAYS", "CHILD_ERROR", "CHILD_FACTS", "CHILD_TIMEOUT_S", "DEFAULT_AREA",
           "DEFAULT_MPP", "MODEL_SUFFIXES", "NO_OP_LAYERS", "TOLERANCE_LOGIT", "TOLERANCE_PROB", "KerasImportError",
           "KerasNetwork", "analyse_model", "check_equal", "check_images", "copy_backbone", "copy_head",
           "export_arrays", "import_keras", "load_keras_model", "read_in_child", "read_keras_model"]

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
CHILD_TIMEOUT_S = 900.0        # the child reading one model (TensorFlow's import, loading, the check) takes ~30 s


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

def _normalisation(facts: dict) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """The torch model's image mean and std on [0, 1] pixels, and the preprocessing in words: the
    model's own Rescaling folded in, or else Keras' ``xception.preprocess_input`` (``x / 127.5 - 1``)."""
    scale, offset = np.asarray(facts["scale"], np.float64), np.asarray(facts["offset"], np.float64)
    if facts["rescaling"]:
        mean = tuple(float(v) for v in -offset / (255.0 * scale))
        std = tuple(float(v) for v in 1.0 / (255.0 * scale))
        pre = f"Rescaling in the model (scale {scale.tolist()}, offset {offset.tolist()} on 0-255 pixels)"
    else:
        mean = std = (0.5, 0.5, 0.5)
        pre = "x / 127.5 - 1 (keras xception.preprocess_input, applied outside the model)"
    return mean, std, pre


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
    bundle, work_mpp = bundle_geometry(out, mpp)

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
    mean, std, pre = _normalisation(facts)
    px = int(facts["input_px"])
    sizes = [int(d["units"]) for d in facts["dense"][:-1]]
    cfg = CellConfig(backbone="xception", heads=(head,), separate=True, crop_px=px,
                     crop_um=round(px * work_mpp, 6), image_mean=mean, image_std=std,
                     head_sizes={head: sizes}, dropout=facts["dropout"] or 0.3)
    model = CellClassifier(cfg)
    copy_backbone(arrays, facts, model.backbones[head], path)
    copy_head(arrays, facts, model.heads[head], positive_class, path)
    check = check_equal(model, child_array(arrays, "check.images", path),
                        child_array(arrays, "check.keras_prob", path), child_array(arrays, "check.keras_logit", path))
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
    bundle = write_cells(out, head, cfg, state, provenance, bundle, work_mpp, area, name, log)
    log(f"  {head}: written to {out} ({time.time() - t0:.0f} s); bundle {bundle.label}, heads {', '.join(bundle.heads)}")
    return {"bundle": str(out), "head": head, "heads": bundle.heads, "check": check, "provenance": provenance}


if __name__ == "__main__":  # the child process of read_in_child
    sys.exit(child_main(sys.argv[1:]))
