"""``python -m bench``: the benchmark suite's command line (:func:`main`).

With CUDA, every selected case runs at full size: each provider and mode is timed with
``triton.testing.do_bench`` (median, 20th and 80th percentiles), checked against float64 torchvision, and
reported with its speedup over ``loop``, its achieved GB/s (modelled bytes / median time) and the cost model.
Without CUDA, every case runs at reduced size under the Triton interpreter for parity, the cost model is
evaluated at full size, and a compile-report summary (max registers and spill per kernel per arch) stands in
for the GPU; ``median_ms`` is null.

Output: a markdown table on stdout, the GRoIE default case's cost model, the targets, the compile summary;
``--json PATH`` (records as in DESIGN.md plus gbps, speedup_vs_loop, roofline_ms, gpu, versions),
``--plot PATH`` (PNG). Exit status: 0; 1 when a parity error of ours (groie, groie_single,
groie_deterministic) exceeds its tolerance or a provider raised; 2 for bad arguments (unknown case, provider
or mode; a GPU-only flag without a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench import cases as C
from bench.cost_model import H100_SXM_BYTES_PER_S, MODES, PROVIDERS, Cost, cost

__all__ = ["main", "run_sweep", "default_case_summary", "compile_summary", "format_table", "plot"]

QUANTILES = [0.5, 0.2, 0.8]
TARGETS = {"forward_bytes_ratio": 0.35, "forward_speedup": 4.0, "backward_speedup": 2.0, "roofline_pct": 60.0}
"""Issue 5's targets: modelled fused/loop forward bytes (everywhere), and on a GPU at the default case the
speedups over loop and the fraction of the DRAM roofline."""
DEFAULT_CASE_KERNELS = ("roi_align_fwd[sum]", "roi_align_bwd[sum]")
"""The kernels (names of the compile report) that the GRoIE default case launches."""
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
GPU_ONLY = ("cuda_graph", "warmup", "rep")


class UsageError(ValueError):
    """Bad command line: exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="GRoIE RoIAlign benchmark: GPU timings where CUDA exists; elsewhere interpreter parity, "
        "cost model (modelled DRAM bytes, launches, H100 roofline) and compile report.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="4 cases (default case + one per dtype/layout/output/levels); compile summary for "
        "the default case's fp32 kernels on sm_80 only",
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


# ----------------------------------------------------------------------------------------------- running
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


def _peak_gbps(gpu: str | None, override: float | None) -> float | None:
    if override:
        return override
    for pattern, gbps in PEAK_GBPS:
        if gpu and pattern in gpu:
            return float(gbps)
    return None


