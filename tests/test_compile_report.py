"""The compile report: kernels compile for NVIDIA and AMD targets without a GPU, and spills are caught."""

from __future__ import annotations

import json
import sys
import types

import pytest
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from groie_triton import compile_report
from groie_triton.compile_report import (
    ROW_FIELDS,
    ReportUsageError,
    collect_specs,
    compile_kernel,
    main,
    report,
)

REAL_ARCHS = ("sm_80", "sm_90", "gfx942")
REAL_DTYPES = ("fp32",)
TOY_ARCHS = ("sm_80", "sm_90", "gfx942")


@triton.jit
def _scale_shift(x, scale):
    return x * scale + 1.0


@triton.jit
def _toy_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(y_ptr + offsets, _scale_shift(x, scale), mask=mask)


@triton.jit
def _huge_tile_kernel(f_ptr, y_ptr, pos_ptr, H, W, BINS: tl.constexpr, CHANNELS: tl.constexpr):
    # A [BINS x CHANNELS] bilinear tile with 4 samples of 4 gathers each: far too much live state per thread.
    bins = tl.program_id(0) * BINS + tl.arange(0, BINS)
    channels = tl.arange(0, CHANNELS)
    y = tl.load(pos_ptr + 2 * bins)
    x = tl.load(pos_ptr + 2 * bins + 1)
    y0 = tl.floor(y).to(tl.int32)
    x0 = tl.floor(x).to(tl.int32)
    ly = (y - y0)[:, None]
    lx = (x - x0)[:, None]
    base = f_ptr + channels[None, :] * H * W
    acc = tl.zeros((BINS, CHANNELS), tl.float32)
    for s in tl.static_range(4):
        top = ((y0 + s) * W + x0 + s)[:, None]
        v00 = tl.load(base + top)
        v01 = tl.load(base + top + 1)
        v10 = tl.load(base + top + W)
        v11 = tl.load(base + top + W + 1)
        acc += (1 - ly) * (1 - lx) * v00 + (1 - ly) * lx * v01 + ly * (1 - lx) * v10 + ly * lx * v11
    tl.store(y_ptr + bins[:, None] * CHANNELS + channels[None, :], acc)


def _toy_specs(kernel_name: str = "toy") -> list[dict]:
    specs = []
    for dtype in ("fp32", "fp16"):
        for block, warps in ((256, 4), (1024, 8)):
            specs.append(
                {
                    "kernel": kernel_name,
                    "fn": _toy_kernel,
                    "config": triton.Config({"BLOCK": block}, num_warps=warps, num_stages=2),
                    "config_name": f"BLOCK{block}_w{warps}",
                    "dtype": dtype,
                    "signature": {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "n": "i32", "scale": "fp32"},
                    "constexprs": {},
                }
            )
    return specs


def _huge_specs() -> list[dict]:
    return [
        {
            "kernel": "huge_tile",
            "fn": _huge_tile_kernel,
            "config": triton.Config({"BINS": 128, "CHANNELS": 64}, num_warps=4, num_stages=2),
            "config_name": "BINS128_C64_w4",
            "dtype": "fp32",
            "signature": {"f_ptr": "*fp32", "y_ptr": "*fp32", "pos_ptr": "*fp32", "H": "i32", "W": "i32"},
            "constexprs": {},
        }
    ]


@pytest.fixture
def fake_modules(monkeypatch):
    """Two in-memory kernel modules (not importable by a worker process, so compiled in this process)."""
    toy = types.ModuleType("fake_groie_toy_kernels")
    toy.compile_specs = _toy_specs
    huge = types.ModuleType("fake_groie_huge_kernels")
    huge.compile_specs = _huge_specs
    monkeypatch.setitem(sys.modules, toy.__name__, toy)
    monkeypatch.setitem(sys.modules, huge.__name__, huge)
    return toy.__name__, huge.__name__


@pytest.mark.parametrize("arch", TOY_ARCHS)
def test_toy_kernel_compiles_without_spill(arch):
    row = compile_kernel(_toy_specs()[0], arch)
    assert set(ROW_FIELDS) <= set(row)
    assert (row["kernel"], row["config"], row["arch"], row["dtype"]) == ("toy", "BLOCK256_w4", arch, "fp32")
    assert 0 < row["registers"] <= 255
    assert row["spill_bytes"] == 0
    assert row["shared_bytes"] >= 0
    assert row["error"] is None
    if arch.startswith("gfx"):
        assert row["scratch_bytes"] == 0 and row["vgpr_spills"] == 0 and row["occupancy"] > 0
    else:
        assert row["stack_bytes"] == 0 and row["local_bytes"] == 0


def test_interpreted_kernel_compiles_like_the_jit_kernel():
    # Under TRITON_INTERPRET=1 @triton.jit gives InterpretedFunctions; the report must compile those too.
    spec = _toy_specs()[0]
    interpreted = {**spec, "fn": InterpretedFunction(_toy_kernel.fn)}
    assert compile_kernel(interpreted, "sm_80")["registers"] == compile_kernel(spec, "sm_80")["registers"]


