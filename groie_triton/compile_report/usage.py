"""Resource usage of a compiled kernel: cuobjdump / amdgcn parsing, static instruction counts, occupancy."""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton

_NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_CUOBJDUMP = _NVIDIA_BIN / "cuobjdump"


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of an NVIDIA arch that bound theoretical occupancy (CUDA occupancy calculator figures)."""

    max_warps: int
    max_blocks: int
    shared_bytes: int  # shared memory per SM (the carve-out maximum)
    registers: int = 65536  # 32-bit registers per SM (and per block)
    register_granularity: int = 256  # registers allocated per warp in units of this many
    reserved_shared_per_block: int = 1024  # the CUDA runtime reserves 1 KiB per block from sm_80 on


SM_LIMITS: dict[str, SMLimits] = {
    "sm_75": SMLimits(max_warps=32, max_blocks=16, shared_bytes=64 * 1024, reserved_shared_per_block=0),
    "sm_80": SMLimits(max_warps=64, max_blocks=32, shared_bytes=164 * 1024),  # A100: 163 KiB usable per block
    "sm_86": SMLimits(max_warps=48, max_blocks=16, shared_bytes=100 * 1024),
    "sm_89": SMLimits(max_warps=48, max_blocks=24, shared_bytes=100 * 1024),
    "sm_90": SMLimits(max_warps=64, max_blocks=32, shared_bytes=228 * 1024),  # H100: 227 KiB usable per block
    "sm_100": SMLimits(max_warps=64, max_blocks=32, shared_bytes=228 * 1024),
}
"""NVIDIA arch -> SM limits used by :func:`nvidia_occupancy`."""

AMD_MAX_WAVES_PER_SIMD: dict[str, int] = {"gfx90a": 8, "gfx942": 8}
"""Waves per SIMD at full occupancy (LLVM's max waves per EU for CDNA2/CDNA3); occupancy = Occupancy / this."""


# ------------------------------------------------------------------------------------------------ NVIDIA


def parse_cuobjdump(text: str, function: str | None) -> dict[str, int]:
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


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)(\.[^\s;]*)?([^;]*);")