def _time(fn, args: argparse.Namespace) -> list[float]:
    import triton.testing

    fn()  # compile and autotune outside the timed region
    torch.cuda.synchronize()
    rep = args.rep or 100
    if args.cuda_graph:
        return list(triton.testing.do_bench_cudagraph(fn, rep=rep, quantiles=QUANTILES))
    return list(triton.testing.do_bench(fn, warmup=args.warmup or 25, rep=rep, quantiles=QUANTILES))


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _parity_key(case: C.Case) -> tuple:
    # Cases that differ only in K share a reduced size (reduced_size fixes K).
    return (case.channels, case.output_size, case.num_levels, case.dtype, case.layout)


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

    With ``gpu`` (its name): inputs of ``sizer(case)`` on ``device``, parity there, and ``timer`` (default:
    ``triton.testing.do_bench``) medians. Without: parity at :func:`~bench.cases.reduced_size` on the CPU,
    shared by cases that differ only in K. ``timer``, ``device`` and ``sizer`` exist so that tests can run the
    GPU path on a CPU.
    """
    from tqdm import tqdm

    timer = timer or _time

    env = versions()
    peak = _peak_gbps(gpu, args.peak_gbps)
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
                references: dict = {}
                for p in providers:
                    try:
                        parities[p] = C.parity(p, x, references)
                    except Exception as exc:  # noqa: BLE001 - a failing provider is a record, not a crash
                        errors.update({(p, m): f"parity: {_error(exc)}" for m in modes})
                del references
            for p in providers:
                for m in modes:
                    try:
                        timings[(p, m)] = timer(C.mode_callable(p, x, m), args)
                    except Exception as exc:  # noqa: BLE001
                        errors[(p, m)] = _error(exc)
            del x
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        elif not args.skip_parity:
            key = _parity_key(case)
            if key not in parity_cache:
                size = C.reduced_size(case)
                x = C.make_inputs(case, size, "cpu", args.seed)
                references, found, failed = {}, {}, {}
                for p in providers:
                    try:
                        found[p] = C.parity(p, x, references)
                    except Exception as exc:  # noqa: BLE001
                        failed[p] = f"parity: {_error(exc)}"
                parity_cache[key] = (found, failed, size.describe())
            found, failed, size_desc = parity_cache[key]
            parities = dict(found)
            errors = {(p, m): msg for p, msg in failed.items() for m in modes}
        for p in providers:
            for m in modes:
                records.append(
                    _record(
                        case,
                        p,
                        m,
                        costs,
                        parities.get(p),
                        timings,
                        errors.get((p, m)),
                        size_desc,
                        gpu,
                        peak,
                        env,
                    )
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
        "launches": c.launches,
        "host_syncs": c.host_syncs,
        "max_abs_err": parity.error(mode) if parity else None,
        "parity_ok": parity.ok(mode) if parity else None,
        "parity_tol": (parity.forward_tol if mode == "forward" else parity.backward_tol) if parity else None,
        "parity_reference": f"{C.PARITY_REFERENCE[provider]} (float64)",
        "parity_size": size_desc,
        "bytes_vs_loop": c.bytes / loop.bytes,
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


# ------------------------------------------------------------------------------------------- summaries
def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _group(what: str) -> str:
    return re.sub(r"(level|image) \d+", r"\1 i", what)


def _breakdown(c: Cost) -> list[dict]:
    """Kernels of a cost grouped by what they do (levels and images merged)."""
    groups: dict[tuple[str, str], dict] = {}
    for op in c.ops:
        for k in op.kernels:
            g = groups.setdefault(
                (op.name, _group(k.what)),
                {"op": op.name, "what": _group(k.what), "count": 0, "launches": 0, "bytes": 0},
            )
            g["count"] += 1
            g["launches"] += k.launches
            g["bytes"] += k.read + k.written
    return list(groups.values())


def default_case_summary(seed: int = 0) -> dict:
    """Cost model of the GRoIE default case, fused sum (groie) against mmdetection's loop, every mode."""
    case = C.DEFAULT_CASE
    prob = C.problem(case, seed=seed)
    out = {
        "case": case.name,
        "description": "K=1024 RoIs over 2 images of 800x1344, C=256, 7x7, sampling 2, strides 4/8/16/32, fp32, NCHW",
        "modes": {},
    }
    for mode in MODES:
        g, lp = cost(prob, "groie", mode), cost(prob, "loop", mode)
        out["modes"][mode] = {
            "groie_bytes": g.bytes,
            "loop_bytes": lp.bytes,
            "ratio": g.bytes / lp.bytes,
            "groie_launches": g.launches,
            "loop_launches": lp.launches,
            "groie_roofline_ms": g.roofline_ms(),
            "loop_roofline_ms": lp.roofline_ms(),
            "groie_breakdown": _breakdown(g),
            "loop_breakdown": _breakdown(lp),
        }
    return out


