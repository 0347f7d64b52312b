"""Compile every shipped kernel config for real GPU targets, without a GPU, and report its resource usage.

``python -m groie_triton.compile_report [--arch sm_80 sm_90 gfx942 ...] [--json PATH] [--kernel NAME ...]
[--dtype fp32 ...]`` compiles every kernel x shipped autotune config x dtype listed by the kernel modules'
``compile_specs()`` with ``triton.compile(ASTSource(...), target=GPUTarget(...))``, which needs neither a GPU
nor a driver, and prints one row per (kernel, config, arch, dtype):

- NVIDIA (``sm_*``): registers, stack and local memory and static shared memory are read from the cubin
  with the ``cuobjdump --dump-resource-usage`` that ships inside the triton wheel. ``spill_bytes`` is the
  per-thread stack frame plus local memory: Triton kernels use neither except for register spills.
- AMD (``gfx*``): read from the comments and the metadata block of ``compiled.asm["amdgcn"]``:
  TotalNumVgprs (VGPRs + AGPRs), ScratchSize, ``.vgpr_spill_count``/``.sgpr_spill_count``, Occupancy (waves
  per SIMD) and the static LDS size. ``spill_bytes`` is ScratchSize, or 4 bytes per spilled register when
  the spills went to AGPRs or VGPR lanes and not to scratch, so that any spill is non-zero.

Row dtypes use Triton's short names (fp16, bf16, fp32, fp64) whatever the spec spells.
``shared_bytes`` is what a block occupies: Triton's dynamic shared memory (``metadata.shared``) plus the
static shared memory of the binary (on sm_90 the 1 KiB the driver reserves shows up there).

Exit status: 0 when every row compiled without spill, 1 when a row spills or fails to compile (a summary line
names them), 2 for a usage error (unknown arch, kernel or dtype; a kernel module that cannot be imported).

Spec format, returned by each kernel module's ``compile_specs()``::

    {"kernel": str, "fn": JITFunction (or the Autotuner / Heuristics wrapping it), "config": triton.Config,
     "config_name": str, "dtype": str, "signature": {arg name: triton type, e.g. "*fp32", "i32", "fp32"},
     "constexprs": {arg name: value}}

A tuple argument (one pointer per pyramid level ...) has a tuple of types, e.g. ``("*fp32",) * 4``.

``config.kwargs`` that name kernel arguments are constexprs as well; other ``config.kwargs`` are backend
options (``waves_per_eu`` ...), as in an autotuned launch. Pointer arguments are compiled as 16-byte aligned,
which is what a launch with freshly allocated torch tensors specializes on; an optional spec key
``"attrs": {arg name: "D" | ""}`` overrides that per argument ("D" = divisible by 16, Triton's own letter).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import triton
import triton.language as tl
from triton import knobs
from triton.backends.amd.compiler import HIPOptions
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.backends.nvidia.compiler import CUDAOptions
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

__all__ = [
    "ARCHS",
    "DEFAULT_ARCHS",
    "KERNEL_MODULES",
    "ROW_FIELDS",
    "ReportUsageError",
    "collect_specs",
    "compile_kernel",
    "format_table",
    "main",
    "report",
]

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
"""The contract's fields; rows carry the extras of ``_EXTRA_FIELDS`` too (None where not applicable)."""

_EXTRA_FIELDS: tuple[str, ...] = (
    "num_warps",
    "num_stages",
    "stack_bytes",
    "local_bytes",
    "scratch_bytes",
    "vgpr_spills",
    "sgpr_spills",
    "occupancy",
    "fp_fusion",
    "compile_s",
    "cache_hit",
    "error",
)

_SPEC_KEYS = ("kernel", "fn", "config", "config_name", "dtype", "signature", "constexprs")
_DTYPE_ALIASES = {
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "double": "fp64",
}
_OPTION_FIELDS = {"cuda": set(CUDAOptions.__dataclass_fields__), "hip": set(HIPOptions.__dataclass_fields__)}
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class ReportUsageError(ValueError):
    """An unknown arch, kernel or dtype, or a kernel module that cannot be imported (CLI exit status 2)."""


# --------------------------------------------------------------------------------------------------- specs


