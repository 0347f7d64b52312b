"""``python -m bench.gpu_check --out DIR``: the one check for a fresh CUDA machine (``make gpu-check OUT=DIR``).

Steps, each in its own time budget so that the whole stays under 8 minutes on an H100/H200:

1. ``pytest tests/gpu`` with ``TRITON_INTERPRET=0`` (compiled kernels), in parallel with pytest-xdist when it
   is installed, ``--junitxml DIR/gpu-tests.xml``; log in ``DIR/pytest.log``.
2. ``python -m bench --quick --json DIR/bench-quick.json``: every provider and mode on the quick cases, the
   GRoIE default case among them (speedups over ``loop``, % of the DRAM roofline); log in ``DIR/bench.log``.
3. In this process: the default case (and the quick fp16 channels_last case) forward and backward through the
   public ops, autotuned; then each autotuner's ``best_config`` and the registers / spills / shared memory of
   the kernel compiled for it (``CompiledKernel.n_regs`` / ``n_spills`` / ``metadata.shared``, read on launch).

Writes ``DIR/summary.json`` (and ``DIR/summary.md``, the table printed last): pass / fail / error / skip
counts, the default case's timings per provider and mode with speedup over loop and % of roofline, and the
autotuned configs' registers. Exit status: 0 when every step passed, 1 when a test failed or a step failed or
ran out of time, 2 without a CUDA device (nothing is run).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CASE_NAME = "K1024-C256-7x7-L4-fp32-nchw"  # bench.cases.DEFAULT_CASE.name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for summary.json and the logs")
    p.add_argument(
        "--budget",
        type=float,
        default=450.0,
        help="seconds for the whole check (default 450: `make gpu-check` stays under 8 minutes with the "
        "venv); the benchmark gets what the tests leave, less 30 s for the register readout",
    )
    p.add_argument("--test-timeout", type=float, default=210.0, help="seconds for pytest tests/gpu (default 210)")
    p.add_argument(
        "--bench-timeout",
        type=float,
        default=240.0,
        help="at most this many seconds for the quick benchmark (default 240)",
    )
    p.add_argument("--workers", type=int, default=6, help="pytest-xdist workers (0: none; default 6)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    return p


def _run(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run cmd from the repo root, output to log; {returncode, elapsed_s, timed_out, command}."""
    start = time.perf_counter()
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)  # the whole group: pytest-xdist workers too
            rc = proc.wait()
    return {
        "command": " ".join(cmd),
        "returncode": rc,
        "timed_out": timed_out,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }


def parse_junit(path: Path) -> dict:
    """{tests, passed, failed, errors, skipped, failures: [test ids]} from a pytest junit xml file."""
    if not path.exists():
        return {
            "tests": 0,
            "passed": 0,
            "failed": 0,
            "errors": 0,
            "skipped": 0,
            "failures": [],
            "note": "no junit xml (pytest did not finish)",
        }
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for s in suites:
        counts["tests"] += int(s.get("tests", 0))
        counts["failed"] += int(s.get("failures", 0))
        counts["errors"] += int(s.get("errors", 0))
        counts["skipped"] += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is not None:
                msg = (bad.get("message") or "").strip().splitlines()
                failures.append(f"{case.get('classname')}::{case.get('name')}: {msg[0][:200] if msg else ''}")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {**counts, "failures": failures}


_OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR)\b")


def parse_log(path: Path) -> dict:
    """Counts from a ``pytest -v`` log, for a run that was stopped before it wrote its junit xml."""
    counts = {"PASSED": 0, "FAILED": 0, "SKIPPED": 0, "ERROR": 0}
    failures = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            m = _OUTCOME.search(line)
            if m and "tests/gpu/" in line and "::" in line:
                counts[m.group(1)] += 1
                if m.group(1) in ("FAILED", "ERROR"):
                    failures.append(line.strip()[:240])
    return {
        "tests": sum(counts.values()),
        "passed": counts["PASSED"],
        "failed": counts["FAILED"],
        "errors": counts["ERROR"],
        "skipped": counts["SKIPPED"],
        "failures": failures,
        "note": "counted from pytest.log: pytest was stopped before it wrote its junit xml",
    }


