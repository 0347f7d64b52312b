"""Compile every shipped kernel config for real GPU targets, without a GPU, and report its resource usage.

``python -m groie_triton.compile_report [--arch sm_80 sm_90 gfx942 ...] [--json PATH] [--kernel NAME ...]
[--dtype fp32 ...] [--enforce-bars]`` compiles every kernel x shipped autotune config x dtype listed by the
kernel modules' ``compile_specs()`` with ``triton.compile(ASTSource(...), target=GPUTarget(...))``, which
needs neither a GPU nor a driver, and prints one row per (kernel, config, arch, dtype), then a summary per
(kernel variant, arch):

- NVIDIA (``sm_*``): registers, stack and local memory and static shared memory are read from the cubin
  with the ``cuobjdump --dump-resource-usage`` that ships inside the triton wheel. ``spill_bytes`` is the
  per-thread stack frame plus local memory: Triton kernels use neither except for register spills.
  ``instructions`` counts the kernel's SASS (``cuobjdump -sass``) less the trailing NOP padding and the
  final branch-to-self. ``occupancy`` is the theoretical one (``warps_per_sm`` / max warps per SM) from
  registers (allocated per warp in units of 256), ``num_warps`` and shared memory (+1 KiB reserved per
  block), with :data:`usage.SM_LIMITS` (sm_80: 64 warps, 32 blocks, 164 KiB; sm_90: 64 warps, 32 blocks,
  228 KiB; 65536 registers).
- AMD (``gfx*``): read from the comments and the metadata block of ``compiled.asm["amdgcn"]``:
  TotalNumVgprs (VGPRs + AGPRs), ScratchSize, ``.vgpr_spill_count``/``.sgpr_spill_count``, Occupancy (waves
  per SIMD, ``waves_per_simd``; ``occupancy`` = waves / 8, the most a SIMD holds on gfx90a/gfx942) and the
  static LDS size. ``spill_bytes`` is ScratchSize, or 4 bytes per spilled register when the spills went to
  AGPRs or VGPR lanes and not to scratch, so that any spill is non-zero. ``instructions`` counts the
  instruction lines of the kernel's body (its label to ``.Lfunc_end``).

``instructions_per_output`` = ``instructions`` x threads per program / ``outputs_per_program``: the static
instructions a thread issues per output it writes (``-`` when the spec gives no ``outputs_per_program``).
Row dtypes use Triton's short names (fp16, bf16, fp32, fp64) whatever the spec spells.
``shared_bytes`` is what a block occupies: Triton's dynamic shared memory (``metadata.shared``) plus the
static shared memory of the binary (on sm_90 the 1 KiB the driver reserves may show up there).

``--json PATH`` writes ``{"rows": [...], "summary": [...], "register_bars": [...]}``: the rows, the
:func:`summary.summarize` entries and the verdicts of :data:`summary.REGISTER_BARS` (register bars on
sm_90 fp32 for the best config of each barred variant, see :func:`register_bars`).

Exit status: 0 when every row compiled without spill, 1 when a row spills or fails to compile (a summary line
names them) or, with ``--enforce-bars``, a register bar is missed, 2 for a usage error (unknown arch, kernel or
dtype; a kernel module that cannot be imported).

Spec format, returned by each kernel module's ``compile_specs()``::

    {"kernel": str, "fn": JITFunction (or the Autotuner / Heuristics wrapping it), "config": triton.Config,
     "config_name": str, "dtype": str, "signature": {arg name: triton type, e.g. "*fp32", "i32", "fp32"},
     "constexprs": {arg name: value}}

A tuple argument (one pointer per pyramid level ...) has a tuple of types, e.g. ``("*fp32",) * 4``.

``config.kwargs`` that name kernel arguments are constexprs as well; other ``config.kwargs`` are backend
options (``waves_per_eu`` ...), as in an autotuned launch. Pointer arguments are compiled as 16-byte aligned,
which is what a launch with freshly allocated torch tensors specializes on; an optional spec key
``"attrs": {arg name: "D" | ""}`` overrides that per argument ("D" = divisible by 16, Triton's own letter).
An optional key ``"outputs_per_program": int`` (outputs one program writes) gives instructions per output.

Modules: :mod:`.specs` (collect, validate), :mod:`.compile` (triton.compile, interpreter workarounds),
:mod:`.usage` (cuobjdump / amdgcn parsing, instruction counts, occupancy), :mod:`.runner` (``report``,
process pool, cache), :mod:`.summary` (summary, register bars), :mod:`.cli` (table, summary text, ``main``).
"""

from __future__ import annotations

from .cli import format_summary, format_table, main
from .compile import compile_kernel
from .runner import report
from .specs import ARCHS, DEFAULT_ARCHS, KERNEL_MODULES, ROW_FIELDS, ReportUsageError, collect_specs
from .summary import BAR_ARCH, BAR_DTYPE, REGISTER_BARS, check_register_bars, register_bars, summarize

__all__ = [
    "ARCHS",
    "BAR_ARCH",
    "BAR_DTYPE",
    "DEFAULT_ARCHS",
    "KERNEL_MODULES",
    "REGISTER_BARS",
    "ROW_FIELDS",
    "ReportUsageError",
    "check_register_bars",
    "collect_specs",
    "compile_kernel",
    "format_summary",
    "format_table",
    "main",
    "register_bars",
    "report",
    "summarize",
]