def _normalize_arch(arch: str) -> str:
    name = arch.strip().lower().replace("-", "_")
    if re.fullmatch(r"sm\d+", name):
        name = "sm_" + name[2:]
    if name not in ARCHS:
        raise ReportUsageError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}")
    return name


def _normalize_dtype(dtype: str) -> str:
    name = dtype.strip().lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def _validate_spec(spec: Any, where: str) -> None:
    if not isinstance(spec, dict):
        raise TypeError(f"{where}: a compile spec must be a dict, got {type(spec).__name__}")
    missing = [key for key in _SPEC_KEYS if key not in spec]
    if missing:
        raise TypeError(f"{where}: compile spec {spec.get('kernel', '?')!r} lacks keys {missing}")
    if not isinstance(spec["config"], triton.Config):
        raise TypeError(f"{where}: spec {spec['kernel']!r} 'config' must be a triton.Config")
    if not isinstance(spec["signature"], dict) or not isinstance(spec["constexprs"], dict):
        raise TypeError(f"{where}: spec {spec['kernel']!r} 'signature' and 'constexprs' must be dicts")


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
            _validate_spec(spec, name)
            key = (spec["kernel"], spec["config_name"], spec["dtype"])
            if key in seen:
                raise ValueError(f"{name}: duplicate compile spec (kernel, config_name, dtype) = {key}")
            seen.add(key)
            specs.append({**spec, "module": name, "index": index})
    return specs


# ------------------------------------------------------------------------------------------- compilation

# InterpretedFunction -> JITFunction, kept alive together so that ids stay unique.
_JIT_FROM_INTERPRETED: dict[int, tuple[InterpretedFunction, JITFunction]] = {}


def _jit_function(kernel: Any) -> JITFunction:
    """The JITFunction under ``kernel``: unwrap Autotuner/Heuristics; rebuild an interpreted kernel.

    Under ``TRITON_INTERPRET=1`` (the test suite) ``@triton.jit`` gives InterpretedFunctions, which
    ``triton.compile`` cannot take: the same Python function is re-wrapped as a JITFunction, and so are the
    interpreted ``@triton.jit`` helpers it reaches through its globals.
    """
    fn = kernel
    while not isinstance(fn, (JITFunction, InterpretedFunction)):
        inner = getattr(fn, "fn", None)
        if inner is None or inner is fn:
            raise TypeError(f"spec 'fn' must be a @triton.jit kernel, got {type(kernel).__name__}")
        fn = inner
    if isinstance(fn, InterpretedFunction):
        fn = _jit_from_interpreted(fn)
    return fn


def _jit_from_interpreted(interpreted: InterpretedFunction) -> JITFunction:
    cached = _JIT_FROM_INTERPRETED.get(id(interpreted))
    if cached is not None:
        return cached[1]
    py_fn = interpreted.fn
    scope = dict(py_fn.__globals__)
    clone = types.FunctionType(py_fn.__code__, scope, py_fn.__name__, py_fn.__defaults__, py_fn.__closure__)
    clone.__kwdefaults__ = py_fn.__kwdefaults__
    clone.__annotations__ = dict(py_fn.__annotations__)
    clone.__qualname__ = py_fn.__qualname__
    clone.__module__ = py_fn.__module__
    clone.__doc__ = py_fn.__doc__
    jit_fn = JITFunction(clone, **interpreted.kwargs)
    # Registered before the globals are rewritten so that recursion through helpers terminates.
    _JIT_FROM_INTERPRETED[id(interpreted)] = (interpreted, jit_fn)
    for name, value in py_fn.__globals__.items():
        if isinstance(value, InterpretedFunction):
            scope[name] = _jit_from_interpreted(value)
        elif type(value) is types.ModuleType:
            interpreted_attrs = {k: v for k, v in vars(value).items() if isinstance(v, InterpretedFunction)}
            if interpreted_attrs:
                proxy = types.ModuleType(value.__name__, value.__doc__)
                proxy.__dict__.update(vars(value))
                for attr, helper in interpreted_attrs.items():
                    setattr(proxy, attr, _jit_from_interpreted(helper))
                scope[name] = proxy
    return jit_fn


