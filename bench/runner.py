"""Running the sweep: one record per (case, provider, mode), with the cost model, parity and timings.

With a GPU every case runs at full size, is checked against float64 torchvision on the device and timed with
``triton.testing.do_bench`` (median, 20th and 80th percentiles). Without one, parity runs at
:func:`~bench.cases.reduced_size` under the Triton interpreter (shared by cases that differ only in K) and
``median_ms`` is null. The cost model is evaluated at full size either way.

Records carry the contract's fields (DESIGN.md: case, provider, mode, median_ms, q20_ms, q80_ms,
modeled_bytes, launches, max_abs_err) and more: modeled_sector_bytes (the same traffic in whole 32-byte
sectors per warp load), host_syncs, parity_ok/tol/reference/size, bytes_vs_loop, roofline_ms, gbps,
roofline_pct, speedup_vs_loop, the case's parameters, gpu, versions and error.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence

import torch

from bench import cases as C
from bench.cost_model import H100_SXM_BYTES_PER_S, PROVIDERS, Cost, cost

__all__ = ["QUANTILES", "PEAK_GBPS", "versions", "peak_gbps", "interpreter_ready", "run_sweep", "error_text"]

QUANTILES = [0.5, 0.2, 0.8]
PEAK_GBPS = (  # substring of torch.cuda.get_device_name() -> peak DRAM GB/s; first match wins
    ("H100 NVL", 3900),
    ("H100 PCIe", 2000),
    ("H100", 3350),
    ("H200", 4800),
    ("H20", 4000),
    ("A100-SXM4-80GB", 2039),
    ("A100 80GB PCIe", 1935),
    ("A100", 1555),
    ("L40S", 864),
    ("L4", 300),
    ("RTX 4090", 1008),
    ("A10", 600),
    ("V100", 900),
    ("MI300X", 5300),
    ("MI250", 3277),
)


def versions() -> dict:
    import torchvision
    import triton

    import groie_triton

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "torchvision": torchvision.__version__,
        "groie_triton": groie_triton.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
    }


def peak_gbps(gpu: str | None, override: float | None) -> float | None:
    """``override``, or the peak DRAM GB/s of the GPU named ``gpu`` (:data:`PEAK_GBPS`), or None."""
    if override:
        return override
    for pattern, gbps in PEAK_GBPS:
        if gpu and pattern in gpu:
            return float(gbps)
    return None


def interpreter_ready() -> bool:
    """Whether the shipped kernels were defined under the Triton interpreter (``TRITON_INTERPRET=1`` before
    triton was imported), read from the compile report's specs: the ``fn`` of a spec is the ``@triton.jit``
    kernel, or the autotuner / heuristics wrapping it (their ``fn`` attribute)."""
    from triton.runtime.interpreter import InterpretedFunction

    from groie_triton.compile_report import collect_specs

    fn = collect_specs(["groie_triton.kernels.roi_align"])[0]["fn"]
    while not isinstance(fn, InterpretedFunction) and getattr(fn, "fn", None) not in (None, fn):
        fn = fn.fn
    return isinstance(fn, InterpretedFunction)


def _time(fn, args: argparse.Namespace) -> list[float]:
    import triton.testing

    fn()  # compile and autotune outside the timed region
    torch.cuda.synchronize()
    rep = args.rep or 100
    if args.cuda_graph:
        return list(triton.testing.do_bench_cudagraph(fn, rep=rep, quantiles=QUANTILES))
    return list(triton.testing.do_bench(fn, warmup=args.warmup or 25, rep=rep, quantiles=QUANTILES))


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters: what a record's ``error`` holds."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _parity_key(case: C.Case) -> tuple:
    # Cases that differ only in K share a reduced size (reduced_size fixes K).
    return (case.channels, case.output_size, case.num_levels, case.dtype, case.layout)


def _parities(providers: Sequence[str], x: C.Inputs) -> tuple[dict[str, C.Parity], dict[str, str]]:
    """Parity of each provider on ``x`` (the float64 references shared); a provider that raises is an error."""
    references: dict = {}
    found, failed = {}, {}
    for p in providers:
        try:
            found[p] = C.parity(p, x, references)
        except Exception as exc:  # noqa: BLE001 - a failing provider is a record, not a crash
            failed[p] = f"parity: {error_text(exc)}"
    return found, failed


def run_sweep(
    cases: Sequence[C.Case],
    providers: Sequence[str],
    modes: Sequence[str],
    args: argparse.Namespace,
    gpu: str | None,
    progress: bool = True,
    timer: Callable[[Callable[[], object], argparse.Namespace], list[float]] | None = None,
    device: str = "cuda",
    sizer: Callable[[C.Case], C.Size] = C.full_size,
) -> list[dict]:
    """One record per (case, provider, mode): cost model at full size, parity, timings where a GPU exists.

    ``args``: the parsed command line (``seed``, ``skip_parity``, ``peak_gbps``, and the timer's ``rep``,
    ``warmup``, ``cuda_graph``). With ``gpu`` (its name): inputs of ``sizer(case)`` on ``device``, parity
    there, and ``timer`` (default: ``triton.testing.do_bench``) medians. Without: parity at
    :func:`~bench.cases.reduced_size` on the CPU (:data:`~bench.cases.QUICK_PARITY_ROIS` RoIs with
    ``args.quick``), shared by cases that differ only in K. ``timer``, ``device``
    and ``sizer`` exist so that tests can run the GPU path on a CPU.
    """
    from tqdm import tqdm

    timer = timer or _time
    env = versions()
    peak = peak_gbps(gpu, args.peak_gbps)
    records: list[dict] = []
    parity_cache: dict[tuple, tuple[dict, dict, str]] = {}
    bar = tqdm(cases, desc="bench", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(case.name)
        prob = C.problem(case, seed=args.seed)
        costs = {(p, m): cost(prob, p, m) for p in PROVIDERS for m in modes}
        parities: dict[str, C.Parity] = {}
        errors: dict[tuple[str, str], str] = {}
        timings: dict[tuple[str, str], list[float]] = {}
        size_desc = None
        if gpu:
            size = sizer(case)
            x = C.make_inputs(case, size, device, args.seed)
            size_desc = size.describe()
            if not args.skip_parity:
                parities, failed = _parities(providers, x)
                errors.update({(p, m): msg for p, msg in failed.items() for m in modes})
            for p in providers:
                for m in modes:
                    try:
                        timings[(p, m)] = timer(C.mode_callable(p, x, m), args)
                    except Exception as exc:  # noqa: BLE001
                        errors[(p, m)] = error_text(exc)
            del x
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        elif not args.skip_parity:
            key = _parity_key(case)
            if key not in parity_cache:
                size = C.reduced_size(case, C.QUICK_PARITY_ROIS if getattr(args, "quick", False) else 4)
                parity_cache[key] = (
                    *_parities(providers, C.make_inputs(case, size, "cpu", args.seed)),
                    size.describe(),
                )
            found, failed, size_desc = parity_cache[key]
            parities = dict(found)
            errors = {(p, m): msg for p, msg in failed.items() for m in modes}
        for p in providers:
            for m in modes:
                records.append(
                    _record(case, p, m, costs, parities.get(p), timings, errors.get((p, m)), size_desc, gpu, peak, env)
                )
    bar.close()
    return records


def _record(
    case: C.Case,
    provider: str,
    mode: str,
    costs: dict,
    parity: C.Parity | None,
    timings: dict,
    error: str | None,
    size_desc: str | None,
    gpu: str | None,
    peak: float | None,
    env: dict,
) -> dict:
    c: Cost = costs[(provider, mode)]
    loop: Cost = costs[("loop", mode)]
    t = timings.get((provider, mode))
    t_loop = timings.get(("loop", mode))
    median = t[0] if t else None
    gbps = c.bytes / (median * 1e-3) / 1e9 if median else None
    return {
        "case": case.name,
        "provider": provider,
        "mode": mode,
        "median_ms": median,
        "q20_ms": t[1] if t else None,
        "q80_ms": t[2] if t else None,
        "modeled_bytes": c.bytes,
        "modeled_sector_bytes": c.sector_bytes,
        "launches": c.launches,
        "host_syncs": c.host_syncs,
        "max_abs_err": parity.error(mode) if parity else None,
        "parity_ok": parity.ok(mode) if parity else None,
        "parity_tol": (parity.forward_tol if mode == "forward" else parity.backward_tol) if parity else None,
        "parity_reference": f"{C.PARITY_REFERENCE[provider]} (float64)",
        "parity_size": size_desc,
        "bytes_vs_loop": c.bytes / loop.bytes,
        "sector_bytes_vs_loop": c.sector_bytes / loop.sector_bytes,
        "roofline_ms": c.roofline_ms(H100_SXM_BYTES_PER_S),
        "gbps": gbps,
        "roofline_pct": 100 * gbps / peak if gbps and peak else None,
        "speedup_vs_loop": t_loop[0] / median if median and t_loop else None,
        "num_rois": case.num_rois,
        "channels": case.channels,
        "output_size": case.output_size,
        "levels": case.num_levels,
        "dtype": case.dtype,
        "layout": case.layout,
        "gpu": gpu,
        "versions": env,
        "error": error,
    }
