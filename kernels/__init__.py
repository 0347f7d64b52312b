"""Triton kernels of groie-triton, installed as ``groie_triton.kernels``. They know nothing of nn.Modules."""

import os


def interpreting() -> bool:
    """True when the Triton interpreter is switched on (``TRITON_INTERPRET=1``): autotuning then keeps one
    config (the interpreter has no benchmarker). The one definition; groie_triton.backend uses it too."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