def _compile_inputs(spec: dict, target: GPUTarget, enable_fp_fusion: bool):
    """(JITFunction, full signature, constexprs, attrs, options) for ``triton.compile``."""
    fn = _jit_function(spec["fn"])
    config: triton.Config = spec["config"]
    arg_names = [param.name for param in fn.params]
    constexprs = dict(spec["constexprs"])
    options: dict[str, Any] = {}
    known_options = _OPTION_FIELDS["cuda"] | _OPTION_FIELDS["hip"]
    for name, value in config.kwargs.items():
        if name in arg_names:
            if name in constexprs and constexprs[name] != value:
                raise ValueError(
                    f"{spec['kernel']}/{spec['config_name']}: {name}={value} in the config but "
                    f"{constexprs[name]} in constexprs"
                )
            constexprs[name] = value
        elif name in known_options:
            options[name] = value
        else:
            raise ValueError(
                f"{spec['kernel']}/{spec['config_name']}: config kwarg {name!r} is neither an argument of "
                f"{fn.__name__} nor a compiler option"
            )
    unknown = sorted((set(spec["signature"]) | set(constexprs)) - set(arg_names))
    if unknown:
        raise ValueError(f"{spec['kernel']}: {unknown} are not arguments of {fn.__name__}{tuple(arg_names)}")

    signature: dict[str, str] = {}
    spec_attrs = spec.get("attrs", {})
    attrs: dict[tuple[int], list] = {}
    for param in fn.params:
        name = param.name
        if name in constexprs or (param.is_constexpr and param.has_default):
            constexprs.setdefault(name, param.default)
            signature[name] = "constexpr"
            continue
        ty = spec["signature"].get(name)
        if ty is None or ty == "constexpr":
            raise ValueError(f"{spec['kernel']}: no type and no constexpr value for argument {name!r}")
        signature[name] = ty
        aligned = not param.do_not_specialize_on_alignment
        _add_attrs(attrs, (param.num,), ty, spec_attrs.get(name), aligned)

    options.update(
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        num_ctas=config.num_ctas,
        enable_fp_fusion=enable_fp_fusion,
    )
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    options = {k: v for k, v in options.items() if k in _OPTION_FIELDS[target.backend]}
    return fn, signature, constexprs, attrs, options


def _add_attrs(attrs: dict, path: tuple, ty: str | tuple, letters: str | tuple | None, aligned: bool) -> None:
    """Specialization attrs of one argument; tuple arguments (e.g. one pointer per level) get one per item."""
    if isinstance(ty, tuple):
        for i, item in enumerate(ty):
            item_letters = letters[i] if isinstance(letters, tuple) else letters
            _add_attrs(attrs, (*path, i), item, item_letters, aligned)
        return
    if letters is None:
        letters = "D" if ty.startswith("*") and aligned else ""
    attr = BaseBackend.parse_attr(letters)
    if attr:
        attrs[path] = attr


def _parse_cuobjdump(text: str, function: str | None) -> dict[str, int]:
    """``KEY:VALUE`` fields of the function's line in ``cuobjdump --dump-resource-usage`` output."""
    functions: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if header:
            current = header.group(1)
            functions[current] = {}
            continue
        if current is not None:
            fields = dict(re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line))
            if "REG" in fields:
                functions[current].update({k: int(v) for k, v in fields.items()})
    functions = {name: fields for name, fields in functions.items() if "REG" in fields}
    if not functions:
        raise RuntimeError(f"no function with REG in cuobjdump output:\n{text}")
    if function in functions:
        return functions[function]
    return max(functions.values(), key=lambda fields: fields["REG"])


def _nvidia_usage(cubin: bytes, function: str | None) -> dict[str, Any]:
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(cubin)
        result = subprocess.run(
            [str(_CUOBJDUMP), "--dump-resource-usage", path], capture_output=True, text=True, check=False
        )
    finally:
        os.unlink(path)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({result.returncode}): {result.stderr.strip()}")
    fields = _parse_cuobjdump(result.stdout, function)
    stack, local = fields.get("STACK", 0), fields.get("LOCAL", 0)
    return {
        "registers": fields["REG"],
        "spill_bytes": stack + local,
        "static_shared": fields.get("SHARED", 0),
        "stack_bytes": stack,
        "local_bytes": local,
    }


