"""GRoIE as detection users configure it: mmdetection's GenericRoIExtractor and a torchvision pooler.

GRoIE (Rossi, Karimi, Prati, ICPR 2020) pools every RoI from every pyramid level, runs a shared pre-module
on each level's RoI features, aggregates the levels (sum or concat) and runs a post-module:

    out = post( sum_l pre( roi_align(feats[l], rois, scale=1/stride_l) ) )        (aggregation="sum")

This module builds that layer from mmdetection's config dicts (so GRoIE checkpoints load with
``strict=True``) and runs it on the fused ops instead of mmdetection's per-level loop:

- no pre-module: one :func:`~groie_triton.ops.multilevel_roi_align` launch with the sum (or concat) fused;
- a shared :class:`ConvModule` pre-module: one ``"stack"`` launch, the conv (and a per-sample norm) run ONCE
  over all L*K RoI features as one batch, then one fused activation + level-sum pass
  (:func:`groie_triton.ops.level_sum_act`), forward and backward;
- any other pre-module: one ``"stack"`` launch, then the module on each level.

The results are those of mmdetection's loop. A norm whose output depends on the batch (BatchNorm in
training mode, an InstanceNorm that tracks running statistics in training mode) is run level by level, as
the loop runs it, so its statistics and running-stat updates are the loop's too. The mmcv building blocks
(ConvModule, the cfg builders) live in :mod:`groie_triton.bricks` and are re-exported here.

As mmdetection's GenericRoIExtractor, :class:`GenericRoIExtractor` pools from the levels it is given (the
first ``len(feats)`` strides) and returns ``[0, out_channels, h, w]`` for no RoIs. Deliberate differences:

- one feature level runs the whole pipeline (pre-module, aggregation, post-module, roi_scale_factor), where
  mmdetection returns the bare RoIAlign output, so the modules' parameters are always used;
- no RoIs give zeros that depend on every parameter (a zero gradient each, so DistributedDataParallel does
  not wait for gradients that never come), where mmdetection's zeros are outside the graph; the inputs are
  checked as for K > 0, where mmdetection returns before looking at them;
- bad arguments raise ValueError naming the argument where mmdetection asserts (AssertionError, gone under
  ``python -O``): an unknown aggregation, concat channels that do not add up to ``out_channels`` (checked at
  construction over all ``featmap_strides`` when the pre-module's output channels are known); more feature
  levels than strides are a ValueError too (an IndexError in mmdetection).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torchvision.ops import MultiScaleRoIAlign as _TorchvisionMultiScaleRoIAlign

from groie_triton.bricks import ConvModule, build_plugin, build_roi_layers
from groie_triton.ops import MAX_LEVELS, boxes_to_rois, level_sum_act, multilevel_roi_align
from groie_triton.ops._checks import check_features
from groie_triton.poolers import infer_scales, select_features

__all__ = [
    "ConvModule",
    "GenericRoIExtractor",
    "GRoIEPooler",
    "build_roi_layers",
    "build_plugin",
    "groie_paper_cfg",
]

GROIE_AGGREGATIONS = ("sum", "concat")
"""What a GRoIE layer accepts: a subset of :data:`groie_triton.ops.AGGREGATIONS` (no "stack")."""


def groie_paper_cfg(kind: str = "bbox", channels: int = 256) -> dict:
    """Keyword arguments of :class:`GenericRoIExtractor` for the GRoIE paper's configs.

    ``kind="bbox"``: 7x7 RoIs; ``kind="mask"``: 14x14. Both: RoIAlign with sampling_ratio 2 and aligned,
    strides (4, 8, 16, 32), sum aggregation, a 5x5 ConvModule pre-module (padding 2, ReLU) and a
    GeneralizedAttention post-module ('0100', 6 heads, kv_stride 2, no spatial range), all ``channels`` wide.
    """
    sizes = {"bbox": 7, "mask": 14}
    if kind not in sizes:
        raise ValueError(f"kind must be 'bbox' or 'mask', got {kind!r}")
    return dict(
        roi_layer=dict(type="RoIAlign", output_size=sizes[kind], sampling_ratio=2, aligned=True),
        out_channels=channels,
        featmap_strides=[4, 8, 16, 32],
        aggregation="sum",
        pre_cfg=dict(type="ConvModule", in_channels=channels, out_channels=channels, kernel_size=5, padding=2,
                     inplace=False),
        post_cfg=dict(type="GeneralizedAttention", in_channels=channels, spatial_range=-1, num_heads=6,
                      attention_type="0100", kv_stride=2),
    )


# ------------------------------------------------------------------------------------------ the layer
def _build_pre_post(module: nn.Module, pre_cfg, post_cfg) -> None:
    """Set with_pre / with_post and build pre_module / post_module as mmdetection's GenericRoIExtractor does.

    Built in mmdetection's order (post first), so state_dict keys come out in the same order.
    """
    module.with_post = post_cfg is not None
    module.with_pre = pre_cfg is not None
    if module.with_post:
        module.post_module = build_plugin(post_cfg, "post_cfg")
    if module.with_pre:
        module.pre_module = build_plugin(pre_cfg, "pre_cfg")


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in GROIE_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {GROIE_AGGREGATIONS}, got {aggregation!r}")


def _norm_is_per_sample(norm: nn.Module) -> bool:
    """True when the norm treats each sample alone, so one batch of all levels equals one call per level."""
    if isinstance(norm, nn.GroupNorm):
        return True
    if isinstance(norm, _InstanceNorm):
        # Instance statistics are per sample; only the running-stat update (training) sees the batch.
        return not (norm.training and norm.track_running_stats)
    if isinstance(norm, _BatchNorm):
        return not norm.training and norm.running_mean is not None
    return False


def _fused_activation(pre: ConvModule) -> tuple[str, float] | None:
    """(activation, negative_slope) the level-sum kernel applies for ``pre``, or None if it cannot."""
    if not pre.with_activation:
        return "none", 0.0
    if type(pre.activate) is nn.ReLU:
        return "relu", 0.0
    if type(pre.activate) is nn.LeakyReLU:
        return "leaky_relu", float(pre.activate.negative_slope)
    return None


def _pre_on_stack(pre: nn.Module, stacked: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Aggregate ``pre`` applied to every level of ``stacked`` [L, K, C, h, w]."""
    num_levels, num_rois = stacked.shape[:2]
    if not (isinstance(pre, ConvModule) and pre.order == ("conv", "norm", "act")):
        levels = [pre(level) for level in stacked.unbind(0)]
        if aggregation == "concat":
            return torch.cat(levels, dim=1)
        out = levels[0]
        for level in levels[1:]:
            out = out + level
        return out

    y = pre.conv(stacked.flatten(0, 1))
    if pre.with_norm:
        if _norm_is_per_sample(pre.norm):
            y = pre.norm(y)
        else:
            y = torch.cat([pre.norm(level) for level in y.split(num_rois)])
    fused = _fused_activation(pre) if aggregation == "sum" else None
    if fused is not None:
        return level_sum_act(y.unflatten(0, (num_levels, num_rois)), *fused)
    if pre.with_activation:
        y = pre.activate(y)
    y = y.unflatten(0, (num_levels, num_rois))
    if aggregation == "concat":
        return y.transpose(0, 1).flatten(1, 2)
    return y.sum(0)


