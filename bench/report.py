"""What a sweep reports: the markdown table, the GRoIE default case's cost model, the compile-report summary,
issue 5's targets, and the plot.

Every function here reads records (:func:`bench.runner.run_sweep`) or the cost model; nothing runs a kernel.
:func:`compile_summary` compiles through the compile report's public API (``collect_specs``, ``report``) and
names kernels and configs only as the report does (``kernel``, ``config_name``), never by their constexprs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from bench import cases as C
from bench.cost_model import MODES, PROVIDERS, Cost, Problem, cost
from bench.runner import error_text

__all__ = [
    "TARGETS",
    "OURS",
    "QUICK_ARCHS",
    "default_case_summary",
    "gather_efficiency",
    "default_case_kernels",
    "compile_summary",
    "targets",
    "format_table",
    "format_default_case",
    "format_compile",
    "format_targets",
    "plot",
]

TARGETS = {"forward_bytes_ratio": 0.35, "forward_speedup": 4.0, "backward_speedup": 2.0, "roofline_pct": 60.0}
"""Issue 5's targets: modelled fused/loop forward bytes (everywhere), and on a GPU at the default case the
speedups over loop and the fraction of the DRAM roofline."""
DEFAULT_CASE_KERNELS = ("roi_align_fwd[sum]", "roi_align_bwd[sum]")
"""The compile report's names of the kernels the GRoIE default case launches, where the report has them
(otherwise :func:`default_case_kernels` takes the first forward and backward kernel it lists)."""
ROI_ALIGN_MODULE = "groie_triton.kernels.roi_align"
QUICK_ARCHS = ("sm_80",)
OURS = ("groie", "groie_single", "groie_deterministic")
"""Providers of this library: parity-checked, a failure is exit status 1."""


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
                {"op": op.name, "what": _group(k.what), "count": 0, "launches": 0, "bytes": 0, "sector_bytes": 0},
            )
            g["count"] += 1
            g["launches"] += k.launches
            g["bytes"] += k.read + k.written
            g["sector_bytes"] += k.sector_bytes
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
            "groie_sector_bytes": g.sector_bytes,
            "loop_sector_bytes": lp.sector_bytes,
            "sector_ratio": g.sector_bytes / lp.sector_bytes,
            "groie_launches": g.launches,
            "loop_launches": lp.launches,
            "groie_roofline_ms": g.roofline_ms(),
            "loop_roofline_ms": lp.roofline_ms(),
            "groie_breakdown": _breakdown(g),
            "loop_breakdown": _breakdown(lp),
        }
    out["gathers"] = gather_efficiency(prob)
    return out


def gather_efficiency(prob: Problem) -> list[dict]:
    """Per level, the forward gathers of every RoI before the level-size bound: bytes used, and sectors per
    warp load of groie's kernel (in the problem's layout and in channels_last) and of torchvision's (NCHW).

    At the default case every level's gathers exceed its size, so the bounded totals hide the layouts'
    difference; these unbounded figures show it (what the SMs request from L2, before any reuse).
    """
    k, d = prob.num_rois, prob.dtype
    cl = dataclasses.replace(prob, channels_last=True)
    rows = []
    for lvl in range(prob.num_levels):
        used = prob.gathered(lvl, k, d, bounded=False)
        sectors = {
            "groie": prob.gathered_sectors(lvl, k, d, mapped=False, bounded=False),
            "groie_channels_last": cl.gathered_sectors(lvl, k, d, mapped=False, bounded=False),
            "torchvision": prob.gathered_sectors(lvl, k, prob.tv, mapped=False, torchvision=True, bounded=False),
        }
        rows.append(
            {
                "level": lvl,
                "level_bytes": prob.level(lvl, d),
                "used_bytes": used,
                **{f"{name}_sector_bytes": v for name, v in sectors.items()},
            }
        )
    return rows


def default_case_kernels(specs: Sequence[dict]) -> list[str]:
    """The compile report's names of the kernels the GRoIE default case launches: :data:`DEFAULT_CASE_KERNELS`
    where ``specs`` have them, else the first forward and the first backward kernel the specs list."""
    known = list(dict.fromkeys(s["kernel"] for s in specs))
    named = [k for k in DEFAULT_CASE_KERNELS if k in known]
    if named:
        return named
    picked = [next((k for k in known if tag in k), None) for tag in ("fwd", "bwd")]
    return [k for k in picked if k] or known[:1]


def _quick_specs(specs: Sequence[dict]) -> list[dict]:
    """One fp32 spec (the first listed: a shipped config) per kernel of the default case."""
    chosen = {}
    for spec in specs:
        if spec["dtype"] in ("float32", "fp32") and spec["kernel"] in default_case_kernels(specs):
            chosen.setdefault(spec["kernel"], spec)
    return list(chosen.values())


def compile_summary(quick: bool, archs: Sequence[str] | None) -> dict:
    """Compile-report rows and, per (kernel, arch), max registers, max spill and configs compiled.

    ``quick``: the default case's forward and backward kernels, fp32, one shipped config each, on
    :data:`QUICK_ARCHS` (unless ``archs``): two compiles instead of every config. Never raises: a broken compile
    report gives ``{"error": ...}``. Compiles run in the report's spawned worker processes: once the Triton
    interpreter has run a kernel in a process, it leaves ``triton.language`` patched and a fresh
    ``triton.compile`` there fails (triton 3.8: "'ir.value' object has no attribute 'dtype'").
    """
    try:
        from groie_triton import compile_report as cr

        if quick:
            specs = _quick_specs(cr.collect_specs([ROI_ALIGN_MODULE]))
            rows = cr.report(archs or QUICK_ARCHS, specs=specs, workers=2)
        else:
            rows = cr.report(archs or cr.DEFAULT_ARCHS, workers=2)
    except Exception as exc:  # noqa: BLE001 - the benchmark still reports everything else
        return {"error": error_text(exc), "rows": [], "summary": []}
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
        "sector MB groie/loop",
        "groie/loop sectors",
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
        row.append("/".join(cell(rows, p, "modeled_sector_bytes", _mb) for p in ("groie", "loop")))
        row.append(cell(rows, "groie", "sector_bytes_vs_loop", lambda v: f"{v:.3f}"))
        row.append("/".join(cell(rows, p, "launches", str) for p in PROVIDERS))
        row.append(cell(rows, "torchvision_msra", "host_syncs", str))
        row.append("/".join(cell(rows, p, "roofline_ms", lambda v: f"{v * 1e3:.0f}") for p in ("groie", "loop")))
        row += [err(rows, p) for p in OURS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_default_case(summary: dict) -> str:
    lines = [
        f"## GRoIE default case ({summary['description']}): cost model",
        "",
        "| mode | groie MB | loop MB | groie/loop | sector MB groie | loop | groie/loop | groie launches | "
        "loop launches | H100 roofline µs groie | loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in summary["modes"].items():
        lines.append(
            f"| {mode} | {_mb(m['groie_bytes'])} | {_mb(m['loop_bytes'])} | {m['ratio']:.3f} | "
            f"{_mb(m['groie_sector_bytes'])} | {_mb(m['loop_sector_bytes'])} | {m['sector_ratio']:.3f} | "
            f"{m['groie_launches']} | {m['loop_launches']} | {m['groie_roofline_ms'] * 1e3:.0f} | "
            f"{m['loop_roofline_ms'] * 1e3:.0f} |"
        )
    lines += [
        "",
        "Forward gathers per level before the level-size bound (MB): bytes used, then whole 32-byte sectors per "
        "warp load",
        "",
        "| level | level MB | used MB | groie sectors | groie channels_last | torchvision (NCHW) "
        "| used/sectors groie |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in summary["gathers"]:
        lines.append(
            f"| {g['level']} | {_mb(g['level_bytes'])} | {_mb(g['used_bytes'])} | {_mb(g['groie_sector_bytes'])} | "
            f"{_mb(g['groie_channels_last_sector_bytes'])} | {_mb(g['torchvision_sector_bytes'])} | "
            f"{g['used_bytes'] / max(g['groie_sector_bytes'], 1):.2f} |"
        )
    for mode in ("forward", "backward"):
        m = summary["modes"][mode]
        for provider in ("groie", "loop"):
            lines += ["", f"{provider} {mode}, where the bytes go:"]
            for g in m[f"{provider}_breakdown"]:
                lines.append(
                    f"  {g['count']:>2} x {g['what']} [{g['op']}]: {_mb(g['bytes'])} MB "
                    f"({_mb(g['sector_bytes'])} MB in sectors), {g['launches']} launch(es)"
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