def _amdgcn_field(text: str, *patterns: str) -> int | None:
    for pattern in patterns:
        match = re.search(pattern, text, re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


def _amd_usage(amdgcn: str) -> dict[str, Any]:
    total = _amdgcn_field(amdgcn, r"^\s*;\s*TotalNumVgprs:\s*(\d+)")
    vgprs = _amdgcn_field(amdgcn, r"^\s*;\s*NumVgprs:\s*(\d+)", r"^\s*\.vgpr_count:\s*(\d+)")
    agprs = _amdgcn_field(amdgcn, r"^\s*;\s*NumAgprs:\s*(\d+)", r"^\s*\.agpr_count:\s*(\d+)") or 0
    if total is None and vgprs is not None:
        total = vgprs + agprs
    if total is None:
        raise RuntimeError("no NumVgprs / .vgpr_count in the amdgcn text")
    scratch = _amdgcn_field(
        amdgcn, r"^\s*;\s*ScratchSize:\s*(\d+)", r"^\s*\.private_segment_fixed_size:\s*(\d+)"
    )
    vgpr_spills = _amdgcn_field(amdgcn, r"^\s*\.vgpr_spill_count:\s*(\d+)") or 0
    sgpr_spills = _amdgcn_field(amdgcn, r"^\s*\.sgpr_spill_count:\s*(\d+)") or 0
    lds = _amdgcn_field(amdgcn, r"^\s*\.group_segment_fixed_size:\s*(\d+)", r"^\s*;\s*LDSByteSize:\s*(\d+)")
    return {
        "registers": total,
        "spill_bytes": max(scratch or 0, 4 * (vgpr_spills + sgpr_spills)),
        "static_shared": lds or 0,
        "scratch_bytes": scratch or 0,
        "vgpr_spills": vgpr_spills,
        "sgpr_spills": sgpr_spills,
        "occupancy": _amdgcn_field(amdgcn, r"^\s*;\s*Occupancy:\s*(\d+)"),
    }


def _empty_row(spec: dict, arch: str, enable_fp_fusion: bool) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS + _EXTRA_FIELDS)
    config: triton.Config = spec["config"]
    row.update(
        kernel=spec["kernel"],
        config=spec["config_name"],
        arch=arch,
        dtype=_normalize_dtype(spec["dtype"]),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        fp_fusion=enable_fp_fusion,
    )
    return row


def compile_kernel(spec: dict, arch: str, *, enable_fp_fusion: bool = True) -> dict[str, Any]:
    """Compile one spec for ``arch`` (e.g. ``"sm_90"``, ``"gfx942"``) and return its report row.

    ``enable_fp_fusion``: FMA contraction, as the kernels launch (default True). The row has the
    :data:`ROW_FIELDS` plus the extras (None where the backend has no such number); ``error`` is None.

    Raises :class:`ReportUsageError` for an unknown arch, ``TypeError``/``ValueError`` for a malformed spec,
    and whatever ``triton.compile`` raises when the kernel does not compile.
    """
    arch = _normalize_arch(arch)
    _validate_spec(spec, "compile_kernel")
    if getattr(tl.core.add, "__name__", "") == "<lambda>":
        # triton 3.8's interpreter leaves triton.language patched after a kernel calls a @triton.jit helper;
        # compiling then fails deep in codegen. Say so instead (tests/conftest.py works around it).
        raise RuntimeError("the Triton interpreter has left triton.language patched in this process; compile "
                           "in a fresh process (e.g. python -m groie_triton.compile_report)")
    target = ARCHS[arch]
    fn, signature, constexprs, attrs, options = _compile_inputs(spec, target, enable_fp_fusion)
    row = _empty_row(spec, arch, enable_fp_fusion)
    cache_hits: list[bool] = []

    def listener(*, cache_hit: bool, **_: Any) -> None:
        cache_hits.append(cache_hit)

    start = time.perf_counter()
    with knobs.compilation.scope():
        knobs.compilation.listener = listener
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    row["compile_s"] = round(time.perf_counter() - start, 3)
    row["cache_hit"] = cache_hits[-1] if cache_hits else None

    metadata = compiled.metadata
    if target.backend == "cuda":
        usage = _nvidia_usage(compiled.asm["cubin"], getattr(metadata, "name", None))
        # n_regs/n_spills only exist once a driver has loaded the binary; cross-check when they do.
        n_regs = getattr(compiled, "n_regs", None)
        if isinstance(n_regs, int) and n_regs > 0 and n_regs != usage["registers"]:
            raise RuntimeError(f"cuobjdump says {usage['registers']} registers, the driver {n_regs}")
    else:
        usage = _amd_usage(compiled.asm["amdgcn"])
    usage["shared_bytes"] = int(getattr(metadata, "shared", 0) or 0) + usage.pop("static_shared")
    row.update(usage)
    return row


