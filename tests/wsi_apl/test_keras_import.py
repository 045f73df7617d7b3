"""Importing Keras Xception classifiers (.keras and legacy .h5) into a bundle, then running them in torch.

TensorFlow is imported by the fixtures only (not at collection, so the rest of the suite runs without it
loaded); the tests are skipped where it is not installed (``pip install -e .[test]`` installs it).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from workers.bundle import load_bundle, save_part
from workers.classifier import CellClassifier, CellConfig, classify
from wsi_apl import keras_import
from wsi_apl.cli import main
from wsi_apl.keras_import import TOLERANCE_PROB, KerasImportError, check_images

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                reason="tensorflow is not installed (pip install 'wsi-apl[keras]')")

ROOT = Path(__file__).resolve().parents[2]
PX = 299
N_IMAGES = 3
keras = None  # set by the keras_mod fixture


@pytest.fixture(scope="module")
def keras_mod():
    global keras
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    return keras


def _bn_layers(model) -> list:
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += _bn_layers(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            out.append(layer)
    return out


def _trained_like_bn(model, x, rng) -> None:
    """Batch-norm statistics as after training (measured on ``x``, so that the random network's features
    depend on its input instead of vanishing), then perturbed, with non-trivial gamma and beta: a wrong
    BN mapping (order, epsilon, transposition) cannot go unnoticed."""
    bns = _bn_layers(model)
    for layer in bns:
        layer.momentum = 0.0
    model(x, training=True)   # moving statistics := this batch's statistics, layer after layer
    for layer in bns:
        layer.momentum = 0.99
        c = int(layer.moving_mean.shape[0])
        var = np.asarray(layer.moving_variance)
        layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        layer.beta.assign(rng.normal(0.0, 0.2, c).astype("float32"))
        layer.moving_mean.assign((np.asarray(layer.moving_mean) + rng.normal(0, 0.2, c) * np.sqrt(var)).astype("float32"))
        layer.moving_variance.assign((var * rng.uniform(0.7, 1.4, c)).astype("float32"))


def _scale_output(model, dense, x) -> None:
    """Rescale the output layer to logits of about [-2, 2] on these images (probabilities neither
    saturated nor constant, so that comparing them means something)."""
    act = dense.activation
    dense.activation = keras.activations.linear
    z0 = np.asarray(model(x, training=False)) - np.asarray(dense.bias)
    dense.activation = act
    centred = z0 - z0.mean(axis=0)
    c = 2.0 / np.maximum(np.abs(centred).max(axis=0), 1e-3 * np.abs(z0).max(axis=0) + 1e-9)
    dense.kernel.assign((np.asarray(dense.kernel) * c).astype("float32"))
    dense.bias.assign((-z0.mean(axis=0) * c).astype("float32"))


def _crops(seed: int) -> np.ndarray:
    return check_images(N_IMAGES, PX, seed)


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory, keras_mod):
    """A: nested Xception + Dense(64, relu) + Dropout + Dense(1, sigmoid), as .keras and legacy .h5.
    B: flat Xception behind a Rescaling layer + Dropout + Dense(2, softmax), as .keras."""
    d = tmp_path_factory.mktemp("keras")
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    x = _crops(1).astype("float32") / 127.5 - 1.0

    base = keras.applications.Xception(weights=None, include_top=False, pooling="avg", input_shape=(PX, PX, 3))
    _trained_like_bn(base, x, rng)
    inp = keras.Input((PX, PX, 3))
    h = keras.layers.Dense(64, activation="relu")(base(inp))
    h = keras.layers.Dropout(0.5)(h)
    out_a = keras.layers.Dense(1, activation="sigmoid", name="myeloblast")(h)
    a = keras.Model(inp, out_a, name="paper_like")
    _scale_output(a, a.get_layer("myeloblast"), x)
    a.save(d / "a.keras")
    a.save(d / "a.h5")  # legacy HDF5 (Keras warns)

    inp = keras.Input((PX, PX, 3))
    r = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inp)
    flat = keras.applications.Xception(weights=None, include_top=False, pooling="avg", input_tensor=r)
    _trained_like_bn(flat, x * 127.5 + 127.5, rng)
    h = keras.layers.Dropout(0.3)(flat.output)
    out_b = keras.layers.Dense(2, activation="softmax", name="promyelocyte")(h)
    b = keras.Model(inp, out_b, name="softmax_flat")
    _scale_output(b, b.get_layer("promyelocyte"), x * 127.5 + 127.5)
    b.save(d / "b.keras")
    return {"dir": d, "a": a, "b": b}


def _keras_probs(models, crops: np.ndarray) -> np.ndarray:
    x = crops.astype("float32")
    pa = np.asarray(models["a"](x / 127.5 - 1.0, training=False))[:, 0]
    pb = np.asarray(models["b"](x, training=False))[:, 1]   # B rescales itself; class 1 is the finding
    return np.stack([pa, pb], axis=1)


def _torch_probs(bundle_dir, crops: np.ndarray) -> tuple[np.ndarray, CellConfig]:
    b = load_bundle(bundle_dir)                                  # verifies the hashes
    cfg = CellConfig.from_json(b.part("cells")["config"])
    model = CellClassifier(cfg)
    model.load_state_dict(b.load_tensors("cells"))
    return classify(model, crops), cfg


def _import(model_file, head, out, *extra):
    return CliRunner().invoke(main, ["bundle", "import-keras", str(model_file), "--head", head, "--out", str(out),
                                     *extra])


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_import_matches_keras(keras_models, tmp_path, fmt):
    src = keras_models["dir"] / f"a.{fmt}"
    r = _import(src, "myeloblast", tmp_path / "bundle", "--trust")
    assert r.exit_code == 0, r.output + r.stderr
    print(r.output)
    crops = _crops(1)   # the images the output layers were scaled on
    p, cfg = _torch_probs(tmp_path / "bundle", crops)
    k = _keras_probs(keras_models, crops)[:, :1]
    diff = float(np.abs(p - k).max())
    print(f"{fmt}: max |p_torch - p_keras| = {diff:.2e} (probabilities {k.min():.3f}-{k.max():.3f})")
    assert diff < TOLERANCE_PROB
    assert 0.02 < k.min() and k.max() < 0.98 and k.max() - k.min() > 0.05  # not saturated, not constant
    assert cfg.backbone == "xception" and cfg.separate and cfg.crop_px == 299 and cfg.heads == ("myeloblast",)
    assert cfg.head_sizes == {"myeloblast": [64]}
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert meta["mpp"] == pytest.approx(0.0668) and meta["heads"] == ["myeloblast"]
    assert meta["parts"]["cells"]["config"]["crop_um"] == pytest.approx(299 * 0.0668)
    prov = meta["parts"]["cells"]["provenance"]["heads"]["myeloblast"]
    assert prov["source"] == f"a.{fmt}" and len(prov["sha256"]) == 64 and prov["keras"] == keras.__version__
    assert prov["check"]["passed"] and prov["check"]["max_abs_diff_prob"] <= prov["check"]["tolerance_prob"]
    assert "max |Δp|" in r.output


def test_second_head_softmax_and_other_parts_kept(keras_models, tmp_path):
    out = tmp_path / "bundle"
    assert _import(keras_models["dir"] / "a.keras", "myeloblast", out, "--trust", "--mpp", "0.1").exit_code == 0
    b = save_part(load_bundle(out), "detector", {"w": torch.zeros(3)}, config={"note": "stand-in"})
    det_sha = b.part("detector")["sha256"]
    r = _import(keras_models["dir"] / "b.keras", "promyelocyte", out, "--trust")
    assert r.exit_code == 0, r.output + r.stderr
    print(r.output)
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["heads"] == ["myeloblast", "promyelocyte"] and meta["mpp"] == pytest.approx(0.1)
    assert meta["parts"]["detector"]["sha256"] == det_sha
    assert set(meta["parts"]["cells"]["provenance"]["heads"]) == {"myeloblast", "promyelocyte"}
    assert meta["parts"]["cells"]["provenance"]["heads"]["promyelocyte"]["positive_class"] == 1
    crops = _crops(1)
    p, cfg = _torch_probs(out, crops)
    assert p.shape == (N_IMAGES, 2) and cfg.head_sizes == {"myeloblast": [64], "promyelocyte": []}
    k = _keras_probs(keras_models, crops)
    diff = np.abs(p - k).max(axis=0)
    print(f"two heads: max |p_torch - p_keras| per head = {diff}")
    assert (diff < TOLERANCE_PROB).all()
    # a different mpp for an existing bundle is refused
    r = _import(keras_models["dir"] / "b.keras", "auer_rod", out, "--trust", "--mpp", "0.2")
    assert r.exit_code == 2 and "0.1 µm/px" in r.stderr


def test_refuses_without_trust(keras_models, tmp_path):
    r = _import(keras_models["dir"] / "a.h5", "myeloblast", tmp_path / "bundle")
    assert r.exit_code == 2
    assert "run code" in r.stderr and "--trust" in r.stderr and "a.h5" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bundle").exists()


def test_model_without_xception_is_refused(keras_mod, tmp_path):
    inp = keras.Input((32, 32, 3))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inp))
    m = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(h))
    m.save(tmp_path / "tiny.keras")
    r = _import(tmp_path / "tiny.keras", "myeloblast", tmp_path / "bundle", "--trust")
    assert r.exit_code == 2 and "no Xception inside" in r.stderr and "tiny.keras" in r.stderr
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    r = _import(tmp_path / "junk.keras", "myeloblast", tmp_path / "bundle", "--trust")
    assert r.exit_code == 2 and "could not read" in r.stderr


def test_parent_process_never_imports_tensorflow(keras_models, tmp_path):
    """The legacy .h5 (whose code Keras runs when loading) is read in a child process: in a fresh Python
    that imports it, neither TensorFlow nor Keras ends up in sys.modules, and the import still checks."""
    code = """
