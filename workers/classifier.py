"""Cell classifiers: one binary head per finding, on one shared backbone or one backbone per head.

Heads: ``myeloblast``, ``promyelocyte``, ``auer_rod`` by default; ``faggot_cell`` (a bundle of Auer
rods) where the labels have it. Each head is 1-3 fully
connected layers with dropout, as in the paper. Crops have a fixed physical context (``crop_um``
around the cell centre) resized to ``crop_px``, so a cell's size survives (the paper stretched tight
boxes to 299x299, which throws size away).

Crops are cut from pixels of their own resolution (:meth:`CellConfig.cell_mpp`), finer than the
detector's where the crop asks for it: an Auer rod is 0.6-1 µm wide, one pixel at the detector's
0.5 µm/px; the small backbone's 128-pixel crops of 32 µm see it at 0.25 µm/px.

Backbones: ``small`` (a compact CNN for CPUs and the demo) and ``xception`` (layer for layer Keras'
Xception, :mod:`workers.xception`, 299x299 inputs preprocessed like Keras: ``x / 127.5 - 1``).
With ``separate`` each head has its own backbone: the paper's layout of one network per finding
(``wsi-apl bundle import-keras`` builds it from Keras models).

Heads are ``Dropout, [Linear(k), ReLU, Dropout] * len(hidden), Linear(1)``: the hidden sizes are
``head_sizes[head]`` when given (an imported Keras dense stack), else ``head_layers`` times
``head_hidden``. ``forward`` always returns one logit per head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

HEADS = ("myeloblast", "promyelocyte", "auer_rod")
#: Every finding a head can be trained for (faggot_cell: where the labels have it).
KNOWN_HEADS = (*HEADS, "faggot_cell")
CLASSIFIER_BACKBONES = ("small", "xception")
# per backbone: input size and normalisation of [0, 1] pixels (xception: Keras' x / 127.5 - 1)
BACKBONE_DEFAULTS = {
    "small": {"crop_px": 128, "stem": 16, "image_mean": (0.8, 0.7, 0.8), "image_std": (0.2, 0.2, 0.2)},
    "xception": {"crop_px": 299, "stem": 0, "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
}
#: Crops are never cut from pixels finer than this (a 40x scan): finer would only interpolate.
FINEST_CELL_MPP = 0.25


@dataclass
class CellConfig:
    backbone: str = "small"
    heads: tuple[str, ...] = HEADS
    crop_um: float = 32.0          # physical context around the cell centre
    crop_px: int = 0               # network input size; 0: the backbone's (small 128, xception 299)
    width: int = 32                # channels of the first stage (small backbone)
    stem: int = -1                 # small backbone: channels of a stage at the input's full resolution
                                   # before the four stages (0: none, as in bundles before it; -1: default)
    head_layers: int = 1           # hidden layers per head (0-2) before the output
    head_hidden: int = 128
    dropout: float = 0.3
    thresholds: dict = field(default_factory=dict)  # head -> probability threshold (hard counts)
    image_mean: tuple[float, ...] = ()  # empty: the backbone's normalisation of [0, 1] pixels
    image_std: tuple[float, ...] = ()
    separate: bool = False         # one backbone per head (the paper's one network per finding)
    head_sizes: dict = field(default_factory=dict)  # head -> hidden sizes, overriding head_layers x head_hidden
    finest_mpp: float = FINEST_CELL_MPP  # crops are never cut from pixels finer than this
    stain_norm: str = "none"       # crops' colours mapped to the training crops' (workers.stain) before the heads
    stain_target: dict = field(default_factory=dict)  # the fitted reference of stain_norm

    def __post_init__(self):
        if self.backbone not in BACKBONE_DEFAULTS:
            raise ValueError(f"unknown cell backbone {self.backbone!r}; choose one of {', '.join(CLASSIFIER_BACKBONES)}")
        d = BACKBONE_DEFAULTS[self.backbone]
        if not self.crop_px:
            self.crop_px = d["crop_px"]
        if self.stem < 0:
            self.stem = d["stem"]
        self.image_mean = tuple(self.image_mean) or d["image_mean"]
        self.image_std = tuple(self.image_std) or d["image_std"]

    def hidden_sizes(self, head: str) -> list[int]:
        if head in self.head_sizes:
            return [int(k) for k in self.head_sizes[head]]
        return [self.head_hidden] * self.head_layers

    @property
    def crop_mpp(self) -> float:
        return self.crop_um / self.crop_px

    def cell_mpp(self, area_mpp: float) -> float:
        """The pixel size crops are cut from when the detector works at ``area_mpp``: the crop's own
        (not finer than ``finest_mpp``, by default :data:`FINEST_CELL_MPP`), or the detector's where
        that is finer already."""
        return min(float(area_mpp), max(self.crop_mpp, float(self.finest_mpp)))

    def threshold(self, head: str) -> float:
        return float(self.thresholds.get(head, 0.5))

    def to_json(self) -> dict:
        d = asdict(self)
        d["heads"] = list(self.heads)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        d["head_sizes"] = {h: [int(k) for k in v] for h, v in self.head_sizes.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CellConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("heads", "image_mean", "image_std"):
            if k in known:
                known[k] = tuple(known[k])
        known.setdefault("stem", 0)  # bundles written before the stem stage have none
        return cls(**known)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallBackbone(nn.Module):
    """Four conv stages (width, 2w, 4w, 8w), global average and max pooling; with ``stem`` a narrow
    stage first at the input's full resolution, so fine detail (an Auer rod at 0.25 µm/px) is seen at
    about the cost of a crop of half the side."""

    def __init__(self, width: int = 32, stem: int = 0):
        super().__init__()
        w = width
        first = [_block(3, stem), _block(stem, w)] if stem else [_block(3, w)]
        self.stages = nn.Sequential(*first, _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 8 * w))
        self.out_features = 16 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stages(x)
        return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)


class Head(nn.Module):
    """``Dropout, [Linear, ReLU, Dropout] * layers, Linear(1)``; ``sizes`` (hidden sizes) overrides
    ``layers`` x ``hidden``. The Linear layers sit at ``net.1``, ``net.4``, ... (``linear_indices``)."""

    def __init__(self, n_in: int, layers: int, hidden: int, dropout: float, sizes: list[int] | None = None):
        super().__init__()
        sizes = [hidden] * layers if sizes is None else list(sizes)
        mods: list[nn.Module] = [nn.Dropout(dropout)]
        n = n_in
        for k in sizes:
            mods += [nn.Linear(n, k), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            n = k
        mods.append(nn.Linear(n, 1))
        self.net = nn.Sequential(*mods)

    def linear_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.net) if isinstance(m, nn.Linear)]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f).squeeze(1)


def build_backbone(cfg: CellConfig) -> nn.Module:
    """A backbone with an ``out_features`` attribute, mapping normalised images to feature vectors."""
    if cfg.backbone == "xception":
        from .xception import Xception

        return Xception()
    return SmallBackbone(cfg.width, cfg.stem)


class CellClassifier(nn.Module):
    """One binary head per finding on a shared backbone (``backbone``) or, with ``cfg.separate``, on
    its own backbone (``backbones[head]``); ``forward`` returns logits (batch, heads)."""

    def __init__(self, cfg: CellConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.separate:
            self.backbones = nn.ModuleDict({h: build_backbone(cfg) for h in cfg.heads})
            n_in = self.backbones[cfg.heads[0]].out_features if cfg.heads else 0
        else:
            self.backbone = build_backbone(cfg)
            n_in = self.backbone.out_features
        self.heads = nn.ModuleDict({h: Head(n_in, cfg.head_layers, cfg.head_hidden, cfg.dropout,
                                            cfg.hidden_sizes(h)) for h in cfg.heads})
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, 3, crop_px, crop_px) floats in [0, 1]."""
        x = (x - self.mean) / self.std
        if self.cfg.separate:
            return torch.stack([self.heads[h](self.backbones[h](x)) for h in self.cfg.heads], dim=1)
        f = self.backbone(x)
        return torch.stack([self.heads[h](f) for h in self.cfg.heads], dim=1)


