"""The cell detector: torchvision Faster R-CNN at the bundle's native resolution.

Composed of named parts as in torchvision's ``GeneralizedRCNN``: a backbone with a feature pyramid,
a region proposal network with anchors matched to cell diameters at the bundle's mpp, and RoI
heads. Two differences from torchvision's defaults, both deliberate:

- the input transform never resizes (torchvision shrinks a 2560x1920 area to about 1067x800 by
  default): the model sees the area at the bundle's mpp, pixel for pixel;
- up to ``max_detections`` (default 1000) cells per area instead of 100.

Backbones: ``mobilenet_v3`` (MobileNetV3-Large FPN, strides 8-32, for CPUs and the demo) and
``resnet50_fpn_v2`` (as in the paper). Weights come from the bundle, or start from scratch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from .crops import pixels

BACKBONES = ("mobilenet_v3", "resnet50_fpn_v2")


@dataclass
class DetectorConfig:
    """Everything needed to rebuild the detector (stored in bundle.json)."""

    backbone: str = "mobilenet_v3"
    mpp: float = 0.5               # 1.0 with mpp_known False: sizes below are then in pixels
    mpp_known: bool = True
    fpn_channels: int = 64
    representation: int = 256
    cell_diameters_um: tuple[float, ...] = (6.0, 12.0, 24.0, 48.0)  # anchor sizes per pyramid level
    aspect_ratios: tuple[float, ...] = (0.7, 1.0, 1.4)
    score_threshold: float = 0.5   # a detection counts as a cell at or above this score
    nms_iou: float = 0.3
    max_detections: int = 1000
    border_px: int = 2             # a box this close to the area edge is a cut cell
    image_mean: tuple[float, float, float] = (0.8, 0.7, 0.8)
    image_std: tuple[float, float, float] = (0.2, 0.2, 0.2)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["cell_diameters_um"] = list(self.cell_diameters_um)
        d["aspect_ratios"] = list(self.aspect_ratios)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DetectorConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("cell_diameters_um", "aspect_ratios", "image_mean", "image_std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


class NativeResolutionTransform(GeneralizedRCNNTransform):
    """Normalise and batch, but never resize: the model works at the bundle's mpp, pixel for pixel."""

    def resize(self, image, target=None):
        return image, target


def _mobilenet_fpn(cfg: DetectorConfig) -> BackboneWithFPN:
    from torchvision.models import mobilenet_v3_large

    body = mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d).features
    stage = [0] + [i for i, b in enumerate(body) if getattr(b, "_is_cn", False)] + [len(body) - 1]
    chosen = [stage[2], stage[3], stage[4]]  # output strides 8, 16, 32
    return_layers = {str(i): str(k) for k, i in enumerate(chosen)}
    in_channels = [body[i].out_channels for i in chosen]
    return BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels)


def build_detector(cfg: DetectorConfig) -> FasterRCNN:
    """A Faster R-CNN for one class ("cell") with anchors in µm converted to pixels at ``cfg.mpp``."""
    if cfg.backbone == "mobilenet_v3":
        backbone = _mobilenet_fpn(cfg)
        n_maps = 4  # three pyramid levels + max-pool level
        feat_names = ["0", "1", "2"]
        box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation)
        predictor = FastRCNNPredictor(cfg.representation, 2)
    elif cfg.backbone == "resnet50_fpn_v2":
        from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

        ref = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=2)
        backbone = ref.backbone
        n_maps = 5
        feat_names = ["0", "1", "2", "3"]
        box_head = ref.roi_heads.box_head
        predictor = ref.roi_heads.box_predictor
    else:
        raise ValueError(f"unknown detector backbone {cfg.backbone!r}; choose one of {', '.join(BACKBONES)}")
    diam = list(cfg.cell_diameters_um)
    while len(diam) < n_maps:
        diam.append(diam[-1] * 2)
    sizes = tuple((max(4.0, d / cfg.mpp),) for d in diam[:n_maps])
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(cfg.aspect_ratios),) * n_maps)
    model = FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(feat_names, 7, 2), box_head=box_head, box_predictor=predictor,
        rpn_pre_nms_top_n_train=4000, rpn_post_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=4000, rpn_post_nms_top_n_test=2000,
        box_batch_size_per_image=512, box_score_thresh=0.05, box_nms_thresh=cfg.nms_iou,
        box_detections_per_img=cfg.max_detections,
    )
    model.transform = NativeResolutionTransform(min_size=1, max_size=1, image_mean=list(cfg.image_mean),
                                                image_std=list(cfg.image_std))
    return model


def capacity(cfg: DetectorConfig, shape: tuple[int, int]) -> int:
    """Most cells an image of ``shape`` (h, w) can hold: ``cfg.max_detections``, or more for a picture
    larger than an area, at one cell per (1.5 x a typical cell diameter)² of it."""
    pitch = 1.5 * cfg.cell_diameters_um[min(1, len(cfg.cell_diameters_um) - 1)] / cfg.mpp
    return max(cfg.max_detections, int(shape[0] * shape[1] / max(pitch * pitch, 1.0)))


def set_capacity(model: FasterRCNN, cfg: DetectorConfig, shape: tuple[int, int]) -> None:
    """Let the RPN proposals and the detections per image grow with a large picture's capacity."""
    n = capacity(cfg, shape)
    model.roi_heads.detections_per_img = n
    model.rpn._pre_nms_top_n["testing"] = max(4000, 4 * n)
    model.rpn._post_nms_top_n["testing"] = max(2000, 2 * n)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(h, w, 3) uint8 -> (3, h, w) float in [0, 1]."""
    return pixels(image).float().div_(255.0)


def detections(out: dict, shape: tuple[int, int], cfg: DetectorConfig, score_threshold: float | None = None,
               limit: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes, scores, cut)`` of one image's Faster R-CNN output: the detections at or above the
    score threshold (``limit`` > 0: at most that many, best first, as torchvision sorts them), on
    the host as float32, and whether each box touches the border of an image of ``shape`` (h, w)."""
    thr = cfg.score_threshold if score_threshold is None else score_threshold
    keep = out["scores"] >= thr
    if limit:
        keep &= torch.arange(len(keep), device=keep.device) < limit
    boxes = out["boxes"][keep].float().cpu().numpy().astype(np.float32)
    scores = out["scores"][keep].float().cpu().numpy().astype(np.float32)
    h, w = shape[:2]
    b = cfg.border_px
    cut = (boxes[:, 0] <= b) | (boxes[:, 1] <= b) | (boxes[:, 2] >= w - b) | (boxes[:, 3] >= h - b)
    return boxes, scores, cut


@torch.inference_mode()
def detect(model: FasterRCNN, image: np.ndarray, cfg: DetectorConfig, device: str | torch.device = "cpu",
           score_threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells in an area image.

    Returns ``(boxes, scores, cut)``: boxes (n, 4) float32 in area pixels ``x0, y0, x1, y1``,
    detector scores (n,), and whether each box touches the area border (a cell cut by the edge).
    """
    model.eval()
    set_capacity(model, cfg, image.shape[:2])
    x = to_tensor(image).to(device)
    use_amp = torch.device(device).type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        out = model([x])[0]
    return detections(out, image.shape, cfg, score_threshold)