def _aggregated_channels(pre: nn.Module | None, channels: int) -> int:
    return getattr(pre, "out_channels", channels) if pre is not None else channels


def _empty_result(module: nn.Module, feats: Sequence[torch.Tensor], channels: int,
                  output_size: tuple[int, int]) -> torch.Tensor:
    """[0, channels, h, w] zeros that still depend on every parameter and feature map.

    Backward then gives every parameter a (zero) gradient, so DistributedDataParallel does not wait for
    gradients that never come. Empty slices carry the dependency without reading any data.
    """
    out = feats[0].new_zeros((0, channels, *output_size))
    anchors = [p.reshape(-1)[:0].sum() for p in module.parameters() if p.requires_grad]
    anchors += [f.reshape(-1)[:0].sum() for f in feats if f.requires_grad]
    for anchor in anchors:
        out = out + anchor
    return out


def _groie(feats: Sequence[torch.Tensor], rois: torch.Tensor, output_size: tuple[int, int],
           scales: Sequence[float], sampling_ratio: int, aligned: bool, aggregation: str,
           pre: nn.Module | None, post: nn.Module | None) -> torch.Tensor:
    """GRoIE on K >= 1 RoIs: fused pooling, shared pre-module, aggregation, post-module."""
    if pre is None:
        out = multilevel_roi_align(feats, rois, output_size, scales, sampling_ratio, aligned, aggregation)
    else:
        stacked = multilevel_roi_align(feats, rois, output_size, scales, sampling_ratio, aligned, "stack")
        out = _pre_on_stack(pre, stacked, aggregation)
    if post is not None:
        out = post(out)
    return out


