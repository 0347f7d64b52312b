"""tests/gpu: the compiled kernels on a CUDA device. Collected everywhere, run only where they mean something.

Every test here is skipped (and reported so) unless

* ``torch.cuda.is_available()``, and
* the kernels are compiled, not interpreted: tests/conftest.py sets ``TRITON_INTERPRET=1`` with
  ``os.environ.setdefault`` before triton is imported, and ``@triton.jit`` reads that variable when a kernel is
  defined, so run this folder as ``TRITON_INTERPRET=0 python -m pytest tests/gpu`` (``make gpu-check`` does).
  In a run of the whole of tests/ on a GPU machine without that variable, the folder is skipped with that
  reason instead of silently testing the interpreter on CUDA tensors.

Shapes stay small (compile time, not run time, dominates) except in test_gpu_large.py. Outside the autotune
tests, :func:`_one_config` makes every autotuner use the first config its own pruning keeps, so a parity
test compiles one kernel per specialization instead of benchmarking every config.

Dry run without a GPU: ``GROIE_GPU_TEST_DEVICE=cpu python -m pytest tests/gpu -k ...`` runs the tests' own logic
(references, tolerances, plumbing) on CPU with the kernels under the interpreter; the CUDA-only tests skip.
"""

from __future__ import annotations

import os

import pytest
import torch
from _gpu_helpers import DRY_RUN, autotuners, clear_autotune_caches
from groie_triton.kernels import interpreting

_HERE = os.path.dirname(os.path.abspath(__file__))


def skip_reason() -> str | None:
    """Why tests/gpu cannot run in this process, or None when it can."""
    if DRY_RUN:  # GROIE_GPU_TEST_DEVICE=cpu: the tests' own logic on CPU (see _gpu_helpers.DEVICE)
        return None
    if not torch.cuda.is_available():
        return "no CUDA device: tests/gpu runs the compiled Triton kernels on a GPU"
    if interpreting():
        return ("TRITON_INTERPRET is on (tests/conftest.py defaults it to 1): run "
                "`TRITON_INTERPRET=0 python -m pytest tests/gpu` (or `make gpu-check`) for the compiled kernels")
    from groie_triton.backend import backend_for

    if backend_for(torch.empty(0, device="cuda")) != "triton":
        return "groie_triton.backend_for(cuda tensor) is not 'triton'"
    interpreted = [name for name, t in autotuners().items() if type(t.fn).__name__ == "InterpretedFunction"]
    if interpreted:
        return (f"{', '.join(interpreted)} were defined under the Triton interpreter (TRITON_INTERPRET was on when "
                "groie_triton was imported): run `TRITON_INTERPRET=0 python -m pytest tests/gpu`")
    return None


def pytest_collection_modifyitems(config, items):
    # Called with every collected item of the session: mark only this folder's.
    reason = skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in items:
        folder = os.path.dirname(os.path.abspath(str(item.path)))
        if folder == _HERE or folder.startswith(_HERE + os.sep):
            item.add_marker(marker)


@pytest.fixture(autouse=True)
def _one_config():
    """Every autotuner keeps only the first config its own early pruning returns (tests/gpu/test_gpu_autotune.py
    overrides this fixture to tune for real). Caches are cleared before and after, so no choice leaks."""
    tuners = autotuners()
    saved = {name: t.early_config_prune for name, t in tuners.items()}

    def first_of(prune):
        def pick(configs, named_args, **kwargs):
            kept = prune(configs, named_args, **kwargs) if prune is not None else configs
            return list(kept)[:1]

        return pick

    for name, t in tuners.items():
        t.early_config_prune = first_of(saved[name])
    clear_autotune_caches()
    try:
        yield
    finally:
        for name, t in tuners.items():
            t.early_config_prune = saved[name]
        clear_autotune_caches()


@pytest.fixture
def no_tf32():
    """Full fp32 convolutions and matmuls (cuDNN and cuBLAS default to TF32 on Ampere and later)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for the test; the previous setting is restored."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
