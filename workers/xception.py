"""Xception in torch, layer for layer ``keras.applications.Xception(include_top=False, pooling="avg")``.

Every module is named after the Keras layer it reproduces (``block1_conv1``, ``block2_sepconv1``,
``block2_sepconv1_bn``, ...), so Keras weights map by name. The four 1x1 stride-2 residual
convolutions and their batch norms have no name in Keras (they get counters such as ``conv2d_3``);
here they are ``blockN_res_conv`` / ``blockN_res_bn`` and are found in a Keras model by their
channel count (:data:`RESIDUAL_CHANNELS`).

Faithful to TensorFlow where it matters for equal outputs:

* ``SeparableConv2D`` = depthwise 3x3 (``groups=cin``) then pointwise 1x1, both without bias;
* batch norms use Keras' ``epsilon=1e-3`` (and ``momentum=0.99``, i.e. torch ``momentum=0.01``);
* ``MaxPooling2D(3, strides=2, padding="same")`` pads like TensorFlow: ``pad_total =
  max((ceil(n / s) - 1) * s + k - n, 0)``, ``pad_before = pad_total // 2``, the rest after; for an
  even size that is 0 on top/left and 1 on bottom/right. Padding is ``-inf`` (never the maximum);
* the 3x3 stride-1 'same' separable convolutions pad 1 on every side (symmetric), the two stem
  convolutions are 'valid', the 1x1 stride-2 residual convolutions need no padding.

Parameters: 20,806,952 trainable plus 54,528 batch-norm moving statistics = 20,861,480, Keras'
count for ``Xception(include_top=False)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # torch convention; Keras momentum 0.99
OUT_FEATURES = 2048

# blocks with a 1x1 stride-2 residual convolution (entry flow block2-4, exit flow block13):
# name -> (in, sepconv1 out, sepconv2 out, relu first)
ENTRY_BLOCKS = {
    "block2": (64, 128, 128, False),
    "block3": (128, 256, 256, True),
    "block4": (256, 728, 728, True),
    "block13": (728, 728, 1024, True),
}
RESIDUAL_CHANNELS = {b: spec[2] for b, spec in ENTRY_BLOCKS.items()}  # output channels of each residual conv
MIDDLE_BLOCKS = tuple(f"block{i}" for i in range(5, 13))


def tf_same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding of one axis of size ``n``: (before, after)."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


class MaxPool2dSame(nn.Module):
    """``MaxPooling2D(kernel, strides, padding="same")`` as TensorFlow computes it (asymmetric, -inf padding)."""

    def __init__(self, kernel: int = 3, stride: int = 2):
        super().__init__()
        self.kernel = kernel
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_padding(int(x.shape[-2]), self.kernel, self.stride)
        left, right = tf_same_padding(int(x.shape[-1]), self.kernel, self.stride)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel, self.stride)


class SeparableConv2d(nn.Module):
    """Keras ``SeparableConv2D(cout, 3, padding="same", use_bias=False)``: depthwise then pointwise."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, kernel, padding=kernel // 2, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class Xception(nn.Module):
    """Keras Xception without top, global average pooling: (n, 3, h, w) preprocessed to [-1, 1] -> (n, 2048).

    Input preprocessing (not part of the module) is Keras' ``xception.preprocess_input``:
    ``x / 127.5 - 1`` on 0-255 pixels. Height and width must be at least 71.
    """

    out_features = OUT_FEATURES

    def __init__(self):
        super().__init__()
        self.block1_conv1 = nn.Conv2d(3, 32, 3, stride=2, bias=False)   # 'valid'
        self.block1_conv1_bn = _bn(32)
        self.block1_conv2 = nn.Conv2d(32, 64, 3, bias=False)            # 'valid'
        self.block1_conv2_bn = _bn(64)
        for b, (cin, c1, c2, _) in ENTRY_BLOCKS.items():
            setattr(self, f"{b}_res_conv", nn.Conv2d(cin, c2, 1, stride=2, bias=False))
            setattr(self, f"{b}_res_bn", _bn(c2))
            setattr(self, f"{b}_sepconv1", SeparableConv2d(cin, c1))
            setattr(self, f"{b}_sepconv1_bn", _bn(c1))
            setattr(self, f"{b}_sepconv2", SeparableConv2d(c1, c2))
            setattr(self, f"{b}_sepconv2_bn", _bn(c2))
            setattr(self, f"{b}_pool", MaxPool2dSame(3, 2))
        for b in MIDDLE_BLOCKS:
            for j in (1, 2, 3):
                setattr(self, f"{b}_sepconv{j}", SeparableConv2d(728, 728))
                setattr(self, f"{b}_sepconv{j}_bn", _bn(728))
        self.block14_sepconv1 = SeparableConv2d(1024, 1536)
        self.block14_sepconv1_bn = _bn(1536)
        self.block14_sepconv2 = SeparableConv2d(1536, OUT_FEATURES)
        self.block14_sepconv2_bn = _bn(OUT_FEATURES)

    def _sep(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"{name}_bn")(getattr(self, name)(x))

    def _residual_block(self, b: str, x: torch.Tensor) -> torch.Tensor:
        residual = getattr(self, f"{b}_res_bn")(getattr(self, f"{b}_res_conv")(x))
        if ENTRY_BLOCKS[b][3]:
            x = F.relu(x)  # not in place: the residual branch has read x
        x = F.relu(self._sep(f"{b}_sepconv1", x))
        x = self._sep(f"{b}_sepconv2", x)
        return getattr(self, f"{b}_pool")(x) + residual

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional block's output (``block14_sepconv2_act``), before pooling."""
        x = F.relu(self.block1_conv1_bn(self.block1_conv1(x)))
        x = F.relu(self.block1_conv2_bn(self.block1_conv2(x)))
        for b in ("block2", "block3", "block4"):          # entry flow
            x = self._residual_block(b, x)
        for b in MIDDLE_BLOCKS:                             # middle flow
            residual = x
            x = self._sep(f"{b}_sepconv1", F.relu(x))
            x = self._sep(f"{b}_sepconv2", F.relu(x))
            x = self._sep(f"{b}_sepconv3", F.relu(x))
            x = x + residual
        x = self._residual_block("block13", x)              # exit flow
        x = F.relu(self._sep("block14_sepconv1", x))
        return F.relu(self._sep("block14_sepconv2", x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def keras_name(module_name: str) -> str | None:
    """The Keras layer name of one of :class:`Xception`'s weighted modules (None: an unnamed residual layer)."""
    return None if "_res_" in module_name else module_name


def weighted_modules(model: Xception) -> list[tuple[str, nn.Module]]:
    """(name, module) of every convolution, separable convolution and batch norm."""
    return [(n, m) for n, m in model.named_children() if isinstance(m, (nn.Conv2d, SeparableConv2d, nn.BatchNorm2d))]