def bench_rows(path: Path) -> dict:
    """The default case per provider and mode, and every record condensed, from bench's --json output."""
    if not path.exists():
        return {"default_case": [], "records": [], "note": "no bench json"}
    data = json.loads(path.read_text())
    keep = (
        "case",
        "provider",
        "mode",
        "median_ms",
        "q20_ms",
        "q80_ms",
        "speedup_vs_loop",
        "roofline_pct",
        "gbps",
        "modeled_bytes",
        "launches",
        "max_abs_err",
        "parity_ok",
        "error",
    )
    records = [{k: r.get(k) for k in keep} for r in data.get("records", [])]
    default = [r for r in records if r["case"] == DEFAULT_CASE_NAME]
    if not default and records:  # the name format changed: the first case of --quick is the default one
        first = records[0]["case"]
        default = [r for r in records if r["case"] == first]
    return {
        "default_case": default,
        "records": records,
        "targets": data.get("targets"),
        "peak_gbps": data.get("peak_gbps"),
        "timer": data.get("timer"),
    }


def _compiled_info(kernel) -> dict:
    """Registers, spills and shared memory of a triton CompiledKernel (loaded on its first launch)."""
    info = {}
    init = getattr(kernel, "_init_handles", None)
    if callable(init):
        try:
            init()
        except Exception:  # noqa: BLE001 - best effort: report what is readable
            pass
    for name in ("n_regs", "n_spills", "n_max_threads"):
        value = getattr(kernel, name, None)
        if isinstance(value, int):
            info[name] = value
    meta = getattr(kernel, "metadata", None)
    for name in ("shared", "num_warps", "num_stages", "maxnreg"):
        value = getattr(meta, name, None) if meta is not None else None
        if isinstance(value, (int, float)):
            info[name] = value
    return info


def _steps() -> list[tuple[str, object]]:
    """(case name, a forward+backward callable) for the bench's default case and its fp16 channels_last quick
    case: built by bench.cases itself where it can (the same tensors as the timed runs, so the same kernel
    specializations, already in Triton's on-disk cache), else rebuilt here from the public API."""
    try:
        from bench import cases as C

        picked = [c for c in C.QUICK if c == C.DEFAULT_CASE or c.dtype == "fp16"][:2]
        return [
            (c.name, C.mode_callable("groie", C.make_inputs(c, C.full_size(c), "cuda"), "forward_backward"))
            for c in picked
        ]
    except Exception:  # noqa: BLE001 - bench.cases is an internal module: fall back to the public API
        pass
    import torch

    import groie_triton
    from groie_triton.testing import make_pyramid, random_rois

    steps = []
    for name, k, c, o, levels, dtype, cl in [  # (name, K, C, output, levels, dtype, channels_last)
        (DEFAULT_CASE_NAME, 1024, 256, 7, 4, torch.float32, False),
        ("K512-C64-14x14-L5-fp16-channels_last", 512, 64, 14, 5, torch.float16, True),
    ]:
        feats = make_pyramid(
            n=2,
            c=c,
            image=(800, 1216),
            strides=[4, 8, 16, 32, 64][:levels],
            dtype=dtype,
            channels_last=cl,
            device="cuda",
        )
        feats = [f.requires_grad_() for f in feats]
        rois = random_rois(n=2, image=(800, 1216), k=k, min_size=16, max_size=600, device="cuda")
        scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64][:levels]
        steps.append((name, functools.partial(_forward_backward, groie_triton, feats, rois, o, scales)))
    return steps


def autotuned_registers() -> list[dict]:
    """Run the cases forward and backward (autotuning them), then once more with every autotuner's JIT ``run``
    wrapped to catch the CompiledKernel of its best config; read its registers, spills and shared memory."""
    import torch
    from groie_triton.kernels import roi_align as K
    from triton.runtime.autotuner import Autotuner

    tuners = {n: t for n, t in sorted(vars(K).items()) if isinstance(t, Autotuner)}
    rows = []
    for name, step in _steps():
        step()  # autotune
        torch.cuda.synchronize()
        caught = _launch_catching(tuners, step)
        for tname, t in tuners.items():
            if tname not in caught:
                continue
            best = getattr(t, "best_config", None)
            rows.append(
                {
                    "case": name,
                    "kernel": tname,
                    "config": str(best),
                    "config_kwargs": dict(getattr(best, "kwargs", {}) or {}),
                    "num_warps": getattr(best, "num_warps", None),
                    **_compiled_info(caught[tname]),
                }
            )
    return rows


def _forward_backward(groie_triton, feats, rois, output_size, scales) -> None:
    import torch

    out = groie_triton.multilevel_roi_align(feats, rois, output_size, scales, 2, True, "sum")
    torch.autograd.grad(out, feats, torch.ones_like(out))