# ---------------------------------------------------------------------------------------- report, CLI


def _task_key(spec: dict, arch: str, enable_fp_fusion: bool) -> tuple:
    """Specs that compile to the same binary share a key: (fn, config, dtype signature, arch)."""
    config: triton.Config = spec["config"]
    fn = spec["fn"]
    while not isinstance(fn, (JITFunction, InterpretedFunction)) and getattr(fn, "fn", None) is not None:
        fn = fn.fn
    return (
        getattr(fn, "fn", fn),  # the Python function itself: an id could be reused after a reload
        repr(sorted(spec["signature"].items())),
        repr(sorted(spec["constexprs"].items())),
        repr(sorted(spec.get("attrs", {}).items())),
        repr(sorted(config.kwargs.items())),
        (config.num_warps, config.num_stages, config.num_ctas, config.maxnreg),
        arch,
        enable_fp_fusion,
    )


_RESULTS: dict[tuple, dict] = {}
_WORKER_SPECS: dict[str, list[dict]] = {}


def _compile_or_error(spec: dict, arch: str, enable_fp_fusion: bool) -> dict[str, Any]:
    try:
        return compile_kernel(spec, arch, enable_fp_fusion=enable_fp_fusion)
    except Exception as exc:  # noqa: BLE001 - a kernel that fails to compile is a report row, not a crash
        row = _empty_row(spec, arch, enable_fp_fusion)
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()}"[:4000]
        return row


def _worker_compile(module: str, index: int, expect: tuple, arch: str, enable_fp_fusion: bool) -> dict:
    """Pool worker: rebuild the spec from its module (specs hold functions, which do not pickle)."""
    if module not in _WORKER_SPECS:
        _WORKER_SPECS[module] = collect_specs([module])
    spec = _WORKER_SPECS[module][index]
    if (spec["kernel"], spec["config_name"], spec["dtype"]) != expect:
        raise RuntimeError(f"{module}.compile_specs() is not deterministic: item {index} is not {expect}")
    return _compile_or_error(spec, arch, enable_fp_fusion)


def _importable_in_worker(spec: dict) -> bool:
    module = sys.modules.get(spec.get("module", ""))
    return module is not None and getattr(module, "__spec__", None) is not None and "index" in spec