def crops_to_tensor(crops: np.ndarray) -> torch.Tensor:
    """(n, h, w, 3) uint8 -> (n, 3, h, w) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div_(255.0)


#: On a CPU a batch is kept to about this many input pixels (one crop of 299x299): larger batches
#: fall out of the caches and run slower per crop. Measured channels-last, one thread: Xception 0.07 s
#: per crop at 4 crops, 0.15 s at 32 (an earlier CPU); on this project's 2-core machine (2026-12-02)
#: Xception 183 -> 146 ms per crop at 4 -> 1 crop, the demo's small heads on 128-px crops 5.5 -> 4.7
#: ms at 21 -> 5 crops per batch.
CPU_BATCH_PIXELS = 299 * 299


def classify(model: CellClassifier, crops: np.ndarray, device: str | torch.device = "cpu",
             batch_size: int = 256) -> np.ndarray:
    """Probabilities (n, heads) for crops (n, crop_px, crop_px, 3) uint8, in batches.

    Crops are stain-normalised first where the heads were trained so (``cfg.stain_norm``).
    ``torch.inference_mode``, channels-last memory (about twice as fast on this project's CPUs and
    on GPUs), bf16 autocast on CUDA; on a CPU the batch is capped by :data:`CPU_BATCH_PIXELS`.
    """
    model.eval()
    if model.cfg.stain_norm != "none":
        from .stain import normalise_crops

        crops = normalise_crops(crops, model.cfg.stain_norm, model.cfg.stain_target)
    dev = torch.device(device)
    model.to(memory_format=torch.channels_last)  # outside inference mode: the weights stay trainable
    with torch.inference_mode():
        return probabilities(model, len(crops), lambda i, j: crops_to_tensor(crops[i:j]).to(dev), dev, batch_size)


def probabilities(model: CellClassifier, n: int, batch, device: torch.device, batch_size: int = 256,
                  amp: bool = True) -> np.ndarray:
    """Probabilities (n, heads) of ``n`` crops, ``batch(i, j)`` giving crops ``i:j`` as (j - i, 3, p, p)
    floats in [0, 1] on ``device``: channels-last, bf16 autocast on CUDA (``amp``), on a CPU batches
    capped by :data:`CPU_BATCH_PIXELS`. Call in inference mode, with the model already channels-last."""
    out = np.zeros((n, len(model.cfg.heads)), np.float32)
    if device.type == "cpu":
        batch_size = max(1, min(batch_size, CPU_BATCH_PIXELS // max(1, model.cfg.crop_px ** 2)))
    for i in range(0, n, batch_size):
        x = batch(i, i + batch_size).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = model(x)
        out[i:i + batch_size] = torch.sigmoid(logits.float()).cpu().numpy()
    return out
