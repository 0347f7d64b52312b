"""Fused activation + level sum: GRoIE's aggregation after a shared pre-module.

With a shared pre-module (conv [+ norm] + activation) GRoIE computes ``sum_l act(pre(roi_feats_l))``. The
conv and norm run once over all L*K RoIs as one batch; this kernel then applies the activation and sums the
L levels in one pass: ``out = sum_l act(y[l])``, accumulated in fp32 (fp64 for fp64 input) and written once,
in place of L activations and L-1 adds that each read and write the whole tensor. The backward is one pass
too: ``grad_y[l] = grad_out * act'(y[l])``.

Layers, as in the rest of the library: the ``@triton.jit`` kernels; launchers that lay out memory and pick
the grid; the ops ``groie::level_sum_act`` / ``groie::level_sum_act_backward`` (torch.library, with fake
implementations and registered autograd) that dispatch on :func:`~groie_triton.backend.backend_for` to the
kernels or to the pure-PyTorch path; and :func:`level_sum_act`, the public function.

Every level is one dense slab of y (NCHW or channels_last, levels outermost); the kernels walk flat memory,
so the output keeps the slab's layout. Elementwise work, no atomics: the backward is deterministic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from groie_triton.backend import backend_for

__all__ = ["ACTIVATIONS", "level_sum_act", "compile_specs"]

ACTIVATIONS = ("none", "relu", "leaky_relu")
"""Activations the kernels fuse; ``negative_slope`` is used by ``"leaky_relu"`` only."""

_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}

CONFIGS = [
    triton.Config({"BLOCK": 512}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK": 2048}, num_warps=8, num_stages=1),
]

# What changes the best config; never the number of elements, so a new batch does not re-tune.
AUTOTUNE_KEY = ["NUM_LEVELS", "ACTIVATION"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _prune_for_interpreter(configs, named_args, **kwargs):
    # The interpreter has no benchmarker ("0 active drivers"): keep the largest block, which also interprets
    # fastest. GPU runs benchmark every config.
    if _interpreting():
        return [max(configs, key=lambda c: c.kwargs["BLOCK"])]
    return configs


@triton.jit
def _activate(v, negative_slope, ACTIVATION: tl.constexpr):
    # `v < 0` is False for NaN, so NaN propagates as it does through torch.relu / leaky_relu.
    if ACTIVATION == 1:
        v = tl.where(v < 0, 0.0, v)
    elif ACTIVATION == 2:
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
        if ACTIVATION == 0:
            gy = g
        else:
            v = tl.load(y, mask=mask, other=0.0).to(ACC)
            if ACTIVATION == 1:
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


# ------------------------------------------------------------------------------------------- launchers
def _slab_is_dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _dense_levels(y: torch.Tensor) -> torch.Tensor:
    """y itself when each level is one dense slab and the slabs are packed; else a contiguous copy."""
    if _slab_is_dense(y[0]) and (y.shape[0] == 1 or y.stride(0) == y[0].numel()):
        return y
    return y.contiguous()


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if n > 1)


def _as_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t with exactly like's element order in memory (a zero-stride gradient gets materialised)."""
    if _same_layout(t, like):
        return t
    return torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(numel: int):
    return lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)


