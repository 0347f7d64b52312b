"""groie-triton: Triton kernels for the RoI extraction layer of two-stage detectors (GRoIE).

Functions (``roi_align``, ``multilevel_roi_align``, ``mapped_roi_align``) need only torch and triton. The
nn.Modules subclass torchvision's poolers, so they are imported on first use and need torchvision.
"""

from groie_triton.backend import backend_for
from groie_triton.ops import MAX_LEVELS, mapped_roi_align, multilevel_roi_align, roi_align

__version__ = "0.1.0"

_LAZY = {
    "RoIAlign": "groie_triton.poolers",
    "MultiScaleRoIAlign": "groie_triton.poolers",
    "GRoIEPooler": "groie_triton.extractor",
    "GenericRoIExtractor": "groie_triton.extractor",
    "GeneralizedAttention": "groie_triton.attention",
}

__all__ = ["roi_align", "multilevel_roi_align", "mapped_roi_align", "backend_for", "MAX_LEVELS", "__version__",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'groie_triton' has no attribute {name!r}")
