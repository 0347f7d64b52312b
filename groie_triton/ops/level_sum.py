"""Fused activation + level sum: launchers, torch.library ops, fake implementations, autograd, public function.

The kernels live in :mod:`groie_triton.kernels.level_sum`; the ops ``groie::level_sum_act`` /
``groie::level_sum_act_backward`` dispatch on :func:`~groie_triton.backend.backend_for` to the launchers here
or to :func:`groie_triton.reference.level_sum_act_ref`; :func:`level_sum_act` is the public function.

Every level is one dense slab of y (NCHW or channels_last, levels outermost); the kernels walk flat memory,
so the output keeps the slab's layout.
"""

from __future__ import annotations

import torch
import triton

from groie_triton import reference
from groie_triton.backend import backend_for
from groie_triton.kernels import level_sum as K
from groie_triton.ops._checks import tl_acc_dtype

__all__ = ["ACTIVATIONS", "level_sum_act"]

ACTIVATIONS = K.ACTIVATIONS
_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}


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


def _grid(numel: int):
    return lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)


def _forward_triton(y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    y = _dense_levels(y)
    out = torch.empty_like(y[0])
    numel = out.numel()
    if numel > 0:
        K._level_sum_act_fwd[_grid(numel)](
            y, out, numel, numel, float(negative_slope),
            NUM_LEVELS=y.shape[0], ACTIVATION=_ACT_CODE[activation], ACC=tl_acc_dtype(y.dtype),
        )
    return out


def _backward_triton(grad: torch.Tensor, y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    y = _dense_levels(y)
    grad = _as_layout_of(grad, y[0])
    grad_y = torch.empty_like(y)
    numel = grad.numel()
    if numel > 0:
        K._level_sum_act_bwd[_grid(numel)](
            y, grad, grad_y, numel, numel, float(negative_slope),
            NUM_LEVELS=y.shape[0], ACTIVATION=_ACT_CODE[activation], ACC=tl_acc_dtype(y.dtype),
        )
    return grad_y


# --------------------------------------------------------------------------------------- torch.library
@torch.library.custom_op("groie::level_sum_act", mutates_args=())
def _level_sum_act_op(y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    if backend_for(y) == "reference":
        return reference.level_sum_act_ref(y, activation, negative_slope)
    return _forward_triton(y, activation, negative_slope)


@_level_sum_act_op.register_fake
def _(y, activation, negative_slope):
    return torch.empty_like(_dense_levels(y)[0])


@torch.library.custom_op("groie::level_sum_act_backward", mutates_args=())
def _level_sum_act_backward_op(grad: torch.Tensor, y: torch.Tensor, activation: str,
                               negative_slope: float) -> torch.Tensor:
    if backend_for(y) == "reference":
        return reference.level_sum_act_backward_ref(grad, y, activation, negative_slope)
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
        activation: one of :data:`ACTIVATIONS`: ``"none"``, ``"relu"`` or ``"leaky_relu"``.
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
