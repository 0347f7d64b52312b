"""The pooling geometry of one RoIAlign call, shared by the launchers and the reference.

The torch.library op takes flat primitives (a custom op cannot take a dataclass); it builds one
:class:`PoolGeometry` from them, and everything below it (launchers, reference) reads that.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PoolGeometry", "AGGREGATIONS", "MAPPINGS"]

AGGREGATIONS = ("sum", "concat", "stack")
"""How the levels of an all-level RoIAlign are combined: ``"sum"`` -> ``[K, C, h, w]``, ``"concat"`` ->
``[K, L*C, h, w]``, ``"stack"`` -> ``[L, K, C, h, w]``."""

MAPPINGS = ("torchvision", "mmdet")
"""How a mapped RoIAlign picks the one level each RoI is pooled from: torchvision's LevelMapper or
mmdetection's ``map_roi_levels``."""


@dataclasses.dataclass(frozen=True)
class PoolGeometry:
    """Everything about a RoIAlign call but the tensors.

    Exactly one of ``aggregation`` (every RoI pooled from every level, :data:`AGGREGATIONS`) and ``mapping``
    (every RoI pooled from one level, :data:`MAPPINGS`) is set. ``k_min`` and ``canonical_*`` are used by the
    torchvision mapping, ``finest_scale`` by the mmdet one. Scales may be symbolic under
    ``torch.compile(dynamic=True)``; they are real floats whenever a kernel or the reference runs.
    """

    pooled_height: int
    pooled_width: int
    spatial_scales: tuple[float, ...]
    sampling_ratio: int
    aligned: bool
    aggregation: str | None = "sum"
    mapping: str | None = None
    k_min: int = 0
    canonical_scale: float = 224.0
    canonical_level: float = 4.0
    finest_scale: float = 56.0

    def __post_init__(self):
        if (self.aggregation is None) == (self.mapping is None):
            raise ValueError(f"exactly one of aggregation and mapping must be set, got {self.aggregation!r} and "
                             f"{self.mapping!r}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.mapping is not None and self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")

    @property
    def output_size(self) -> tuple[int, int]:
        return self.pooled_height, self.pooled_width

    @property
    def num_levels(self) -> int:
        return len(self.spatial_scales)

    def output_shape(self, num_rois: int, channels: int) -> tuple[int, ...]:
        """Shape of the pooled output for ``num_rois`` RoIs of ``channels`` channels."""
        ph, pw = self.output_size
        if self.aggregation == "concat":
            return (num_rois, self.num_levels * channels, ph, pw)
        if self.aggregation == "stack":
            return (self.num_levels, num_rois, channels, ph, pw)
        return (num_rois, channels, ph, pw)
