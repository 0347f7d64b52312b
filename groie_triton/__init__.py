"""groie-triton: Triton kernels for the RoI extraction layer of two-stage detectors (GRoIE)."""

from groie_triton.backend import backend_for
from groie_triton.ops import MAX_LEVELS, mapped_roi_align, multilevel_roi_align, roi_align

__version__ = "0.1.0"

__all__ = ["roi_align", "multilevel_roi_align", "mapped_roi_align", "backend_for", "MAX_LEVELS", "__version__"]
