"""The command line: argument parser, markdown table and summary, JSON output, exit status."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import report
from .specs import ARCHS, DEFAULT_ARCHS, ROW_FIELDS, ReportUsageError
from .summary import BAR_ARCH, BAR_DTYPE, check_register_bars, summarize

TABLE_COLUMNS: tuple[str, ...] = (
    *ROW_FIELDS,
    "num_warps",
    "num_stages",
    "occupancy",
    "warps_per_sm",
    "waves_per_simd",
    "instructions",
    "instructions_per_output",
    "compile_s",
)
"""Columns of :func:`format_table` (plus ``error`` when a row failed)."""

SUMMARY_COLUMNS: tuple[str, ...] = (
    "kernel",
    "arch",
    "rows",
    "failed",
    "min_registers",
    "max_registers",
    "max_spill_bytes",
    "best_occupancy",
    "best_occupancy_config",
    "min_instructions_per_output",
)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value).replace("|", "/")


def _markdown(columns: Sequence[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def format_table(rows: Sequence[dict]) -> str:
    """Rows as a markdown table: contract fields, warps, stages, occupancy (warps per SM on NVIDIA, waves per
    SIMD on AMD), static instructions and instructions per output, compile time, and the error if any.
    ``-`` marks a figure that does not apply or is unknown."""
    columns = list(TABLE_COLUMNS)
    if any(row.get("error") for row in rows):
        columns.append("error")
    lines = []
    for row in rows:
        cells = [_cell(row.get(column)) for column in columns]
        if row.get("error"):
            # Triton's messages span lines (source excerpt, caret, reason): one line, the reason kept.
            parts = [line.strip() for line in row["error"].splitlines() if line.strip()]
            if len(parts) > 3:
                parts = [parts[0], "...", *parts[-2:]]
            cells[-1] = " / ".join(parts)[:300].replace("|", "/")
        lines.append(cells)
    return _markdown(columns, lines)


def format_summary(summary: Sequence[dict], bars: Sequence[dict] = ()) -> str:
    """The :func:`summarize` entries as a markdown table, then one line per register bar verdict."""
    text = _markdown(SUMMARY_COLUMNS, [[_cell(entry.get(c)) for c in SUMMARY_COLUMNS] for entry in summary])
    lines = [text]
    for verdict in bars:
        lines.append(f"register bar {'PASS' if verdict['ok'] else 'FAIL'}: {verdict['message']}")
    return "\n".join(lines)


def status_line(rows: Sequence[dict]) -> tuple[int, str]:
    """(exit status, the OK/FAIL line): 1 when a row spills or failed to compile."""
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
        "registers, spill, shared memory, theoretical occupancy and static instructions (per output), then a "
        "summary per kernel variant and arch. Exit 1 if a row spills or fails (or, with --enforce-bars, a "
        "register bar is missed), 2 on a usage error.",
    )
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help=f"from {', '.join(ARCHS)}")
    parser.add_argument("--kernel", nargs="+", default=None, help="only these kernel names")
    parser.add_argument("--dtype", nargs="+", default=None, help="only these dtypes (fp16 bf16 fp32 fp64)")
    parser.add_argument(
        "--json", type=Path, default=None, help='write {"rows": [...], "summary": [...], "register_bars": [...]}'
    )
    parser.add_argument("--module", nargs="+", default=None, help="kernel modules (default: shipped)")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument(
        "--no-fp-fusion", action="store_true", help="compile with enable_fp_fusion=False (default: True)"
    )
    parser.add_argument(
        "--enforce-bars", action="store_true", help="exit 1 when a barred variant misses its register bar"
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
    summary = summarize(rows)
    # Bars are only judged where this run compiled their arch and dtype for the barred variant.
    judged = {(r["kernel"]) for r in rows if r["arch"] == BAR_ARCH and r["dtype"] == BAR_DTYPE}
    bars = [verdict for verdict in check_register_bars(rows) if verdict["kernel"] in judged]
    print(format_table(rows))
    print()
    print(format_summary(summary, bars))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"rows": rows, "summary": summary, "register_bars": bars}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    status, line = status_line(rows)
    if args.enforce_bars and not all(verdict["ok"] for verdict in bars):
        status = 1
        line = line.replace("OK: ", "FAIL (register bar): ", 1)
    print(line)
    return status