def compile_summary(quick: bool, archs: Sequence[str] | None) -> dict:
    """Compile-report rows and, per (kernel, arch), max registers, max spill and configs compiled.

    ``quick``: only the default case's kernels, fp32, on sm_80 (unless ``archs``). Never raises: a broken
    compile report gives ``{"error": ...}``. Compiles run in the report's spawned worker processes: once the
    Triton interpreter has run a kernel in a process, it leaves ``triton.language`` patched and a fresh
    ``triton.compile`` there fails (triton 3.8: "'ir.value' object has no attribute 'dtype'").
    """
    try:
        from groie_triton import compile_report as cr

        if quick:
            known = {s["kernel"] for s in cr.collect_specs(["groie_triton.kernels.roi_align"])}
            kernels = [k for k in DEFAULT_CASE_KERNELS if k in known] or sorted(known)
            rows = cr.report(
                archs or ["sm_80"],
                kernels=kernels,
                dtypes=["fp32"],
                modules=["groie_triton.kernels.roi_align"],
                workers=2,
            )
        else:
            rows = cr.report(archs or cr.DEFAULT_ARCHS, workers=2)
    except Exception as exc:  # noqa: BLE001 - the benchmark still reports everything else
        return {"error": _error(exc), "rows": [], "summary": []}
    summary: dict[tuple[str, str], dict] = {}
    for r in rows:
        s = summary.setdefault(
            (r["kernel"], r["arch"]),
            {
                "kernel": r["kernel"],
                "arch": r["arch"],
                "rows": 0,
                "dtypes": [],
                "max_registers": 0,
                "max_spill_bytes": 0,
                "max_shared_bytes": 0,
                "failed": 0,
            },
        )
        s["rows"] += 1
        if r["dtype"] not in s["dtypes"]:
            s["dtypes"].append(r["dtype"])
        if r.get("error"):
            s["failed"] += 1
            continue
        s["max_registers"] = max(s["max_registers"], r["registers"] or 0)
        s["max_spill_bytes"] = max(s["max_spill_bytes"], r["spill_bytes"] or 0)
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r["shared_bytes"] or 0)
    return {"error": None, "rows": rows, "summary": list(summary.values())}


def targets(records: list[dict], compiled: dict | None) -> dict:
    """Issue 5's targets, stated and checked where this run can check them."""
    fwd = {r["case"]: r["bytes_vs_loop"] for r in records if r["provider"] == "groie" and r["mode"] == "forward"}
    out: dict = {"targets": TARGETS}
    if fwd:
        worst = max(fwd, key=fwd.get)
        met = [c for c, ratio in fwd.items() if ratio <= TARGETS["forward_bytes_ratio"]]
        out["forward_bytes_ratio"] = {
            "met": len(met),
            "cases": len(fwd),
            "worst_case": worst,
            "worst_ratio": fwd[worst],
            "best_ratio": min(fwd.values()),
            "missed": sorted(set(fwd) - set(met)),
        }
    if compiled and compiled.get("summary"):
        spill = [s for s in compiled["summary"] if s["max_spill_bytes"] or s["failed"]]
        out["zero_spill"] = {
            "met": not spill,
            "kernels_archs": len(compiled["summary"]),
            "spilling_or_failed": [f"{s['kernel']}@{s['arch']}" for s in spill],
        }
    default = [r for r in records if r["case"] == C.DEFAULT_CASE.name and r["provider"] == "groie"]
    for r in default:
        if r["mode"] in ("forward", "backward") and r["speedup_vs_loop"] is not None:
            out[f"{r['mode']}_speedup"] = {
                "value": r["speedup_vs_loop"],
                "met": r["speedup_vs_loop"] >= TARGETS[f"{r['mode']}_speedup"],
            }
        if r["mode"] == "forward" and r["roofline_pct"] is not None:
            out["roofline_pct"] = {
                "value": r["roofline_pct"],
                "met": r["roofline_pct"] >= TARGETS["roofline_pct"],
            }
    return out


# ---------------------------------------------------------------------------------------------- output
_SHORT = {
    "groie": "groie",
    "loop": "loop",
    "torchvision_msra": "msra",
    "groie_single": "single",
    "groie_deterministic": "det",
}
_OURS = ("groie", "groie_single", "groie_deterministic")  # parity-checked: a failure is exit status 1


