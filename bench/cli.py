"""``python -m bench``: the benchmark suite's command line (:func:`main`).

With CUDA, every selected case runs at full size: each provider and mode is timed with
``triton.testing.do_bench`` (median, 20th and 80th percentiles), checked against float64 torchvision, and
reported with its speedup over ``loop``, its achieved GB/s (modelled bytes / median time) and the cost model.
Without CUDA, every case runs at reduced size under the Triton interpreter for parity, the cost model is
evaluated at full size, and a compile-report summary (max registers and spill per kernel per arch) stands in
for the GPU; ``median_ms`` is null.

Output: a markdown table on stdout, the GRoIE default case's cost model, the targets, the compile summary;
``--json PATH`` (records as in DESIGN.md plus modeled_sector_bytes, gbps, speedup_vs_loop, roofline_ms, gpu,
versions), ``--plot PATH`` (PNG). Exit status: 0; 1 when a parity error of ours (groie, groie_single,
groie_deterministic) exceeds its tolerance or a provider raised; 2 for bad arguments (unknown case, provider
or mode; a GPU-only flag without a GPU).

Modules: :mod:`bench.runner` runs the sweep into records, :mod:`bench.report` formats, summarises and plots
them; this one parses the command line and ties them together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import cases as C
from bench.cost_model import H100_SXM_BYTES_PER_S, MODES, PROVIDERS
from bench.report import (
    OURS,
    compile_summary,
    default_case_summary,
    format_compile,
    format_default_case,
    format_table,
    format_targets,
    plot,
    targets,
)
from bench.runner import interpreter_ready, peak_gbps, run_sweep, versions

__all__ = ["main", "parser", "UsageError"]

GPU_ONLY = ("cuda_graph", "warmup", "rep")


class UsageError(ValueError):
    """Bad command line: exit status 2."""


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench``."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="GRoIE RoIAlign benchmark: GPU timings where CUDA exists; elsewhere interpreter parity, "
        "cost model (modelled DRAM bytes, launches, H100 roofline) and compile report.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="4 cases (default case + one per dtype/layout/output/levels); compile summary of "
        "the default case's fp32 forward and backward kernels, one config each, on sm_80 only",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the records and summaries as JSON")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="write a PNG: speedup (GPU) or modelled bytes relative to loop (no GPU), by case",
    )
    p.add_argument(
        "--cases",
        nargs="+",
        metavar="NAME",
        help="case names or globs (e.g. 'K1024-*-fp16-*', "
        "'default'); default: the whole sweep, or the quick cases with --quick",
    )
    p.add_argument(
        "--providers", nargs="+", metavar="NAME", default=list(PROVIDERS), help=f"from {', '.join(PROVIDERS)}"
    )
    p.add_argument("--modes", nargs="+", metavar="NAME", default=list(MODES), help=f"from {', '.join(MODES)}")
    p.add_argument("--skip-parity", action="store_true", help="no parity runs (cost model and timings only)")
    p.add_argument("--skip-compile", action="store_true", help="no compile-report summary")
    p.add_argument(
        "--archs",
        nargs="+",
        metavar="ARCH",
        help="archs of the compile summary (default sm_80 sm_90 gfx942; sm_80 with --quick)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of features, boxes and gradients")
    p.add_argument(
        "--peak-gbps",
        type=float,
        help="the GPU's peak DRAM GB/s for %% of roofline (default: looked up from the GPU name)",
    )
    gpu = p.add_argument_group("GPU only (exit status 2 without CUDA)")
    gpu.add_argument(
        "--cuda-graph",
        action="store_true",
        help="time with triton.testing.do_bench_cudagraph (no launch overhead; torchvision_msra "
        "syncs the host and cannot be captured)",
    )
    gpu.add_argument("--warmup", type=float, metavar="MS", help="do_bench warm-up time (default 25 ms)")
    gpu.add_argument("--rep", type=float, metavar="MS", help="do_bench measuring time (default 100 ms)")
    return p


def _check(args: argparse.Namespace, has_gpu: bool) -> list[C.Case]:
    for name, given, known in (("provider", args.providers, PROVIDERS), ("mode", args.modes, MODES)):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise UsageError(f"unknown {name} {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if not has_gpu:
        used = [f"--{flag.replace('_', '-')}" for flag in GPU_ONLY if getattr(args, flag) not in (None, False)]
        if used:
            raise UsageError(f"{', '.join(used)} need(s) a CUDA GPU, and torch.cuda.is_available() is False")
    try:
        return C.select_cases(args.cases, args.quick)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 ok, 1 parity failure or provider error, 2 bad usage)."""
    cli = parser()
    try:
        args = cli.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    has_gpu = torch.cuda.is_available()
    try:
        selected = _check(args, has_gpu)
        if not has_gpu and not args.skip_parity and not interpreter_ready():
            raise UsageError(
                "without CUDA the kernels must run under the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported (`python -m bench` does), or pass "
                "--skip-parity"
            )
    except UsageError as exc:
        print(f"{cli.prog}: error: {exc}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    gpu = torch.cuda.get_device_name() if has_gpu else None
    providers = [p for p in PROVIDERS if p in args.providers]
    modes = [m for m in MODES if m in args.modes]
    compiled = None if args.skip_compile else compile_summary(args.quick, args.archs)
    records = run_sweep(selected, providers, modes, args, gpu)
    default = default_case_summary(args.seed)
    goals = targets(records, compiled)
    timed = any(r["median_ms"] is not None for r in records)

    where = (
        f"GPU: {gpu}"
        if gpu
        else ("no GPU: parity at reduced size under the Triton interpreter, cost model at full size, median_ms null")
    )
    print(f"# groie-triton benchmark ({where})\n")
    print(format_table(records, timed))
    print()
    print(format_default_case(default))
    if compiled is not None:
        print()
        print(format_compile(compiled))
    print()
    print(format_targets(goals))

    failed = [r for r in records if r["error"] or (r["provider"] in OURS and r["parity_ok"] is False)]
    if args.json:
        payload = {
            "schema": "groie-triton-bench/1",
            "argv": list(sys.argv[1:] if argv is None else argv),
            "device": "cuda" if has_gpu else "cpu",
            "gpu": gpu,
            "versions": versions(),
            "quick": args.quick,
            "roofline": {"gpu": "H100 SXM", "bytes_per_s": H100_SXM_BYTES_PER_S},
            "peak_gbps": peak_gbps(gpu, args.peak_gbps),
            "timer": None
            if not has_gpu
            else ("triton.testing.do_bench_cudagraph" if args.cuda_graph else "triton.testing.do_bench"),
            "records": records,
            "default_case": default,
            "targets": goals,
            "compile": compiled,
            "elapsed_s": round(time.perf_counter() - start, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    if args.plot:
        plot(records, args.plot, timed)
    if failed:
        names = sorted({f"{r['case']}/{r['provider']}/{r['mode']}" for r in failed})
        print(
            f"\n{len(failed)} record(s) failed parity or raised: {', '.join(names[:10])}"
            + (" ..." if len(names) > 10 else ""),
            file=sys.stderr,
        )
        return 1
    return 0