def test_huge_tile_spills_and_cli_exits_1(fake_modules, tmp_path, capsys):
    _, huge = fake_modules
    path = tmp_path / "rows.json"
    status = main(["--arch", "sm_80", "--module", huge, "--json", str(path)])
    out = capsys.readouterr().out
    assert status == 1
    rows = json.loads(path.read_text())
    assert len(rows) == 1 and rows[0]["spill_bytes"] > 0 and rows[0]["registers"] == 255
    assert "FAIL" in out and "1 spill" in out and "huge_tile/BINS128_C64_w4/sm_80/fp32" in out


def test_json_rows_have_the_contract_fields(fake_modules, tmp_path, capsys):
    toy, _ = fake_modules
    path = tmp_path / "out" / "rows.json"
    status = main(["--arch", "sm_80", "gfx942", "--module", toy, "--dtype", "float16", "--json", str(path)])
    out = capsys.readouterr().out
    assert status == 0
    rows = json.loads(path.read_text())
    assert len(rows) == 2 * 2  # configs x archs, fp16 only
    for row in rows:
        assert set(ROW_FIELDS) <= set(row)
        assert row["dtype"] == "fp16" and row["registers"] > 0 and row["spill_bytes"] == 0
    assert out.splitlines()[0].startswith("| kernel | config | arch | dtype | registers | spill_bytes |")
    assert out.splitlines()[-1].startswith("OK: 4 rows")


def test_unknown_arch_exits_2_with_message(capsys):
    assert main(["--arch", "sm_80", "sm_81"]) == 2
    assert "unknown arch 'sm_81'" in capsys.readouterr().err


def test_unknown_kernel_and_dtype_exit_2(fake_modules, capsys):
    toy, _ = fake_modules
    assert main(["--arch", "sm_80", "--module", toy, "--kernel", "nope"]) == 2
    assert "unknown kernel 'nope'" in capsys.readouterr().err
    assert main(["--arch", "sm_80", "--module", toy, "--dtype", "fp8"]) == 2
    assert "unknown dtype 'fp8'" in capsys.readouterr().err


def test_missing_kernel_module_is_a_usage_error():
    with pytest.raises(ReportUsageError, match="no_such_kernels"):
        collect_specs(["groie_triton.no_such_kernels"])


def test_results_are_reused_per_fn_config_dtype_arch(fake_modules, monkeypatch):
    monkeypatch.setattr(compile_report, "_RESULTS", {})
    calls = []
    real_compile = compile_report.compile_kernel

    def counting_compile(spec, arch, **kwargs):
        calls.append((spec["kernel"], arch))
        return real_compile(spec, arch, **kwargs)

    monkeypatch.setattr(compile_report, "compile_kernel", counting_compile)
    specs = _toy_specs("toy_a")[:1] + _toy_specs("toy_b")[:1]  # same fn, config and dtype
    rows = report(["sm_80"], specs=specs, workers=1)
    assert [row["kernel"] for row in rows] == ["toy_a", "toy_b"]
    assert rows[0]["registers"] == rows[1]["registers"]
    assert calls == [("toy_a", "sm_80")]
    report(["sm_80"], specs=specs, workers=1)
    assert len(calls) == 1


def test_cuobjdump_and_amdgcn_text_are_parsed():
    cuobjdump = (
        "\nResource usage:\n Common:\n  GLOBAL:0\n Function _roi_align_fwd_kernel:\n"
        "  REG:255 STACK:336 SHARED:1024 LOCAL:8 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    fields = compile_report._parse_cuobjdump(cuobjdump, "_roi_align_fwd_kernel")
    assert (fields["REG"], fields["STACK"], fields["SHARED"], fields["LOCAL"]) == (255, 336, 1024, 8)
    amdgcn = (
        "; NumVgprs: 256\n; NumAgprs: 256\n; TotalNumVgprs: 512\n; ScratchSize: 2524\n; Occupancy: 1\n"
        "    .group_segment_fixed_size: 0\n    .sgpr_spill_count: 0\n    .vgpr_spill_count: 650\n"
    )
    usage = compile_report._amd_usage(amdgcn)
    assert (usage["registers"], usage["spill_bytes"], usage["occupancy"]) == (512, 2600, 1)
    assert usage["scratch_bytes"] == 2524 and usage["vgpr_spills"] == 650


def test_every_shipped_config_compiles_without_spill():
    # Every shipped config on sm_80, sm_90 and gfx942, in fp32 only: that is ~300 s of compiler CPU time
    # cold (2 workers; ~0 once Triton's cache is warm), each further dtype as much again. The CLI
    # (`python -m groie_triton.compile_report`, run by `make bench`) covers every dtype.
    rows = report(REAL_ARCHS, dtypes=REAL_DTYPES)
    assert rows, "the kernel modules list no compile specs"
    bad = [row for row in rows if row["error"] or row["spill_bytes"]]
    assert not bad, "\n" + compile_report.format_table(bad)
