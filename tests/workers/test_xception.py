"""The torch Xception (no TensorFlow needed) and the classifier's xception / separate layouts."""

from __future__ import annotations

import numpy as np
import torch

from workers.classifier import CellClassifier, CellConfig, classify
from workers.xception import (
    RESIDUAL_CHANNELS,
    MaxPool2dSame,
    Xception,
    keras_name,
    tf_same_padding,
    weighted_modules,
)


def keras_parameter_count(model: Xception) -> int:
    """Parameters as Keras counts them: weights plus batch-norm moving mean and variance."""
    n = sum(p.numel() for p in model.parameters())
    n += sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    return n

def test_parameter_count_equals_keras():
    with torch.device("meta"):
        m = Xception()
    # keras.applications.Xception(include_top=False).count_params(): 20,806,952 trainable + 54,528 BN statistics
    assert keras_parameter_count(m) == 20_861_480
    assert sum(p.numel() for p in m.parameters()) == 20_806_952
    names = [n for n, _ in weighted_modules(m)]
    assert len(names) == 2 * 2 + 4 * 2 + 4 * 4 + 8 * 6 + 2 * 2  # stem, residuals, entry/exit, middle, block14
    assert {n for n in names if keras_name(n) is None} == {f"{b}_res_{k}" for b in RESIDUAL_CHANNELS
                                                             for k in ("conv", "bn")}
    assert "block2_sepconv1" in names and "block12_sepconv3_bn" in names and "block14_sepconv2_bn" in names
    bn = dict(weighted_modules(m))["block5_sepconv2_bn"]
    assert bn.eps == 1e-3


def test_output_shape():
    torch.manual_seed(0)
    m = Xception().eval()
    with torch.inference_mode():
        f = m(torch.randn(2, 3, 71, 71))   # 71: Keras' smallest input
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # pooled after a ReLU


def test_tf_same_max_pooling_pads_bottom_right():
    assert tf_same_padding(4, 3, 2) == (0, 1)      # even: nothing before, one after
    assert tf_same_padding(5, 3, 2) == (1, 1)      # odd: symmetric
    assert tf_same_padding(74, 3, 2) == (0, 1) and tf_same_padding(37, 3, 2) == (1, 1)  # sizes at 299 px
    assert tf_same_padding(1, 1, 2) == (0, 0)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = MaxPool2dSame(3, 2)(x)[0, 0]
    # windows are rows/cols 0-2 and 2-3 (+ one padded row/col at the bottom/right)
    assert out.tolist() == [[10.0, 11.0], [14.0, 15.0]]
    # a symmetric padding of 1 (torch's padding=1) would have given other windows
    assert torch.nn.functional.max_pool2d(x, 3, 2, padding=1)[0, 0].tolist() == [[5.0, 7.0], [13.0, 15.0]]
    # the padding is -inf, never the maximum, even when every value is negative
    neg = MaxPool2dSame(3, 2)(-x - 1)[0, 0]
    assert neg.tolist() == [[-1.0, -3.0], [-9.0, -11.0]]


def test_separate_xception_classifier_gives_one_logit_per_head():
    cfg = CellConfig(backbone="xception", heads=("myeloblast", "promyelocyte"), separate=True, crop_px=71,
                     head_sizes={"myeloblast": [16], "promyelocyte": []})
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.5, 0.5, 0.5)
    torch.manual_seed(0)
    model = CellClassifier(cfg).eval()
    assert model.backbones["myeloblast"] is not model.backbones["promyelocyte"]
    keys = model.state_dict().keys()
    assert "backbones.promyelocyte.block1_conv1.weight" in keys and "heads.myeloblast.net.4.weight" in keys
    assert "heads.promyelocyte.net.1.weight" in keys and "heads.promyelocyte.net.4.weight" not in keys
    with torch.inference_mode():
        logits = model(torch.rand(3, 3, 71, 71))
    assert logits.shape == (3, 2)
    p = classify(model, np.random.default_rng(0).integers(0, 255, (3, 71, 71, 3), dtype=np.uint8))
    assert p.shape == (3, 2)
    # the config round-trips through bundle.json
    again = CellConfig.from_json(cfg.to_json())
    assert again == cfg


def test_defaults_and_old_configs_unchanged():
    assert CellConfig().crop_px == 128 and CellConfig().stem == 16 and CellConfig().image_mean == (0.8, 0.7, 0.8)
    assert CellConfig(backbone="xception").crop_px == 299 and CellConfig(backbone="xception").stem == 0
    # crops are cut from pixels as fine as they are, never finer than a 40x scan, never coarser than the detector's
    assert CellConfig().cell_mpp(0.5) == 0.25 and CellConfig(backbone="xception").cell_mpp(0.5) == 0.25
    assert CellConfig(crop_px=64).cell_mpp(0.5) == 0.5 and CellConfig().cell_mpp(0.2) == 0.2
    old = {"backbone": "small", "heads": ["myeloblast", "promyelocyte", "auer_rod"], "crop_um": 32.0, "crop_px": 64,
           "width": 8, "head_layers": 1, "head_hidden": 128, "dropout": 0.3, "thresholds": {"auer_rod": 0.4},
           "image_mean": [0.8, 0.7, 0.8], "image_std": [0.2, 0.2, 0.2], "some_future_key": 1}
    cfg = CellConfig.from_json(old)
    assert cfg.stem == 0 and cfg.crop_px == 64 and cfg.cell_mpp(0.5) == 0.5  # read as before the finer crops
    assert not cfg.separate and cfg.head_sizes == {} and cfg.threshold("auer_rod") == 0.4
    keys = set(CellClassifier(cfg).state_dict())
    # the shared layout's weight names (existing bundles) are unchanged
    assert {"backbone.stages.0.0.weight", "heads.myeloblast.net.1.weight", "heads.auer_rod.net.4.bias", "mean",
            "std"} <= keys
    assert not any(k.startswith("backbones.") for k in keys)
