"""Builders for Faster/Mask/Grid R-CNN with baseline or GRoIE RoI extraction, optionally GC-Net.

The detectors are torchvision's own :class:`~torchvision.models.detection.FasterRCNN` and
:class:`~torchvision.models.detection.MaskRCNN`, and :class:`~groie_triton.detection.grid.GridRCNN` (torchvision's
Faster R-CNN with mmdetection's Grid R-CNN RoI head); only three things are chosen here:

* the backbone: a ResNet (resnet18 by default, random init: nothing can be downloaded here) with an FPN
  (P2-P5 plus the max-pooled P6 that only the RPN sees), with a configurable normalisation layer;
* the RoI extraction: ``"baseline"`` is torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign` (one FPN
  level per RoI), ``"groie"`` is :class:`groie_triton.extractor.GRoIEPooler` (GenericRoIExtractor behind
  torchvision's pooler interface) with the paper's box (7x7) and mask (14x14) configs (all levels, shared 5x5
  pre-conv, sum, GeneralizedAttention "0100" post-module); the 14x14 one is the mask extractor of Mask R-CNN
  and the grid extractor of Grid R-CNN;
* GC-Net: a :class:`ContextBlock` after the last conv (and its norm) of every residual block of c3-c5.

The images here are small (128-256 px instead of COCO's ~800), so anchors and the baseline's level mapping
are scaled with the image size (see :class:`ModelConfig`); otherwise every RoI would map to P2.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from groie_triton.detection.grid import GRID_NMS_THRESH, ClassOnlyPredictor, GridHead, GridRCNN

__all__ = [
    "BACKBONES",
    "EXTRACTORS",
    "MODELS",
    "MODEL_BUILDERS",
    "NORMS",
    "ContextBlock",
    "ModelConfig",
    "build_model",
    "model_config_from_dict",
]

# MODELS (the detector names) is defined with MODEL_BUILDERS below.
EXTRACTORS = ("baseline", "groie")
BACKBONES = ("resnet18", "resnet34", "resnet50")
NORMS = ("gn", "bn", "frozen_bn")
FEATMAP_NAMES = ["0", "1", "2", "3"]
# COCO images are about 800 px on the short side; torchvision's anchors and level mapping are tuned for it.
_COCO_IMAGE_SIZE = 800


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint.

    ``num_classes`` counts the background. ``image_size`` is both the resize target of torchvision's
    transform (min_size = max_size) and the scale reference for ``anchor_sizes`` (default: 8 * 2^level
    times image_size / 256 for P2-P6) and the baseline's ``canonical_scale`` (default: 224 scaled from COCO's
    800 px to ``image_size``, so the FPN paper's mapping sends the dataset's objects to every level).
    ``fpn_channels`` is the FPN width (the paper: 256); the GRoIE pre/post modules use the same width.
    ``box_nms_thresh`` None means the detector's default: torchvision's 0.5, mmdetection's 0.3 for Grid R-CNN.
    ``grid_point_channels`` (Grid R-CNN: channels per grid point, a multiple of 4 because the head's GroupNorm
    has 36 groups over 9 points) None means ``fpn_channels / 4`` (the paper's 64 for 256) rounded to a
    multiple of 4; ``grid_dilation`` is the dilation of the grid head's stride-1 convs (mmdetection: 1).
    These two defaults are resolved when the model is built (:meth:`nms_thresh`, :meth:`point_channels`),
    so a config whose ``model`` or ``fpn_channels`` is overridden gets the defaults of the new values.
    """

    model: str = "mask_rcnn"
    extractor: str = "baseline"
    backbone: str = "resnet18"
    gcnet: bool = False
    norm: str = "gn"
    num_classes: int = 5
    image_size: int = 256
    fpn_channels: int = 256
    anchor_sizes: tuple[int, ...] | None = None
    canonical_scale: int | None = None
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    representation_size: int = 1024
    mask_head_channels: int = 256
    box_nms_thresh: float | None = None
    grid_point_channels: int | None = None
    grid_dilation: int = 1

    def __post_init__(self) -> None:
        for name, allowed in (
            ("model", MODELS),
            ("extractor", EXTRACTORS),
            ("backbone", BACKBONES),
            ("norm", NORMS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; available: {', '.join(allowed)}")
        if self.anchor_sizes is None:
            base = 8 * max(1.0, self.image_size / 256)
            self.anchor_sizes = tuple(int(round(base * 2**i)) for i in range(5))
        self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per level P2-P6, got {self.anchor_sizes}")
        if self.canonical_scale is None:
            self.canonical_scale = max(1, int(round(224 * self.image_size / _COCO_IMAGE_SIZE)))
        if self.box_nms_thresh is not None and not 0 < self.box_nms_thresh <= 1:
            raise ValueError(f"box_nms_thresh must be in (0, 1], got {self.box_nms_thresh}")
        if self.grid_point_channels is not None and (self.grid_point_channels <= 0 or self.grid_point_channels % 4):
            raise ValueError(f"grid_point_channels must be a positive multiple of 4, got {self.grid_point_channels}")
        if self.grid_dilation < 1:
            raise ValueError(f"grid_dilation must be at least 1, got {self.grid_dilation}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def nms_thresh(self) -> float:
        """The per-class NMS IoU threshold of the detections: ``box_nms_thresh`` or the detector's default."""
        if self.box_nms_thresh is not None:
            return self.box_nms_thresh
        return GRID_NMS_THRESH if self.model == "grid_rcnn" else 0.5

    def point_channels(self) -> int:
        """Grid R-CNN's channels per grid point: ``grid_point_channels`` or ``fpn_channels / 4`` (multiple of 4)."""
        if self.grid_point_channels is not None:
            return self.grid_point_channels
        return max(4, 4 * round(self.fpn_channels / 16))


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a :class:`ModelConfig` from :meth:`ModelConfig.to_dict`; unknown keys raise ValueError."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
    return ModelConfig(**data)


class ContextBlock(nn.Module):
    """Global context block of GCNet (Cao et al., 2019) with attention pooling and channel-add fusion.

    Context modelling: a 1x1 conv gives one logit per position, softmax over all H*W positions, and the
    attention-weighted sum of the features is a [N, C, 1, 1] context vector. Transform: a bottleneck
    1x1 conv (C -> ratio * C), LayerNorm, ReLU, 1x1 conv back to C. Fusion: the result is broadcast-added to
    every position. The last conv starts at zero, so a freshly inserted block is the identity.
    Input and output [N, C, H, W].
    """

    def __init__(self, channels: int, ratio: float = 1.0 / 4) -> None:
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.attention_logits = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.attention_logits.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.attention_logits.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        weights = self.attention_logits(x).reshape(n, h * w, 1).softmax(dim=1)
        context = torch.bmm(x.reshape(n, c, h * w), weights).reshape(n, c, 1, 1)
        return x + self.transform(context)


def _norm_layer(kind: str):
    if kind == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    if kind == "bn":
        return nn.BatchNorm2d
    return FrozenBatchNorm2d


def _add_context_blocks(resnet: nn.Module) -> None:
    """Put a ContextBlock after the last conv + norm of every residual block of layer2-4 (c3-c5)."""
    for stage in (resnet.layer2, resnet.layer3, resnet.layer4):
        for block in stage:
            last = "bn3" if hasattr(block, "bn3") else "bn2"
            norm = getattr(block, last)
            channels = norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features
            setattr(block, last, nn.Sequential(OrderedDict(norm=norm, context=ContextBlock(channels))))


def _backbone(cfg: ModelConfig) -> BackboneWithFPN:
    resnet = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=_norm_layer(cfg.norm))
    if cfg.gcnet:
        _add_context_blocks(resnet)
    widths = [resnet.layer1[-1].conv1.in_channels * (2**i) for i in range(4)]
    if cfg.backbone == "resnet50":
        widths = [256, 512, 1024, 2048]
    return BackboneWithFPN(
        resnet,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=widths,
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _poolers(cfg: ModelConfig) -> tuple[MultiScaleRoIAlign, MultiScaleRoIAlign]:
    if cfg.extractor == "groie":
        from groie_triton.extractor import GRoIEPooler

        return (
            GRoIEPooler.from_paper(FEATMAP_NAMES, kind="bbox", channels=cfg.fpn_channels),
            GRoIEPooler.from_paper(FEATMAP_NAMES, kind="mask", channels=cfg.fpn_channels),
        )
    return tuple(
        MultiScaleRoIAlign(FEATMAP_NAMES, output_size=size, sampling_ratio=2, canonical_scale=cfg.canonical_scale)
        for size in (7, 14)
    )


def _faster_rcnn(
    cfg: ModelConfig, backbone: BackboneWithFPN, fine_pool: nn.Module, common: dict[str, Any]
) -> FasterRCNN:
    return FasterRCNN(backbone, **common)


def _mask_rcnn(cfg: ModelConfig, backbone: BackboneWithFPN, fine_pool: nn.Module, common: dict[str, Any]) -> MaskRCNN:
    m = cfg.mask_head_channels
    return MaskRCNN(
        backbone,
        mask_roi_pool=fine_pool,
        mask_head=MaskRCNNHeads(cfg.fpn_channels, (m, m, m, m), 1),
        mask_predictor=MaskRCNNPredictor(m, m, cfg.num_classes),
        **common,
    )


def _grid_rcnn(cfg: ModelConfig, backbone: BackboneWithFPN, fine_pool: nn.Module, common: dict[str, Any]) -> GridRCNN:
    # mmdetection's Grid R-CNN box branch only classifies: the shared FastRCNNPredictor is replaced.
    kwargs = {k: v for k, v in common.items() if k != "box_predictor"}
    return GridRCNN(
        backbone,
        grid_roi_pool=fine_pool,
        grid_head=GridHead(cfg.fpn_channels, point_feat_channels=cfg.point_channels(), dilation=cfg.grid_dilation),
        box_predictor=ClassOnlyPredictor(cfg.representation_size, cfg.num_classes),
        **kwargs,
    )


# One builder per detector, called as builder(config, FPN backbone, 14x14 RoI pooler, common) where common
# holds the torchvision keyword arguments every detector shares (transform, RPN, 7x7 box pooler, box head
# and predictor). ModelConfig.model and the CLI's --model choices are the keys: a new detector is one entry.
MODEL_BUILDERS: dict[str, Callable[..., FasterRCNN]] = {
    "faster_rcnn": _faster_rcnn,
    "mask_rcnn": _mask_rcnn,
    "grid_rcnn": _grid_rcnn,
}
MODELS = tuple(MODEL_BUILDERS)


def build_model(cfg: ModelConfig | None = None, **overrides: Any) -> FasterRCNN:
    """Build a randomly initialised detector from a :class:`ModelConfig` (keyword overrides allowed).

    Returns a torchvision FasterRCNN (``model="faster_rcnn"``), MaskRCNN (``"mask_rcnn"``) or a GridRCNN
    (``"grid_rcnn"``, a FasterRCNN subclass) whose 7x7 box and 14x14 mask / grid RoI poolers are the baseline
    or GRoIE ones. Raises ValueError for unknown model, extractor, backbone or norm names; ImportError if
    ``extractor="groie"`` and :mod:`groie_triton.extractor` is absent.
    """
    base = cfg.to_dict() if cfg is not None else {}
    cfg = model_config_from_dict({**base, **overrides})
    # Creation order = parameter initialisation order under a seed: backbone, both poolers, heads.
    backbone = _backbone(cfg)
    box_pool, fine_pool = _poolers(cfg)
    c = cfg.fpn_channels
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in cfg.anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes)
    )
    common = dict(
        min_size=cfg.image_size,
        max_size=cfg.image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(c * 7 * 7, cfg.representation_size),
        box_predictor=FastRCNNPredictor(cfg.representation_size, cfg.num_classes),
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.nms_thresh(),
    )
    model = MODEL_BUILDERS[cfg.model](cfg, backbone, fine_pool, common)
    model.config = cfg
    return model
