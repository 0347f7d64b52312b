"""Fused activation + level sum kernels: GRoIE's aggregation after a shared pre-module.

With a shared pre-module (conv [+ norm] + activation) GRoIE computes ``sum_l act(pre(roi_feats_l))``. The
conv and norm run once over all L*K RoIs as one batch; the forward kernel then applies the activation and
sums the L levels in one pass: ``out = sum_l act(y[l])``, accumulated in ``ACC`` (fp32, fp64 for fp64 input)
and written once, in place of L activations and L-1 adds that each read and write the whole tensor. The
backward kernel is one pass too: ``grad_y[l] = grad_out * act'(y[l])``.

Every level is one dense slab of y (levels outermost); the kernels walk flat memory. Elementwise work, no
atomics: the backward is deterministic. Launchers, op and autograd: :mod:`groie_triton.ops.level_sum`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from groie_triton.kernels import interpreting

__all__ = ["ACTIVATIONS", "NONE", "RELU", "LEAKY_RELU", "CONFIGS", "AUTOTUNE_KEY", "compile_specs"]

ACTIVATIONS = ("none", "relu", "leaky_relu")
"""Activations the kernels fuse, by code (the ``ACTIVATION`` constexpr is the index here); ``negative_slope``
is used by ``"leaky_relu"`` only."""

NONE = tl.constexpr(ACTIVATIONS.index("none"))
RELU = tl.constexpr(ACTIVATIONS.index("relu"))
LEAKY_RELU = tl.constexpr(ACTIVATIONS.index("leaky_relu"))

CONFIGS = [
    triton.Config({"BLOCK": 512}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK": 2048}, num_warps=8, num_stages=1),
]

# What changes the best config; never the number of elements, so a new batch does not re-tune.
AUTOTUNE_KEY = ["NUM_LEVELS", "ACTIVATION"]


def _prune_for_interpreter(configs, named_args, **kwargs):
    # The interpreter has no benchmarker ("0 active drivers"): keep the largest block, which also interprets
    # fastest. GPU runs benchmark every config.
    if interpreting():
        return [max(configs, key=lambda c: c.kwargs["BLOCK"])]
    return configs


@triton.jit
def _activate(v, negative_slope, ACTIVATION: tl.constexpr):
    # `v < 0` is False for NaN, so NaN propagates as it does through torch.relu / leaky_relu.
    if ACTIVATION == RELU:
        v = tl.where(v < 0, 0.0, v)
    elif ACTIVATION == LEAKY_RELU:
        v = tl.where(v < 0, v * negative_slope, v)
    return v


@triton.jit
def _level_sum_act_fwd_kernel(
    y_ptr, out_ptr, numel, level_stride, negative_slope,
    NUM_LEVELS: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], ACC)
    # Stepping the pointer keeps the level offset in 64-bit pointer arithmetic.
    y = y_ptr + offs
    for _ in tl.static_range(NUM_LEVELS):
        v = tl.load(y, mask=mask, other=0.0).to(ACC)
        acc += _activate(v, negative_slope, ACTIVATION)
        y += level_stride
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _level_sum_act_bwd_kernel(
    y_ptr, grad_out_ptr, grad_y_ptr, numel, level_stride, negative_slope,
    NUM_LEVELS: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = y_ptr + offs
    grad_y = grad_y_ptr + offs
    for _ in tl.static_range(NUM_LEVELS):
        # Derivative as torch defines it: 0 (relu) or negative_slope (leaky) at 0 and for NaN.
        if ACTIVATION == NONE:
            gy = g
        else:
            v = tl.load(y, mask=mask, other=0.0).to(ACC)
            if ACTIVATION == RELU:
                gy = tl.where(v > 0, g, 0.0)
            else:
                gy = tl.where(v > 0, g, g * negative_slope)
        tl.store(grad_y, gy.to(grad_y_ptr.dtype.element_ty), mask=mask)
        y += level_stride
        grad_y += level_stride


_level_sum_act_fwd = triton.autotune(
    configs=CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_interpreter}
)(_level_sum_act_fwd_kernel)

# Every element of grad_y is written exactly once (no accumulation), so autotune trials need no reset.
_level_sum_act_bwd = triton.autotune(
    configs=CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_interpreter}
)(_level_sum_act_bwd_kernel)


# ------------------------------------------------------------------------------------ compile report
_POINTER = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}


def compile_specs() -> list[dict]:
    """Every kernel x shipped config x dtype, for ``python -m groie_triton.compile_report``.

    Compiled at the paper's shape class: 4 levels, ReLU (the activation changes a select, not the
    register budget).
    """
    specs = []
    for name, fn, pointers in (
        ("level_sum_act_fwd", _level_sum_act_fwd, ("y_ptr", "out_ptr")),
        ("level_sum_act_bwd", _level_sum_act_bwd, ("y_ptr", "grad_out_ptr", "grad_y_ptr")),
    ):
        for config in CONFIGS:
            for dtype, pointer in _POINTER.items():
                signature = {p: pointer for p in pointers}
                signature.update(numel="i32", level_stride="i32", negative_slope="fp32")
                specs.append({
                    "kernel": name,
                    "fn": fn,
                    "config": config,
                    "config_name": f"BLOCK{config.kwargs['BLOCK']}_w{config.num_warps}",
                    "dtype": dtype,
                    "signature": signature,
                    "constexprs": {
                        "NUM_LEVELS": 4,
                        "ACTIVATION": RELU.value,
                        "ACC": tl.float64 if dtype == "fp64" else tl.float32,
                    },
                })
    return specs
