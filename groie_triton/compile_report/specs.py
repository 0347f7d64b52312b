"""Compile specs: the kernel modules' ``compile_specs()`` lists, collected and validated; archs, dtypes, row schema."""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import Any

import triton
from triton.backends.compiler import GPUTarget

KERNEL_MODULES: tuple[str, ...] = ("groie_triton.kernels.roi_align", "groie_triton.kernels.level_sum")
"""Modules whose ``compile_specs()`` list the shipped kernels."""

ARCHS: dict[str, GPUTarget] = {
    "sm_75": GPUTarget("cuda", 75, 32),
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_86": GPUTarget("cuda", 86, 32),
    "sm_89": GPUTarget("cuda", 89, 32),
    "sm_90": GPUTarget("cuda", 90, 32),
    "sm_100": GPUTarget("cuda", 100, 32),
    "gfx90a": GPUTarget("hip", "gfx90a", 64),
    "gfx942": GPUTarget("hip", "gfx942", 64),
}
"""Arch name -> compilation target. ``gfx942`` is MI300, ``gfx90a`` MI200."""

DEFAULT_ARCHS: tuple[str, ...] = ("sm_80", "sm_90", "gfx942")

ROW_FIELDS: tuple[str, ...] = (
    "kernel",
    "config",
    "arch",
    "dtype",
    "registers",
    "spill_bytes",
    "shared_bytes",
)
"""The contract's fields; rows carry the extras of ``EXTRA_FIELDS`` too (None where not applicable)."""

EXTRA_FIELDS: tuple[str, ...] = (
    "num_warps",
    "num_stages",
    "stack_bytes",
    "local_bytes",
    "scratch_bytes",
    "vgpr_spills",
    "sgpr_spills",
    "occupancy",
    "warps_per_sm",
    "waves_per_simd",
    "instructions",
    "outputs_per_program",
    "instructions_per_output",
    "fp_fusion",
    "compile_s",
    "cache_hit",
    "error",
)
"""Row fields beyond the contract; see the package docstring for their meaning."""

SPEC_KEYS = ("kernel", "fn", "config", "config_name", "dtype", "signature", "constexprs")
_DTYPE_ALIASES = {
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "double": "fp64",
}


class ReportUsageError(ValueError):
    """An unknown arch, kernel or dtype, or a kernel module that cannot be imported (CLI exit status 2)."""


def normalize_arch(arch: str) -> str:
    """``"sm90"``, ``"SM-90"`` -> ``"sm_90"``; raises :class:`ReportUsageError` for an arch not in ARCHS."""
    name = arch.strip().lower().replace("-", "_")
    if re.fullmatch(r"sm\d+", name):
        name = "sm_" + name[2:]
    if name not in ARCHS:
        raise ReportUsageError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}")
    return name


def normalize_dtype(dtype: str) -> str:
    """Triton's short dtype name (fp16, bf16, fp32, fp64) for any common spelling."""
    name = dtype.strip().lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def validate_spec(spec: Any, where: str) -> None:
    """Raise ``TypeError`` when ``spec`` is not a well-formed compile spec."""
    if not isinstance(spec, dict):
        raise TypeError(f"{where}: a compile spec must be a dict, got {type(spec).__name__}")
    missing = [key for key in SPEC_KEYS if key not in spec]
    if missing:
        raise TypeError(f"{where}: compile spec {spec.get('kernel', '?')!r} lacks keys {missing}")
    if not isinstance(spec["config"], triton.Config):
        raise TypeError(f"{where}: spec {spec['kernel']!r} 'config' must be a triton.Config")
    if not isinstance(spec["signature"], dict) or not isinstance(spec["constexprs"], dict):
        raise TypeError(f"{where}: spec {spec['kernel']!r} 'signature' and 'constexprs' must be dicts")
    outputs = spec.get("outputs_per_program")
    if outputs is not None and (isinstance(outputs, bool) or not isinstance(outputs, int) or outputs <= 0):
        raise TypeError(f"{where}: spec {spec['kernel']!r} 'outputs_per_program' must be a positive int or None")


def collect_specs(modules: Sequence[str] | None = None) -> list[dict]:
    """Import each kernel module and concatenate its ``compile_specs()``.

    ``modules``: module names, default :data:`KERNEL_MODULES`. Each returned spec is a shallow copy with
    ``"module"`` (the module name) and ``"index"`` (its position in that module's list) added, so that a
    worker process can rebuild it.

    Raises :class:`ReportUsageError` when a module cannot be imported or has no ``compile_specs``,
    ``TypeError`` for a malformed spec and ``ValueError`` for two specs with the same
    (kernel, config_name, dtype).
    """
    names = list(KERNEL_MODULES if modules is None else modules)
    specs: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                raise ReportUsageError(f"kernel module {name!r} not found ({exc})") from exc
            raise
        compile_specs = getattr(module, "compile_specs", None)
        if not callable(compile_specs):
            raise ReportUsageError(f"kernel module {name!r} has no compile_specs() function")
        for index, spec in enumerate(compile_specs()):
            validate_spec(spec, name)
            key = (spec["kernel"], spec["config_name"], spec["dtype"])
            if key in seen:
                raise ValueError(f"{name}: duplicate compile spec (kernel, config_name, dtype) = {key}")
            seen.add(key)
            specs.append({**spec, "module": name, "index": index})
    return specs
