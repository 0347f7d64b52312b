"""nn.Module drop-ins for torchvision's RoIAlign and MultiScaleRoIAlign, backed by the groie kernels.

Both subclass their torchvision counterparts: torchvision's detection models type-check their poolers, and
torchvision's FX feature extraction treats torchvision.ops modules as leaves.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor

from groie_triton.ops import boxes_to_rois, mapped_roi_align, roi_align

__all__ = ["RoIAlign", "MultiScaleRoIAlign", "infer_scales"]

# Calls to these stay single nodes under torch.fx symbolic tracing.
torch.fx.wrap("roi_align")
torch.fx.wrap("mapped_roi_align")


class RoIAlign(torchvision.ops.RoIAlign):
    """Same constructor, repr and results as :class:`torchvision.ops.RoIAlign`; runs :func:`groie_triton.roi_align`."""

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


def infer_scales(features: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[float]:
    """Each level's scale as torchvision infers it: the power of two nearest to feature height / image height.

    ``image_shapes`` is the list of (h, w) of the batch's images; the largest h and w are the reference.
    Raises ValueError for an empty list.
    """
    if not image_shapes:
        raise ValueError("image_shapes must not be empty: the scales are inferred from the image sizes")
    max_h = max(int(s[0]) for s in image_shapes)
    return [2.0 ** round(math.log2(f.shape[-2] / max_h)) if f.shape[-2] > 0 else 0.0 for f in features]


class MultiScaleRoIAlign(torchvision.ops.MultiScaleRoIAlign):
    """Drop-in for :class:`torchvision.ops.MultiScaleRoIAlign` with the FPN level chosen inside the kernel.

    Same constructor, ``forward(x, boxes, image_shapes)``, scale inference and LevelMapper results as
    torchvision's (``aligned=False``, as there), but one kernel launch for all levels: no per-level
    ``torch.where``, no gather, no host synchronisation.

    Raises KeyError naming the missing feature map when ``featmap_names`` are not all in ``x``.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = select_features(x, self.featmap_names)
        if self.scales is None:
            self.scales = infer_scales(features, image_shapes)
        rois = boxes_to_rois(boxes, features[0])
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        return mapped_roi_align(features, rois, self.output_size, self.scales, self.sampling_ratio, aligned=False,
                                mapping="torchvision", canonical_scale=self.canonical_scale,
                                canonical_level=self.canonical_level)


def select_features(x: dict[str, Tensor], featmap_names: list[str]) -> list[Tensor]:
    """The feature maps named by ``featmap_names``, in the order of ``x`` (as torchvision does)."""
    missing = [name for name in featmap_names if name not in x]
    if missing:
        raise KeyError(f"featmap_names {missing} are not in the feature dict (it has {list(x)})")
    return [v for k, v in x.items() if k in featmap_names]