def count_sass_instructions(text: str, function: str | None) -> int:
    """Static SASS instructions of ``function``'s body in ``cuobjdump -sass`` output.

    Counts every instruction line of the function, less the code-alignment padding that ends it (trailing
    NOPs) and the ``BRA`` to itself that ptxas puts after the last EXIT. Falls back to the largest
    function when ``function`` is not found. Raises ``RuntimeError`` when there is no instruction at all.
    """
    functions: dict[str, list[tuple[int, str, str]]] = {}
    current: list[tuple[int, str, str]] | None = None
    for line in text.splitlines():
        header = re.match(r"\s*Function\s*:\s*(\S+)\s*$", line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        match = _SASS_LINE.match(line)
        if match and current is not None:
            current.append((int(match.group(1), 16), match.group(2), match.group(4).strip()))
    functions = {name: body for name, body in functions.items() if body}
    if not functions:
        raise RuntimeError("no SASS instruction in the cuobjdump -sass output")
    body = functions[function] if function in functions else max(functions.values(), key=len)
    end = len(body)
    while end and body[end - 1][1] == "NOP":
        end -= 1
    if end and body[end - 1][1] == "BRA" and _parse_int(body[end - 1][2]) == body[end - 1][0]:
        end -= 1
    return end


def _parse_int(text: str) -> int | None:
    try:
        return int(text.strip().split()[0].rstrip(","), 0)
    except (ValueError, IndexError):
        return None


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(cubin)
        result = subprocess.run([str(_CUOBJDUMP), *flags, path], capture_output=True, text=True, check=False)
    finally:
        os.unlink(path)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(flags)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def nvidia_usage(cubin: bytes, function: str | None) -> dict[str, Any]:
    """Registers, spill, static shared memory and static instruction count of a cubin's kernel."""
    fields = parse_cuobjdump(_cuobjdump(cubin, "--dump-resource-usage"), function)
    stack, local = fields.get("STACK", 0), fields.get("LOCAL", 0)
    return {
        "registers": fields["REG"],
        "spill_bytes": stack + local,
        "static_shared": fields.get("SHARED", 0),
        "stack_bytes": stack,
        "local_bytes": local,
        "instructions": count_sass_instructions(_cuobjdump(cubin, "-sass"), function),
    }


def nvidia_occupancy(arch: str, registers: int, num_warps: int, dynamic_shared: int, static_shared: int) -> dict:
    """Theoretical occupancy on one SM: ``{"warps_per_sm": int, "occupancy": fraction of max_warps}``.

    Resident blocks are the least of: max blocks per SM; max warps / warps per block; warps that the register
    file holds (per-warp allocation ``ceil(registers * 32 / 256) * 256``) / warps per block; shared memory
    per SM / the block's shared memory, which is the dynamic part plus the static part, where the static part
    is at least the 1 KiB the runtime reserves per block (sm_90 cubins already count it as static).
    """
    limits = SM_LIMITS[arch]
    per_warp = math.ceil(max(registers, 1) * 32 / limits.register_granularity) * limits.register_granularity
    block_shared = dynamic_shared + max(static_shared, limits.reserved_shared_per_block)
    if num_warps * per_warp > limits.registers or block_shared > limits.shared_bytes or num_warps > 32:
        blocks = 0
    else:
        blocks = min(
            limits.max_blocks,
            limits.max_warps // num_warps,
            (limits.registers // per_warp) // num_warps,
            limits.shared_bytes // block_shared if block_shared else limits.max_blocks,
        )
    warps = blocks * num_warps
    return {"warps_per_sm": warps, "occupancy": round(warps / limits.max_warps, 4)}


# ---------------------------------------------------------------------------------------------------- AMD


def amdgcn_field(text: str, *patterns: str) -> int | None:
    """The first integer captured by any of ``patterns`` (multiline regexes) in ``text``."""
    for pattern in patterns:
        match = re.search(pattern, text, re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


_AMD_MNEMONIC = re.compile(r"[a-z][a-z0-9_]*$")


def count_amdgcn_instructions(amdgcn: str, function: str | None) -> int:
    """Static instructions of ``function``'s body (its label to its ``.Lfunc_end``) in amdgcn text.

    Directives (``.loc`` ...), comments and labels are not instructions; ``s_nop`` hazard padding inside the
    body is (it issues). Without ``function`` (or when it is not found) the first function is counted.
    Raises ``RuntimeError`` when no function body is found.
    """
    lines = amdgcn.splitlines()
    start = None
    for i, line in enumerate(lines):
        label = re.match(r"^([A-Za-z_.$][\w.$]*):", line)
        if label and not label.group(1).startswith(".") and (function is None or label.group(1) == function):
            start = i + 1
            break
    if start is None and function is not None:
        return count_amdgcn_instructions(amdgcn, None)
    if start is None:
        raise RuntimeError("no function label in the amdgcn text")
    count = 0
    for line in lines[start:]:
        if re.match(r"^\.Lfunc_end\d*:", line):
            return count
        code = line.split(";", 1)[0].strip()
        if not code or code.startswith(".") or code.endswith(":"):
            continue
        if _AMD_MNEMONIC.match(code.split()[0]):
            count += 1
    raise RuntimeError("no .Lfunc_end after the function label in the amdgcn text")


def amd_usage(amdgcn: str, function: str | None = None, arch: str = "gfx942") -> dict[str, Any]:
    """Registers (VGPRs + AGPRs), spill, LDS, waves per SIMD, occupancy and instruction count."""
    total = amdgcn_field(amdgcn, r"^\s*;\s*TotalNumVgprs:\s*(\d+)")
    vgprs = amdgcn_field(amdgcn, r"^\s*;\s*NumVgprs:\s*(\d+)", r"^\s*\.vgpr_count:\s*(\d+)")
    agprs = amdgcn_field(amdgcn, r"^\s*;\s*NumAgprs:\s*(\d+)", r"^\s*\.agpr_count:\s*(\d+)") or 0
    if total is None and vgprs is not None:
        total = vgprs + agprs
    if total is None:
        raise RuntimeError("no NumVgprs / .vgpr_count in the amdgcn text")
    scratch = amdgcn_field(amdgcn, r"^\s*;\s*ScratchSize:\s*(\d+)", r"^\s*\.private_segment_fixed_size:\s*(\d+)")
    vgpr_spills = amdgcn_field(amdgcn, r"^\s*\.vgpr_spill_count:\s*(\d+)") or 0
    sgpr_spills = amdgcn_field(amdgcn, r"^\s*\.sgpr_spill_count:\s*(\d+)") or 0
    lds = amdgcn_field(amdgcn, r"^\s*\.group_segment_fixed_size:\s*(\d+)", r"^\s*;\s*LDSByteSize:\s*(\d+)")
    waves = amdgcn_field(amdgcn, r"^\s*;\s*Occupancy:\s*(\d+)")
    max_waves = AMD_MAX_WAVES_PER_SIMD.get(arch, 8)
    try:
        instructions: int | None = count_amdgcn_instructions(amdgcn, function)
    except RuntimeError:
        instructions = None
    return {
        "registers": total,
        "spill_bytes": max(scratch or 0, 4 * (vgpr_spills + sgpr_spills)),
        "static_shared": lds or 0,
        "scratch_bytes": scratch or 0,
        "vgpr_spills": vgpr_spills,
        "sgpr_spills": sgpr_spills,
        "waves_per_simd": waves,
        "occupancy": None if waves is None else round(waves / max_waves, 4),
        "instructions": instructions,
    }


def instructions_per_output(
    instructions: int | None, num_warps: int | None, warp_size: int, outputs_per_program: int | None
) -> float | None:
    """Static per-thread instructions x threads per program / outputs per program (None when unknown).

    That is the instructions one thread issues per output it writes, were every instruction issued once: a
    thread of a program with ``num_warps * warp_size`` threads writing ``outputs_per_program`` outputs writes
    ``outputs_per_program / threads`` of them. Idle or replicated lanes make it larger, as they should.
    """
    if instructions is None or num_warps is None or not outputs_per_program:
        return None
    return round(instructions * num_warps * warp_size / outputs_per_program, 1)