def _check_pre_channels(pre: nn.Module | None, channels: int, key: str) -> None:
    expected = getattr(pre, "in_channels", channels) if pre is not None else channels
    if expected != channels:
        raise ValueError(f"{key}['in_channels'] is {expected} but the feature maps have {channels} channels")


class GenericRoIExtractor(nn.Module):
    """mmdetection's GenericRoIExtractor (GRoIE), on the fused multi-level kernels.

    Args:
        roi_layer: ``dict(type="RoIAlign", output_size, sampling_ratio=0, aligned=True)`` (mmcv's defaults).
        out_channels: channels of the output: the aggregated channels for ``"sum"``, L x those for
            ``"concat"``.
        featmap_strides: stride of each level (``spatial_scale = 1 / stride``), finest first.
        aggregation: ``"sum"`` or ``"concat"`` (levels on channels, level 0 first).
        pre_cfg: None, an ``nn.Module``, or ``dict(type="ConvModule" | "GeneralizedAttention", ...)``: one
            module shared by all levels, applied to each level's RoI features.
        post_cfg: None, an ``nn.Module`` or such a dict: applied to the aggregated features.
        finest_scale: kept for mmdetection's RoI-extractor signature; GRoIE pools every RoI from every
            level, so no RoI-to-level mapping uses it.

    Given fewer feature levels than ``featmap_strides``, it pools from those (the finest strides), as
    mmdetection does. Deliberate differences from mmdetection v3 are listed in the module docstring (one
    level runs the whole pipeline; errors are ValueErrors; no RoIs give zeros inside the autograd graph).

    ``state_dict`` keys are mmdetection's: ``pre_module.conv.weight``, ``pre_module.conv.bias``,
    ``post_module.query_conv.weight``, ... (the RoI layers hold no state), so a GRoIE checkpoint's
    ``roi_head.bbox_roi_extractor.*`` entries load with ``strict=True``.

    Raises:
        ValueError: unknown aggregation or cfg type (the message names the key), ``out_channels`` that the
            pre-module's output cannot give (``L * channels`` for concat), a post-module built for other
            channels. TypeError: cfg arguments the type does not take.
    """

    def __init__(
        self,
        roi_layer: Mapping,
        out_channels: int,
        featmap_strides: Sequence[int],
        aggregation: str = "sum",
        pre_cfg: Mapping | nn.Module | None = None,
        post_cfg: Mapping | nn.Module | None = None,
        finest_scale: int = 56,
    ) -> None:
        super().__init__()
        _check_aggregation(aggregation)
        featmap_strides = list(featmap_strides)
        if not featmap_strides or not all(s > 0 for s in featmap_strides):
            raise ValueError(f"featmap_strides must be non-empty and positive, got {featmap_strides}")
        self.roi_layers = build_roi_layers(roi_layer, featmap_strides)
        self.out_channels = out_channels
        self.featmap_strides = featmap_strides
        self.finest_scale = finest_scale
        self.aggregation = aggregation
        _build_pre_post(self, pre_cfg, post_cfg)

        pre_out = getattr(self.pre_module, "out_channels", None) if self.with_pre else None
        if pre_out is not None:
            produced = pre_out * len(featmap_strides) if aggregation == "concat" else pre_out
            if produced != out_channels:
                raise ValueError(
                    f"out_channels is {out_channels} but the pre-module gives {pre_out} channels per level"
                    + (f", so concat over {len(featmap_strides)} levels gives {produced}"
                       if aggregation == "concat" else "")
                )
        post_in = getattr(self.post_module, "in_channels", None) if self.with_post else None
        if post_in is not None and post_in != out_channels:
            raise ValueError(f"post_cfg['in_channels'] is {post_in} but out_channels is {out_channels}")

    @property
    def num_inputs(self) -> int:
        """Number of feature levels with a stride (mmdetection's name); forward also takes fewer."""
        return len(self.featmap_strides)

    @property
    def output_size(self) -> tuple[int, int]:
        return tuple(self.roi_layers[0].output_size)

    def roi_rescale(self, rois: torch.Tensor, scale_factor: float) -> torch.Tensor:
        """Scale each RoI about its centre by ``scale_factor`` (width and height); [K, 5] -> [K, 5]."""
        cx = (rois[:, 1] + rois[:, 3]) * 0.5
        cy = (rois[:, 2] + rois[:, 4]) * 0.5
        half_w = (rois[:, 3] - rois[:, 1]) * scale_factor * 0.5
        half_h = (rois[:, 4] - rois[:, 2]) * scale_factor * 0.5
        return torch.stack((rois[:, 0], cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)

    def forward(self, feats: Sequence[torch.Tensor], rois: torch.Tensor,
                roi_scale_factor: float | None = None) -> torch.Tensor:
        """GRoIE features of each RoI.

        Args:
            feats: L feature maps ``[N, C, H_l, W_l]``, 1 <= L <= ``len(featmap_strides)``; level l has
                stride ``featmap_strides[l]`` (mmdetection's ``roi_layers[:L]``).
            rois: ``[K, 5]`` rows ``(batch index, x1, y1, x2, y2)`` in image coordinates.
            roi_scale_factor: when given, every RoI is scaled about its centre first.

        Returns:
            ``[K, out_channels, h, w]`` in the features' dtype. K = 0 gives zeros of that shape that still
            depend on every parameter (a zero gradient each), so DDP does not hang.

        Raises:
            ValueError: more levels than ``featmap_strides``, channels that do not match the pre-module or
            ``out_channels`` (for concat: L x the per-level channels).
        """
        feats = check_features(feats, "feats", MAX_LEVELS)
        if len(feats) > len(self.featmap_strides):
            raise ValueError(
                f"featmap_strides has {len(self.featmap_strides)} entries but feats has {len(feats)} levels"
            )
        channels = feats[0].shape[1]
        pre = self.pre_module if self.with_pre else None
        _check_pre_channels(pre, channels, "pre_cfg")
        produced = _aggregated_channels(pre, channels)
        if self.aggregation == "concat":
            produced *= len(feats)
        if produced != self.out_channels:
            concat = self.aggregation == "concat"
            detail = f" ({len(feats)} levels x {produced // len(feats)})" if concat else ""
            raise ValueError(
                f"out_channels is {self.out_channels} but {self.aggregation} aggregation gives {produced} "
                f"channels{detail}"
            )
        if rois.shape[0] == 0:
            return _empty_result(self, feats, self.out_channels, self.output_size)
        if roi_scale_factor is not None:
            rois = self.roi_rescale(rois, roi_scale_factor)
        layer = self.roi_layers[0]
        return _groie(
            feats, rois, self.output_size, [1.0 / s for s in self.featmap_strides[: len(feats)]], layer.sampling_ratio,
            layer.aligned, self.aggregation, pre, self.post_module if self.with_post else None,
        )


class GRoIEPooler(_TorchvisionMultiScaleRoIAlign):
    """GRoIE with torchvision's MultiScaleRoIAlign interface, for FasterRCNN / MaskRCNN.

    ``FasterRCNN(..., box_roi_pool=GRoIEPooler(...))`` and ``MaskRCNN(..., mask_roi_pool=...)`` accept it
    (it subclasses ``torchvision.ops.MultiScaleRoIAlign``). Every RoI is pooled from every level of
    ``featmap_names`` (scales inferred from the image sizes as torchvision does), then the shared pre-module,
    the aggregation and the post-module run as in :class:`GenericRoIExtractor`.

    Args:
        featmap_names: names of the feature maps to pool from, finest first.
        output_size: int or (h, w). sampling_ratio: samples per bin per axis (<= 0: adaptive).
        aggregation: ``"sum"`` or ``"concat"`` (the box head then sees L x channels).
        pre_cfg, post_cfg: as for :class:`GenericRoIExtractor` (cfg dicts or modules); ``pre_module`` and
            ``post_module`` in the state_dict.
        aligned: half-pixel-corrected RoIAlign (GRoIE's choice; torchvision's MultiScaleRoIAlign uses False).

    forward(x, boxes, image_shapes) -> ``[K, C_out, h, w]`` with K the total number of boxes.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size,
        sampling_ratio: int,
        *,
        aggregation: str = "sum",
        pre_cfg: Mapping | nn.Module | None = None,
        post_cfg: Mapping | nn.Module | None = None,
        aligned: bool = True,
    ) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio)
        _check_aggregation(aggregation)
        self.aggregation = aggregation
        self.aligned = aligned
        _build_pre_post(self, pre_cfg, post_cfg)

    @classmethod
    def from_paper(cls, featmap_names: list[str], kind: str = "bbox", channels: int = 256) -> GRoIEPooler:
        """The GRoIE paper's layer: bbox 7x7 / mask 14x14, sampling 2, aligned, sum, 5x5 ConvModule pre,
        GeneralizedAttention '0100' post (6 heads, kv_stride 2), ``channels`` wide."""
        cfg = groie_paper_cfg(kind, channels)
        layer = cfg["roi_layer"]
        return cls(featmap_names, layer["output_size"], layer["sampling_ratio"],
                   aggregation=cfg["aggregation"], pre_cfg=cfg["pre_cfg"], post_cfg=cfg["post_cfg"],
                   aligned=layer["aligned"])

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """x: feature maps by name; boxes: per image ``[L_i, 4]`` (x1, y1, x2, y2) in image coordinates;
        image_shapes: (h, w) of each image as it entered the backbone. Returns ``[sum L_i, C_out, h, w]``."""
        feats = select_features(x, self.featmap_names)
        if self.scales is None:
            self.scales = infer_scales(feats, image_shapes)
        if len(self.scales) != len(feats):
            raise ValueError(f"the pooler was set up for {len(self.scales)} levels but x has {len(feats)}")
        pre = self.pre_module if self.with_pre else None
        channels = feats[0].shape[1]
        _check_pre_channels(pre, channels, "pre_cfg")
        rois = boxes_to_rois(boxes, feats[0])
        if rois.shape[0] == 0:
            out_channels = _aggregated_channels(pre, channels)
            if self.aggregation == "concat":
                out_channels *= len(feats)
            return _empty_result(self, feats, out_channels, self.output_size)
        return _groie(feats, rois, self.output_size, self.scales, self.sampling_ratio, self.aligned,
                      self.aggregation, pre, self.post_module if self.with_post else None)

    # torchvision's MultiScaleRoIAlign prints a one-line repr; show the pre/post modules as nn.Module does.
    __repr__ = nn.Module.__repr__

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}, aggregation={self.aggregation!r}, aligned={self.aligned}"
        )
