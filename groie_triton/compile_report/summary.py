"""Per-variant summary of report rows, and the register bars that tests enforce."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BAR_ARCH = "sm_90"
"""The arch the register bars apply to."""

BAR_DTYPE = "fp32"
"""The dtype the register bars apply to."""

REGISTER_BARS: dict[str, int] = {
    "roi_align_fwd[sum]": 64,
    "roi_align_bwd[sum]": 48,
}
"""Kernel variant -> most registers per thread its best shipped config may use on BAR_ARCH in BAR_DTYPE."""


def register_bars() -> dict[str, int]:
    """A copy of :data:`REGISTER_BARS` (kernel variant -> register bar on :data:`BAR_ARCH`, :data:`BAR_DTYPE`)."""
    return dict(REGISTER_BARS)


def _ok(row: dict) -> bool:
    return not row.get("error") and row.get("registers") is not None


def best_row(rows: Sequence[dict]) -> dict | None:
    """The best of one variant's rows: spill-free first, then fewest registers, then highest occupancy.

    "Best config" in the register bars is this row: the config that needs the fewest registers (the one a
    bar can be met by). Rows that failed to compile are ignored; None when none compiled.
    """
    compiled = [row for row in rows if _ok(row)]
    if not compiled:
        return None
    return min(compiled, key=lambda r: (bool(r["spill_bytes"]), r["registers"], -(r.get("occupancy") or 0)))


def check_register_bars(rows: Sequence[dict], bars: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """One verdict per barred variant: ``{kernel, arch, dtype, bar, registers, config, ok, message}``.

    ``rows``: report rows (only those of :data:`BAR_ARCH` and :data:`BAR_DTYPE` count). A variant with no
    compiled row there fails with a message saying so.
    """
    verdicts = []
    for kernel, bar in (REGISTER_BARS if bars is None else bars).items():
        mine = [r for r in rows if r["kernel"] == kernel and r["arch"] == BAR_ARCH and r["dtype"] == BAR_DTYPE]
        best = best_row(mine)
        verdict: dict[str, Any] = {"kernel": kernel, "arch": BAR_ARCH, "dtype": BAR_DTYPE, "bar": bar,
                                   "registers": None, "config": None, "ok": False}
        if best is None:
            verdict["message"] = (f"{kernel}: no compiled {BAR_DTYPE} row on {BAR_ARCH} "
                                  f"({len(mine)} rows) to check its register bar of {bar}")
        else:
            verdict.update(registers=best["registers"], config=best["config"], ok=best["registers"] <= bar)
            relation = "<=" if verdict["ok"] else ">"
            verdict["message"] = (f"{kernel}: best config {best['config']} uses {best['registers']} registers on "
                                  f"{BAR_ARCH} {BAR_DTYPE} {relation} bar {bar} ({len(mine)} configs)")
        verdicts.append(verdict)
    return verdicts


def summarize(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """Per (kernel variant, arch): rows, dtypes, failed, min/max registers, max spill and shared bytes, the
    best occupancy (and its config, warps per SM or waves per SIMD) and the fewest instructions per output.

    Entries are in first-seen order; figures are None where no row of the group compiled.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["arch"]), []).append(row)
    summary = []
    for (kernel, arch), group in groups.items():
        compiled = [r for r in group if _ok(r)]
        entry: dict[str, Any] = {
            "kernel": kernel,
            "arch": arch,
            "rows": len(group),
            "dtypes": list(dict.fromkeys(r["dtype"] for r in group)),
            "failed": len(group) - len(compiled),
            "min_registers": min((r["registers"] for r in compiled), default=None),
            "max_registers": max((r["registers"] for r in compiled), default=None),
            "max_spill_bytes": max((r["spill_bytes"] or 0 for r in compiled), default=None),
            "max_shared_bytes": max((r["shared_bytes"] or 0 for r in compiled), default=None),
            "best_occupancy": None,
            "best_occupancy_config": None,
            "best_warps_per_sm": None,
            "best_waves_per_simd": None,
            "min_instructions_per_output": min(
                (r["instructions_per_output"] for r in compiled if r.get("instructions_per_output") is not None),
                default=None,
            ),
        }
        with_occupancy = [r for r in compiled if r.get("occupancy") is not None]
        if with_occupancy:
            best = max(with_occupancy, key=lambda r: (r["occupancy"], -r["registers"]))
            entry.update(
                best_occupancy=best["occupancy"],
                best_occupancy_config=f"{best['config']}/{best['dtype']}",
                best_warps_per_sm=best.get("warps_per_sm"),
                best_waves_per_simd=best.get("waves_per_simd"),
            )
        summary.append(entry)
    return summary
