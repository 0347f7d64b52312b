"""Compile one spec with ``triton.compile`` for a ``GPUTarget`` (no GPU needed) and build its report row.

Also the interpreter workarounds: under ``TRITON_INTERPRET=1`` kernels are InterpretedFunctions, which are
re-wrapped as JITFunctions, and a process whose ``triton.language`` the interpreter left patched is refused.
"""

from __future__ import annotations

import time
import types
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

from .specs import ARCHS, EXTRA_FIELDS, ROW_FIELDS, normalize_arch, normalize_dtype, validate_spec
from .usage import amd_usage, instructions_per_output, nvidia_occupancy, nvidia_usage

_OPTION_FIELDS = {"cuda": set(CUDAOptions.__dataclass_fields__), "hip": set(HIPOptions.__dataclass_fields__)}

# InterpretedFunction -> JITFunction, kept alive together so that ids stay unique.
_JIT_FROM_INTERPRETED: dict[int, tuple[InterpretedFunction, JITFunction]] = {}


def unwrap_fn(kernel: Any) -> Any:
    """The JITFunction or InterpretedFunction under Autotuner / Heuristics wrappers (``kernel`` if none)."""
    fn = kernel
    while not isinstance(fn, (JITFunction, InterpretedFunction)) and getattr(fn, "fn", None) is not None:
        if fn.fn is fn:
            break
        fn = fn.fn
    return fn


def jit_function(kernel: Any) -> JITFunction:
    """The JITFunction under ``kernel``: unwrap Autotuner/Heuristics; rebuild an interpreted kernel.

    Under ``TRITON_INTERPRET=1`` (the test suite) ``@triton.jit`` gives InterpretedFunctions, which
    ``triton.compile`` cannot take: the same Python function is re-wrapped as a JITFunction, and so are the
    interpreted ``@triton.jit`` helpers it reaches through its globals.
    """
    fn = unwrap_fn(kernel)
    if not isinstance(fn, (JITFunction, InterpretedFunction)):
        raise TypeError(f"spec 'fn' must be a @triton.jit kernel, got {type(kernel).__name__}")
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


def _check_language_not_patched() -> None:
    if getattr(tl.core.add, "__name__", "") == "<lambda>":
        # triton 3.8's interpreter leaves triton.language patched after a kernel calls a @triton.jit helper;
        # compiling then fails deep in codegen. Say so instead (tests/conftest.py works around it).
        raise RuntimeError("the Triton interpreter has left triton.language patched in this process; compile "
                           "in a fresh process (e.g. python -m groie_triton.compile_report)")


def compile_inputs(spec: dict, target: GPUTarget, enable_fp_fusion: bool):
    """(JITFunction, full signature, constexprs, attrs, options) for ``triton.compile``."""
    fn = jit_function(spec["fn"])
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


def empty_row(spec: dict, arch: str, enable_fp_fusion: bool) -> dict[str, Any]:
    """A row with the spec's identity filled in and every measurement None."""
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS + EXTRA_FIELDS)
    config: triton.Config = spec["config"]
    row.update(
        kernel=spec["kernel"],
        config=spec["config_name"],
        arch=arch,
        dtype=normalize_dtype(spec["dtype"]),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        outputs_per_program=spec.get("outputs_per_program"),
        fp_fusion=enable_fp_fusion,
    )
    return row


def set_per_output(row: dict[str, Any], outputs_per_program: int | None) -> dict[str, Any]:
    """Fill ``outputs_per_program`` and ``instructions_per_output`` of ``row`` (in place; returns it)."""
    row["outputs_per_program"] = outputs_per_program
    warp_size = ARCHS[row["arch"]].warp_size
    row["instructions_per_output"] = instructions_per_output(
        row.get("instructions"), row.get("num_warps"), warp_size, outputs_per_program
    )
    return row


def compile_kernel(spec: dict, arch: str, *, enable_fp_fusion: bool = True) -> dict[str, Any]:
    """Compile one spec for ``arch`` (e.g. ``"sm_90"``, ``"gfx942"``) and return its report row.

    ``enable_fp_fusion``: FMA contraction, as the kernels launch (default True). The row has the
    :data:`ROW_FIELDS` plus the extras (None where the backend has no such number); ``error`` is None.

    Raises :class:`ReportUsageError` for an unknown arch, ``TypeError``/``ValueError`` for a malformed spec,
    and whatever ``triton.compile`` raises when the kernel does not compile.
    """
    arch = normalize_arch(arch)
    validate_spec(spec, "compile_kernel")
    _check_language_not_patched()
    target = ARCHS[arch]
    fn, signature, constexprs, attrs, options = compile_inputs(spec, target, enable_fp_fusion)
    row = empty_row(spec, arch, enable_fp_fusion)
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
    name = getattr(metadata, "name", None)
    dynamic_shared = int(getattr(metadata, "shared", 0) or 0)
    if target.backend == "cuda":
        usage = nvidia_usage(compiled.asm["cubin"], name)
        # n_regs/n_spills only exist once a driver has loaded the binary; cross-check when they do.
        n_regs = getattr(compiled, "n_regs", None)
        if isinstance(n_regs, int) and n_regs > 0 and n_regs != usage["registers"]:
            raise RuntimeError(f"cuobjdump says {usage['registers']} registers, the driver {n_regs}")
        usage.update(
            nvidia_occupancy(arch, usage["registers"], row["num_warps"], dynamic_shared, usage["static_shared"])
        )
    else:
        usage = amd_usage(compiled.asm["amdgcn"], name, arch)
    usage["shared_bytes"] = dynamic_shared + usage.pop("static_shared")
    row.update(usage)
    return set_per_output(row, spec.get("outputs_per_program"))