def report(
    archs: Iterable[str] = DEFAULT_ARCHS,
    kernels: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
    *,
    modules: Sequence[str] | None = None,
    specs: Sequence[dict] | None = None,
    workers: int = 2,
    enable_fp_fusion: bool = True,
) -> list[dict]:
    """Compile every selected spec for every arch and return the rows (spec order, then arch order).

    ``archs``: names from :data:`ARCHS`. ``kernels`` / ``dtypes``: keep only these kernel names / dtypes
    (None: all). ``specs``: compile these instead of ``collect_specs(modules)``. ``workers``: size of the
    process pool (1: compile in this process; specs from modules that are not importable by name are always
    compiled here). Results are reused per (fn, config, dtype, arch), within a call and across calls.

    A kernel that fails to compile gives a row whose ``error`` says why. Raises :class:`ReportUsageError` for
    an unknown arch, kernel or dtype.
    """
    arch_names = [_normalize_arch(arch) for arch in archs]
    if not arch_names:
        raise ReportUsageError("no arch given")
    all_specs = list(collect_specs(modules) if specs is None else specs)
    selected = all_specs
    if kernels is not None:
        wanted = list(kernels)
        unknown = sorted(set(wanted) - {spec["kernel"] for spec in all_specs})
        if unknown:
            known = sorted({spec["kernel"] for spec in all_specs})
            raise ReportUsageError(f"unknown kernel {', '.join(map(repr, unknown))}; known kernels: {known}")
        selected = [spec for spec in selected if spec["kernel"] in wanted]
    if dtypes is not None:
        wanted = [_normalize_dtype(dtype) for dtype in dtypes]
        known = {_normalize_dtype(spec["dtype"]) for spec in selected}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ReportUsageError(
                f"unknown dtype {', '.join(map(repr, unknown))}; known dtypes: {sorted(known)}"
            )
        selected = [spec for spec in selected if _normalize_dtype(spec["dtype"]) in wanted]

    jobs = [(spec, arch, _task_key(spec, arch, enable_fp_fusion)) for spec in selected for arch in arch_names]
    todo: dict[tuple, tuple[dict, str]] = {}
    for spec, arch, key in jobs:
        if key not in _RESULTS and key not in todo:
            todo[key] = (spec, arch)
    pooled = {key: job for key, job in todo.items() if _importable_in_worker(job[0])}
    if workers > 1 and len(pooled) > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(pooled)), mp_context=context) as pool:
            futures = {
                pool.submit(
                    _worker_compile,
                    spec["module"],
                    spec["index"],
                    (spec["kernel"], spec["config_name"], spec["dtype"]),
                    arch,
                    enable_fp_fusion,
                ): key
                for key, (spec, arch) in pooled.items()
            }
            for future in concurrent.futures.as_completed(futures):
                _RESULTS[futures[future]] = future.result()
    for key, (spec, arch) in todo.items():
        if key not in _RESULTS:
            _RESULTS[key] = _compile_or_error(spec, arch, enable_fp_fusion)

    rows = []
    for spec, _arch, key in jobs:
        row = dict(_RESULTS[key])
        row.update(kernel=spec["kernel"], config=spec["config_name"], dtype=_normalize_dtype(spec["dtype"]))
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Rows as a markdown table (contract fields, then warps, stages, occupancy, compile time, error)."""
    columns = [*ROW_FIELDS, "num_warps", "num_stages", "occupancy", "compile_s"]
    if any(row.get("error") for row in rows):
        columns.append("error")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = ["" if row.get(column) is None else str(row[column]) for column in columns]
        if row.get("error"):
            # Triton's messages span lines (source excerpt, caret, reason): one line, the reason kept.
            parts = [line.strip() for line in row["error"].splitlines() if line.strip()]
            if len(parts) > 3:
                parts = [parts[0], "...", *parts[-2:]]
            cells[-1] = " / ".join(parts)[:300]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def _summary(rows: Sequence[dict]) -> tuple[int, str]:
    spilled = [row for row in rows if not row["error"] and row["spill_bytes"]]
    failed = [row for row in rows if row["error"]]
    archs = list(dict.fromkeys(row["arch"] for row in rows))
    head = f"{len(rows)} rows ({', '.join(archs)}): {len(spilled)} spill, {len(failed)} failed to compile"
    if not spilled and not failed:
        return 0, f"OK: {head}"
    names = [f"{r['kernel']}/{r['config']}/{r['arch']}/{r['dtype']} ({r['spill_bytes']} B)" for r in spilled]
    names += [f"{r['kernel']}/{r['config']}/{r['arch']}/{r['dtype']} (error)" for r in failed]
    more = f"; ... and {len(names) - 10} more" if len(names) > 10 else ""
    return 1, f"FAIL: {head}: " + "; ".join(names[:10]) + more


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m groie_triton.compile_report",
        description="Compile every kernel x shipped config x dtype for GPU archs (no GPU needed) and report "
        "registers, spill and shared memory. Exit 1 if a row spills or fails, 2 on a usage error.",
    )
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help=f"from {', '.join(ARCHS)}")
    parser.add_argument("--kernel", nargs="+", default=None, help="only these kernel names")
    parser.add_argument("--dtype", nargs="+", default=None, help="only these dtypes (fp16 bf16 fp32 fp64)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    parser.add_argument("--module", nargs="+", default=None, help="kernel modules (default: shipped)")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument(
        "--no-fp-fusion", action="store_true", help="compile with enable_fp_fusion=False (default: True)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 spill or compile failure, 2 usage error)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        rows = report(
            args.arch,
            kernels=args.kernel,
            dtypes=args.dtype,
            modules=args.module,
            workers=args.workers,
            enable_fp_fusion=not args.no_fp_fusion,
        )
    except ReportUsageError as exc:
        print(f"compile_report: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    status, line = _summary(rows)
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
