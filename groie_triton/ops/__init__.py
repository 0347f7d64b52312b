"""The ops layer: public functions over torch.library ops (namespace ``groie``) with fake implementations and
autograd, each op in its own module over its kernels in :mod:`groie_triton.kernels`.

- :mod:`.roi_align`: ``roi_align`` (torchvision's drop-in, scriptable), ``multilevel_roi_align`` (GRoIE's
  all-level pooling), ``mapped_roi_align`` (FPN level mapping in the kernel).
- :mod:`.level_sum`: ``level_sum_act``, the fused activation + level sum after a shared pre-module.
- :mod:`.geometry`: :class:`PoolGeometry`, what the launchers and the reference read.
"""

from groie_triton.ops.geometry import AGGREGATIONS, MAPPINGS, PoolGeometry
from groie_triton.ops.level_sum import ACTIVATIONS, level_sum_act
from groie_triton.ops.roi_align import MAX_LEVELS, boxes_to_rois, mapped_roi_align, multilevel_roi_align, roi_align

__all__ = ["roi_align", "multilevel_roi_align", "mapped_roi_align", "boxes_to_rois", "level_sum_act", "MAX_LEVELS",
           "AGGREGATIONS", "MAPPINGS", "ACTIVATIONS", "PoolGeometry"]