def _forward_triton(y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    y = _dense_levels(y)
    out = torch.empty_like(y[0])
    numel = out.numel()
    if numel > 0:
        _level_sum_act_fwd[_grid(numel)](
            y, out, numel, numel, float(negative_slope),
            NUM_LEVELS=y.shape[0], ACTIVATION=_ACT_CODE[activation], ACC=_acc(y.dtype),
        )
    return out


def _backward_triton(grad: torch.Tensor, y: torch.Tensor, activation: str, negative_slope: float):
    y = _dense_levels(y)
    grad = _as_layout_of(grad, y[0])
    grad_y = torch.empty_like(y)
    numel = grad.numel()
    if numel > 0:
        _level_sum_act_bwd[_grid(numel)](
            y, grad, grad_y, numel, numel, float(negative_slope),
            NUM_LEVELS=y.shape[0], ACTIVATION=_ACT_CODE[activation], ACC=_acc(y.dtype),
        )
    return grad_y


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _activate_reference(v: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(v)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(v, negative_slope)
    return v


def _forward_reference(y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    acc = _acc_dtype(y.dtype)
    out = _activate_reference(y[0].to(acc), activation, negative_slope)
    for level in y[1:]:
        out = out + _activate_reference(level.to(acc), activation, negative_slope)
    return out.to(y.dtype)


def _backward_reference(grad: torch.Tensor, y: torch.Tensor, activation: str, negative_slope: float):
    acc = _acc_dtype(y.dtype)
    g = grad.to(acc).expand_as(y)
    if activation == "relu":
        g = torch.where(y > 0, g, torch.zeros((), dtype=acc, device=g.device))
    elif activation == "leaky_relu":
        g = torch.where(y > 0, g, g * negative_slope)
    return g.to(y.dtype).contiguous()


# --------------------------------------------------------------------------------------- torch.library
@torch.library.custom_op("groie::level_sum_act", mutates_args=())
def _level_sum_act_op(y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    if backend_for(y) == "reference":
        return _forward_reference(y, activation, negative_slope)
    return _forward_triton(y, activation, negative_slope)


@_level_sum_act_op.register_fake
def _(y, activation, negative_slope):
    return torch.empty_like(_dense_levels(y)[0])


@torch.library.custom_op("groie::level_sum_act_backward", mutates_args=())
def _level_sum_act_backward_op(grad: torch.Tensor, y: torch.Tensor, activation: str,
                               negative_slope: float) -> torch.Tensor:
    if backend_for(y) == "reference":
        return _backward_reference(grad, y, activation, negative_slope)
    return _backward_triton(grad, y, activation, negative_slope)


@_level_sum_act_backward_op.register_fake
def _(grad, y, activation, negative_slope):
    return torch.empty_like(_dense_levels(y))


def _setup_context(ctx, inputs, output):
    y, activation, negative_slope = inputs
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.num_levels = y.shape[0]
    # The identity needs no input in its backward: do not keep the L-level tensor alive for it.
    if activation != "none":
        ctx.save_for_backward(y)


def _backward(ctx, grad):
    if ctx.activation == "none":
        return grad.unsqueeze(0).expand(ctx.num_levels, *grad.shape), None, None
    (y,) = ctx.saved_tensors
    return _level_sum_act_backward_op(grad, y, ctx.activation, ctx.negative_slope), None, None


torch.library.register_autograd("groie::level_sum_act", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------- public API
def level_sum_act(y: torch.Tensor, activation: str = "relu", negative_slope: float = 0.01) -> torch.Tensor:
    """``sum_l act(y[l])`` in one pass, forward and backward.

    Args:
        y: ``[L, ...]`` float16 / bfloat16 / float32 / float64, L >= 1; each ``y[l]`` NCHW or channels_last
            (the output keeps that layout; other strides are copied to contiguous once).
        activation: ``"none"``, ``"relu"`` or ``"leaky_relu"``.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs.

    Returns:
        ``y.shape[1:]`` in y's dtype, summed in float32 (float64 for float64 input), level 0 first.

    Raises:
        TypeError: y is not a floating point tensor. ValueError: y has no level dimension or no level, or
        the activation is unknown.
    """
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"y must be a floating point tensor, got {getattr(y, 'dtype', type(y).__name__)}")
    if y.dim() < 2 or y.shape[0] == 0:
        raise ValueError(f"y must be [L, ...] with L >= 1 levels, got shape {tuple(y.shape)}")
    if activation not in _ACT_CODE:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return _level_sum_act_op(y, activation, float(negative_slope))


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
                        "ACTIVATION": _ACT_CODE["relu"],
                        "ACC": tl.float64 if dtype == "fp64" else tl.float32,
                    },
                })
    return specs