import json, sys
from wsi_apl.keras_import import import_keras
r = import_keras(sys.argv[1], "myeloblast", sys.argv[2], True, log=lambda s: None)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
print(json.dumps({"passed": r["check"]["passed"], "heads": r["heads"], "loaded": loaded}))
"""
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-c", code, str(keras_models["dir"] / "a.h5"), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["loaded"] == [], f"the calling process imported {res['loaded'][:5]}"
    assert res["passed"] and res["heads"] == ["myeloblast"]
    assert load_bundle(out).part("cells")["provenance"]["heads"]["myeloblast"]["keras"] == keras.__version__


def test_child_crash_exit_and_timeout_name_the_model_file(tmp_path, monkeypatch):
    src = tmp_path / "crashy.h5"
    src.write_bytes(b"\x89HDF\r\n\x1a\n")
    out = tmp_path / "bundle"

    def child(code: str):
        monkeypatch.setattr(keras_import, "_child_command", lambda: [sys.executable, "-c", code])

    child("import os, signal, sys; sys.stderr.write('loading the weights\\n'); sys.stderr.flush(); "
          "os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(KerasImportError) as err:
        keras_import.import_keras(src, "myeloblast", out, True, log=lambda s: None)
    msg = str(err.value)
    assert msg.startswith(f"{src}: ") and "SIGSEGV" in msg and "loading the weights" in msg
    assert "nothing was written" in msg
    child("import sys; print('Traceback: boom'); sys.exit(3)")
    with pytest.raises(KerasImportError, match=r"crashy\.h5: .*exit code 3.*boom"):
        keras_import.import_keras(src, "myeloblast", out, True, log=lambda s: None)
    child("import time; time.sleep(60)")
    with pytest.raises(KerasImportError, match=r"crashy\.h5: .*longer than 1 s"):
        keras_import.import_keras(src, "myeloblast", out, True, log=lambda s: None, timeout_s=1)
    assert not out.exists()