def _launch_catching(tuners: dict, step) -> dict:
    """Run step with each autotuner's JIT ``run`` wrapped: {tuner name: the CompiledKernel it launched}."""
    import torch

    caught: dict[str, object] = {}

    def wrap(name, run):
        def wrapped(*a, **kw):
            ret = run(*a, **kw)
            caught[name] = ret
            return ret

        return wrapped

    fns = {name: t.fn for name, t in tuners.items()}
    for name, fn in fns.items():
        fn.run = wrap(name, fn.run)
    try:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        for fn in fns.values():
            if "run" in vars(fn):
                del fn.run
    return caught


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(summary: dict) -> str:
    t = summary["tests"]
    lines = [
        f"# gpu-check on {summary['gpu']} ({summary['elapsed_s']} s)",
        "",
        f"tests/gpu: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
        f"{t.get('skipped', 0)} skipped",
        "",
    ]
    rows = summary["bench"].get("default_case", [])
    if rows:
        lines += [
            f"## Default case ({rows[0]['case']})",
            "",
            "| provider | mode | median ms | speedup vs loop | GB/s | % of DRAM roofline |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            lines.append(
                f"| {r['provider']} | {r['mode']} | {_fmt(r['median_ms'], '.4f')} | "
                f"{_fmt(r['speedup_vs_loop'], '.2f')} | {_fmt(r['gbps'], '.0f')} | "
                f"{_fmt(r['roofline_pct'], '.1f')} |"
            )
        lines.append("")
    if summary["autotuned"]:
        lines += [
            "## Autotuned configs",
            "",
            "| case | kernel | config | registers | spills | shared |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for r in summary["autotuned"]:
            lines.append(
                f"| {r['case']} | {r['kernel']} | {r['config']} | {r.get('n_regs', '-')} | "
                f"{r.get('n_spills', '-')} | {r.get('shared', '-')} |"
            )
    for f in t.get("failures", [])[:20]:
        lines.append(f"- FAILED {f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The kernels must be compiled, not interpreted: set before groie_triton (so triton.jit) is imported, here
    # and in the children.
    os.environ["TRITON_INTERPRET"] = "0"
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device: this check runs the compiled kernels on a GPU (nothing was run)",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    import torchvision
    import triton

    summary: dict = {
        "schema": "groie-triton-gpu-check/1",
        "gpu": torch.cuda.get_device_name(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "torchvision": torchvision.__version__,
        },
        "steps": {},
    }
    ok = True

    def save() -> None:  # after every step, so that a run stopped from outside still leaves its numbers
        summary["elapsed_s"] = round(time.perf_counter() - start, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")

    summary["tests"], summary["bench"], summary["autotuned"] = {}, {}, []
    save()
    if not args.skip_tests:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "tests/gpu",
            "-v",
            "-p",
            "no:cacheprovider",
            "-rfE",
            "--junitxml",
            str(out / "gpu-tests.xml"),
        ]
        if args.workers > 0 and importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(args.workers)]
        print(f"gpu_check: {' '.join(cmd)}", flush=True)
        summary["steps"]["tests"] = _run(cmd, out / "pytest.log", args.test_timeout)
        xml = out / "gpu-tests.xml"
        tests = parse_junit(xml) if xml.exists() else parse_log(out / "pytest.log")
        ok &= summary["steps"]["tests"]["returncode"] == 0 and not summary["steps"]["tests"]["timed_out"]
        ok &= tests["failed"] == 0 and tests["errors"] == 0 and tests["tests"] > 0
        summary["tests"] = tests
        save()
    if not args.skip_bench:
        # --skip-compile: the compile report needs no GPU (`python -m groie_triton.compile_report`); the
        # registers of what actually ran are read below from the kernels themselves.
        cmd = [sys.executable, "-m", "bench", "--quick", "--skip-compile", "--json", str(out / "bench-quick.json")]
        print(f"gpu_check: {' '.join(cmd)}", flush=True)
        left = args.budget - (time.perf_counter() - start) - 30.0
        summary["steps"]["bench"] = _run(cmd, out / "bench.log", max(60.0, min(args.bench_timeout, left)))
        ok &= summary["steps"]["bench"]["returncode"] == 0 and not summary["steps"]["bench"]["timed_out"]
        summary["bench"] = bench_rows(out / "bench-quick.json")
        save()
    try:
        if args.budget - (time.perf_counter() - start) < 20.0:
            raise TimeoutError("no time left in --budget for the register readout")
        summary["autotuned"] = autotuned_registers()
    except Exception as exc:  # noqa: BLE001 - a report, not a crash: the rest of the summary still lands
        summary["autotuned"] = []
        summary["autotuned_error"] = f"{type(exc).__name__}: {exc}"
        ok = False
    summary["ok"] = bool(ok)
    save()
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"gpu_check: {'OK' if ok else 'FAILED'}; summary in {out / 'summary.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