def format_table(records: list[dict], timed: bool) -> str:
    """One markdown row per (case, mode), providers side by side."""
    by_key: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        by_key.setdefault((r["case"], r["mode"]), {})[r["provider"]] = r

    def cell(rows: dict, provider: str, field: str, fmt) -> str:
        r = rows.get(provider)
        return "-" if r is None or r.get(field) is None else fmt(r[field])

    def err(rows: dict, provider: str) -> str:
        r = rows.get(provider)
        if r is None:
            return "-"
        if r["error"]:
            return "error"
        if r["max_abs_err"] is None:
            return "-"
        return f"{r['max_abs_err']:.1e}" + ("" if r["parity_ok"] else " FAIL")

    head = ["case", "mode"]
    if timed:
        head += [f"{_SHORT[p]} ms" for p in PROVIDERS] + [
            "groie x loop",
            "single x msra",
            "groie GB/s",
            "groie % peak",
        ]
    head += [f"{_SHORT[p]} MB" for p in PROVIDERS] + [
        "groie/loop bytes",
        "launches g/l/m/s/d",
        "syncs msra",
        "H100 roofline µs groie/loop",
        "err groie",
        "err single",
        "err det",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for (case, mode), rows in by_key.items():
        row = [case, mode]
        if timed:
            row += [cell(rows, p, "median_ms", lambda v: f"{v:.3f}") for p in PROVIDERS]
            single = rows.get("groie_single", {}).get("median_ms")
            msra = rows.get("torchvision_msra", {}).get("median_ms")
            row += [
                cell(rows, "groie", "speedup_vs_loop", lambda v: f"{v:.2f}x"),
                f"{msra / single:.2f}x" if single and msra else "-",
                cell(rows, "groie", "gbps", lambda v: f"{v:.0f}"),
                cell(rows, "groie", "roofline_pct", lambda v: f"{v:.0f}%"),
            ]
        row += [cell(rows, p, "modeled_bytes", _mb) for p in PROVIDERS]
        row.append(cell(rows, "groie", "bytes_vs_loop", lambda v: f"{v:.3f}"))
        row.append("/".join(cell(rows, p, "launches", str) for p in PROVIDERS))
        row.append(cell(rows, "torchvision_msra", "host_syncs", str))
        row.append("/".join(cell(rows, p, "roofline_ms", lambda v: f"{v * 1e3:.0f}") for p in ("groie", "loop")))
        row += [err(rows, p) for p in _OURS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_default_case(summary: dict) -> str:
    lines = [
        f"## GRoIE default case ({summary['description']}): cost model",
        "",
        "| mode | groie MB | loop MB | groie/loop | groie launches | loop launches | H100 roofline µs groie | loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in summary["modes"].items():
        lines.append(
            f"| {mode} | {_mb(m['groie_bytes'])} | {_mb(m['loop_bytes'])} | {m['ratio']:.3f} | "
            f"{m['groie_launches']} | {m['loop_launches']} | {m['groie_roofline_ms'] * 1e3:.0f} | "
            f"{m['loop_roofline_ms'] * 1e3:.0f} |"
        )
    for mode in ("forward", "backward"):
        m = summary["modes"][mode]
        for provider in ("groie", "loop"):
            lines += ["", f"{provider} {mode}, where the bytes go:"]
            for g in m[f"{provider}_breakdown"]:
                lines.append(
                    f"  {g['count']:>2} x {g['what']} [{g['op']}]: {_mb(g['bytes'])} MB, {g['launches']} launch(es)"
                )
    return "\n".join(lines)


def format_compile(compiled: dict) -> str:
    if compiled.get("error"):
        return f"## Compile report\n\ncompile report unavailable: {compiled['error']}"
    lines = [
        "## Compile report summary (max over configs and dtypes)",
        "",
        "| kernel | arch | rows | dtypes | max registers | max spill B | max shared B | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in compiled["summary"]:
        lines.append(
            f"| {s['kernel']} | {s['arch']} | {s['rows']} | {','.join(s['dtypes'])} | "
            f"{s['max_registers']} | {s['max_spill_bytes']} | {s['max_shared_bytes']} | {s['failed']} |"
        )
    return "\n".join(lines)


def format_targets(t: dict) -> str:
    lines = ["## Targets"]
    r = t.get("forward_bytes_ratio")
    if r:
        lines.append(
            f"- modelled groie forward bytes <= {TARGETS['forward_bytes_ratio']} x loop: met in "
            f"{r['met']} of {r['cases']} cases (best {r['best_ratio']:.3f}, worst {r['worst_ratio']:.3f} "
            f"at {r['worst_case']})"
        )
    if "zero_spill" in t:
        z = t["zero_spill"]
        lines.append(
            f"- zero spill: {'met' if z['met'] else 'MISSED'} over {z['kernels_archs']} kernel/arch "
            f"pairs" + (f" ({', '.join(z['spilling_or_failed'])})" if z["spilling_or_failed"] else "")
        )
    for key, label in (
        ("forward_speedup", "groie forward >= 4x loop"),
        ("backward_speedup", "groie backward >= 2x loop"),
        ("roofline_pct", "groie forward >= 60% of DRAM roofline"),
    ):
        if key in t:
            value = t[key]["value"]
            shown = f"{value:.0f}%" if key == "roofline_pct" else f"{value:.2f}x"
            lines.append(f"- {label} at the default case: {shown} ({'met' if t[key]['met'] else 'MISSED'})")
        else:
            lines.append(f"- {label} at the default case: not measured (needs a GPU)")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, timed: bool) -> None:
    """Grouped bars by case, one panel per mode: speedup over loop (GPU) or modelled bytes / loop's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field, label = (
        ("speedup_vs_loop", "speedup over loop") if timed else ("bytes_vs_loop", "modelled DRAM bytes / loop's")
    )
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    case_names = list(dict.fromkeys(r["case"] for r in records))
    providers = [p for p in PROVIDERS if p != "loop" and any(r["provider"] == p for r in records)]
    fig, axes = plt.subplots(
        len(modes), 1, figsize=(max(8.0, 0.35 * len(case_names) + 3), 3.4 * len(modes)), squeeze=False
    )
    width = 0.8 / max(len(providers), 1)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        for i, p in enumerate(providers):
            values = {r["case"]: r[field] for r in records if r["mode"] == mode and r["provider"] == p}
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(case_names))]
            ax.bar(xs, [values.get(c) or 0.0 for c in case_names], width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8, label="loop")
        if not timed and mode == "forward":
            ax.axhline(
                TARGETS["forward_bytes_ratio"],
                color="red",
                linestyle="--",
                linewidth=0.8,
                label="target groie <= 0.35",
            )
        ax.set_title(mode)
        ax.set_ylabel(label)
        ax.set_xticks(range(len(case_names)))
        ax.set_xticklabels(case_names, rotation=90, fontsize=6)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main
def _interpreter_ready() -> bool:
    from groie_triton.kernels import roi_align as kernels
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels._roi_align_fwd_kernel.fn, InterpretedFunction)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 ok, 1 parity failure or provider error, 2 bad usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    has_gpu = torch.cuda.is_available()
    try:
        selected = _check(args, has_gpu)
        if not has_gpu and not args.skip_parity and not _interpreter_ready():
            raise UsageError(
                "without CUDA the kernels must run under the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported (`python -m bench` does), or pass "
                "--skip-parity"
            )
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
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

    failed = [r for r in records if r["error"] or (r["provider"] in _OURS and r["parity_ok"] is False)]
    if args.json:
        payload = {
            "schema": "groie-triton-bench/1",
            "argv": list(sys.argv[1:] if argv is None else argv),
            "device": "cuda" if has_gpu else "cpu",
            "gpu": gpu,
            "versions": versions(),
            "quick": args.quick,
            "roofline": {"gpu": "H100 SXM", "bytes_per_s": H100_SXM_BYTES_PER_S},
            "peak_gbps": _peak_gbps(gpu, args.peak_gbps),
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
