"""Which implementation runs for a tensor: compiled Triton, interpreted Triton, or the PyTorch reference."""

from __future__ import annotations

import torch

from groie_triton.kernels import interpreting

__all__ = ["backend_for", "interpreter_enabled", "acc_dtype"]


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return interpreting()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every implementation (kernels and reference) accumulates in for ``dtype`` storage: float64
    for float64, float32 for everything else (half types lose small terms when summed in half)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def backend_for(tensor: torch.Tensor) -> str:
    """Name the implementation that the ops run for tensors on ``tensor``'s device.

    ``"triton"``: a CUDA (or ROCm) tensor, compiled and autotuned Triton kernels.
    ``"triton-interpreter"``: ``TRITON_INTERPRET=1`` is set, the same kernels run under the interpreter.
    ``"reference"``: any other tensor (CPU without the interpreter); the pure-PyTorch implementation in
    :mod:`groie_triton.reference` runs. This is the only fallback, and it is never silent: it is what this
    function reports.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"backend_for expects a torch.Tensor, got {type(tensor).__name__}")
    if interpreter_enabled() and tensor.device.type in ("cpu", "cuda"):
        return "triton-interpreter"
    if tensor.device.type == "cuda":
        return "triton"
    return "reference"
