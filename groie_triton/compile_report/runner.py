"""``report()``: compile every selected spec for every arch, in a process pool, with results cached per binary."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import triton

from .compile import compile_kernel, empty_row, set_per_output, unwrap_fn
from .specs import DEFAULT_ARCHS, ReportUsageError, collect_specs, normalize_arch, normalize_dtype

_RESULTS: dict[tuple, dict] = {}
_WORKER_SPECS: dict[str, list[dict]] = {}


def _task_key(spec: dict, arch: str, enable_fp_fusion: bool) -> tuple:
    """Specs that compile to the same binary share a key: (fn, config, dtype signature, arch)."""
    config: triton.Config = spec["config"]
    fn = unwrap_fn(spec["fn"])
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


def _compile_or_error(spec: dict, arch: str, enable_fp_fusion: bool) -> dict[str, Any]:
    try:
        return compile_kernel(spec, arch, enable_fp_fusion=enable_fp_fusion)
    except Exception as exc:  # noqa: BLE001 - a kernel that fails to compile is a report row, not a crash
        row = empty_row(spec, arch, enable_fp_fusion)
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


def _select(all_specs: list[dict], kernels: Iterable[str] | None, dtypes: Iterable[str] | None) -> list[dict]:
    selected = all_specs
    if kernels is not None:
        wanted = list(kernels)
        unknown = sorted(set(wanted) - {spec["kernel"] for spec in all_specs})
        if unknown:
            known = sorted({spec["kernel"] for spec in all_specs})
            raise ReportUsageError(f"unknown kernel {', '.join(map(repr, unknown))}; known kernels: {known}")
        selected = [spec for spec in selected if spec["kernel"] in wanted]
    if dtypes is not None:
        wanted = [normalize_dtype(dtype) for dtype in dtypes]
        known = {normalize_dtype(spec["dtype"]) for spec in selected}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ReportUsageError(f"unknown dtype {', '.join(map(repr, unknown))}; known dtypes: {sorted(known)}")
        selected = [spec for spec in selected if normalize_dtype(spec["dtype"]) in wanted]
    return selected


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
    arch_names = [normalize_arch(arch) for arch in archs]
    if not arch_names:
        raise ReportUsageError("no arch given")
    all_specs = list(collect_specs(modules) if specs is None else specs)
    selected = _select(all_specs, kernels, dtypes)

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
        row.update(kernel=spec["kernel"], config=spec["config_name"], dtype=normalize_dtype(spec["dtype"]))
        rows.append(set_per_output(row, spec.get("outputs_per_program")))
    return rows
