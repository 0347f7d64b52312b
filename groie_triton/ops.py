"""RoIAlign ops: argument checks, launchers, torch.library ops (namespace ``groie``) and autograd.

Layers, each small: the ``@triton.jit`` kernels live in :mod:`groie_triton.kernels.roi_align`; the launchers
here check nothing that needs the device, allocate and pick the grid; the ops ``groie::roi_align`` and
``groie::roi_align_backward`` dispatch on :func:`~groie_triton.backend.backend_for` and carry fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` and ``torch.export`` see one node.

Autocast policy: the ops have no autocast rule and run in the dtype of the feature maps they are given. This
is what torchvision's fp32 autocast policy buys, without the casts: the kernels accumulate in float32
(float64 for float64 maps) whatever the storage dtype, and return the features' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from groie_triton import reference
from groie_triton.backend import backend_for
from groie_triton.kernels import roi_align as K

__all__ = ["roi_align", "multilevel_roi_align", "mapped_roi_align", "MAX_LEVELS", "AGGREGATIONS", "MAPPINGS"]

MAX_LEVELS = K.MAX_LEVELS
AGGREGATIONS = ("sum", "concat", "stack")
MAPPINGS = ("torchvision", "mmdet")
_MODES = {"sum": K.SUM, "concat": K.PER_LEVEL, "stack": K.PER_LEVEL, "torchvision": K.MAP_TORCHVISION,
          "mmdet": K.MAP_MMDET}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------- checks
def _pair(output_size, name: str = "output_size") -> tuple[int, int]:
    if isinstance(output_size, int):
        size = (output_size, output_size)
    elif isinstance(output_size, (list, tuple)) and len(output_size) == 2:
        size = tuple(output_size)
    else:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {output_size!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in size) or min(size) <= 0:
        raise ValueError(f"{name} must be positive integers, got {output_size!r}")
    return int(size[0]), int(size[1])


def _check_features(features, name: str) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of [N, C, H, W] tensors, one per level, not one tensor")
    features = list(features)
    if not features:
        raise ValueError(f"{name} must hold at least one level")
    if len(features) > MAX_LEVELS:
        raise ValueError(f"{name} has {len(features)} levels; the kernels support at most {MAX_LEVELS}")
    first = features[0]
    for i, f in enumerate(features):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() != 4:
            raise ValueError(f"{name}[{i}] must be 4-D [N, C, H, W], got shape {tuple(f.shape)}")
        if f.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] must be float16, bfloat16, float32 or float64, got {f.dtype}")
        if f.dtype != first.dtype:
            raise TypeError(f"{name}[{i}] has dtype {f.dtype} but level 0 has {first.dtype}")
        if f.device != first.device:
            raise ValueError(f"{name}[{i}] is on {f.device} but level 0 is on {first.device}")
        if f.shape[0] != first.shape[0]:
            raise ValueError(f"{name}[{i}] has batch size {f.shape[0]} but level 0 has {first.shape[0]}")
        if f.shape[1] != first.shape[1]:
            raise ValueError(f"{name}[{i}] has {f.shape[1]} channels but level 0 has {first.shape[1]}")
    return features


def _check_rois(rois: torch.Tensor, like: torch.Tensor, name: str = "rois") -> torch.Tensor:
    if not isinstance(rois, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor[K, 5] or a list of Tensor[L_i, 4], got {type(rois).__name__}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"{name} must have shape [K, 5] (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}")
    if not rois.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {rois.dtype}")
    if rois.device != like.device:
        raise ValueError(f"{name} is on {rois.device} but the features are on {like.device}")
    return rois


def _check_scales(spatial_scales, num_levels: int) -> list[float]:
    if isinstance(spatial_scales, (int, float)):
        spatial_scales = [spatial_scales]
    spatial_scales = [float(s) for s in spatial_scales]
    if len(spatial_scales) != num_levels:
        raise ValueError(f"spatial_scales has {len(spatial_scales)} entries but there are {num_levels} levels")
    for s in spatial_scales:
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"spatial_scales must be finite and non-negative, got {s}")
    return spatial_scales


def boxes_to_rois(boxes, like: torch.Tensor) -> torch.Tensor:
    """Turn torchvision's ``list[Tensor[L_i, 4]]`` box format into ``Tensor[K, 5]``; pass a Tensor through."""
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"boxes[{i}] must be a Tensor[L, 4], got {shape}")
        if not boxes:
            return like.new_zeros((0, 5))
        cat = torch.cat([b.to(like.device) for b in boxes], dim=0)
        index = torch.cat([torch.full_like(b[:, :1], i, dtype=cat.dtype, device=cat.device)
                           for i, b in enumerate(boxes)])
        return torch.cat([index, cat], dim=1)
    return boxes


# ------------------------------------------------------------------------------------------- launchers
def _layout_is_channels_last(f: torch.Tensor) -> bool:
    return not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last)


def _layout(features: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """Read NCHW and channels_last natively; anything else (or a mix) is made contiguous once."""
    f0 = features[0]
    channels_last = _layout_is_channels_last(f0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [f.contiguous(memory_format=fmt) for f in features], channels_last


def _out_shape(aggregation: str, num_levels: int, num_rois: int, channels: int, ph: int, pw: int):
    if aggregation == "concat":
        return (num_rois, num_levels * channels, ph, pw)
    if aggregation == "stack":
        return (num_levels, num_rois, channels, ph, pw)
    return (num_rois, channels, ph, pw)


def _empty_output(features, aggregation, num_rois, ph, pw, channels_last: bool) -> torch.Tensor:
    f0 = features[0]
    shape = _out_shape(aggregation, len(features), num_rois, f0.shape[1], ph, pw)
    if not channels_last:
        return f0.new_empty(shape)
    if aggregation == "stack":
        return f0.new_empty((shape[0], shape[1], ph, pw, shape[2])).permute(0, 1, 4, 2, 3)
    return f0.new_empty(shape).contiguous(memory_format=torch.channels_last)


def _out_strides(out: torch.Tensor, aggregation: str, channels: int) -> tuple[int, int, int, int, int]:
    """(level, roi, channel, ph, pw) strides of the output as the kernel addresses it."""
    if aggregation == "stack":
        return tuple(out.stride())
    s_k, s_c, s_ph, s_pw = out.stride()
    s_l = channels * s_c if aggregation == "concat" else 0
    return s_l, s_k, s_c, s_ph, s_pw


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _kernel_args(features, rois, scales, sampling_ratio, aligned, aggregation, k_min, mapping_args, ph, pw,
                 channels_last):
    canonical_scale, canonical_level, finest_scale = mapping_args
    f0 = features[0]
    return dict(
        rois_ptr=rois,
        heights=tuple(int(f.shape[2]) for f in features),
        widths=tuple(int(f.shape[3]) for f in features),
        **_split_scales(scales),
        N=int(f0.shape[0]), C=int(f0.shape[1]), sampling_ratio=int(max(sampling_ratio, 0)),
        canonical_scale=float(canonical_scale), canonical_level=float(canonical_level),
        finest_scale=float(finest_scale),
        PH=ph, PW=pw, NUM_LEVELS=len(features), MODE=_MODES[aggregation], K_MIN=int(k_min),
        ALIGNED=bool(aligned), ADAPTIVE=sampling_ratio <= 0, CHANNELS_LAST=channels_last,
        INDEX64=any(math.prod(f.shape[1:]) >= 2**31 for f in features),
        ACC=_acc_dtype(f0.dtype), enable_fp_fusion=True,
    )


def _split_scales(scales: list[float]) -> dict[str, tuple[float, ...]]:
    """Each scale as three float32 parts whose float64 sum is exact (Triton passes Python floats as float32)."""
    parts = {"scales": [], "scales_mid": [], "scales_lo": []}
    for s in scales:
        rest = s
        for name in parts:
            part = float(np.float32(rest))
            parts[name].append(part)
            rest -= part
    return {name: tuple(values) for name, values in parts.items()}


def _grid(num_rois: int, channels: int):
    return lambda meta: (num_rois, triton.cdiv(channels, meta["BLOCK_C"]))


def _forward_triton(features, rois, scales, ph, pw, sampling_ratio, aligned, aggregation, k_min, mapping_args):
    features, channels_last = _layout(features)
    num_rois, channels = rois.shape[0], features[0].shape[1]
    out = _empty_output(features, aggregation, num_rois, ph, pw, channels_last)
    if out.numel() == 0:
        return out
    rois = rois.contiguous()
    K._roi_align_fwd_kernel[_grid(num_rois, channels)](
        out, feats=tuple(features),
        **dict(zip(("o_stride_l", "o_stride_k", "o_stride_c", "o_stride_ph", "o_stride_pw"),
                   _out_strides(out, aggregation, channels))),
        **_kernel_args(features, rois, scales, sampling_ratio, aligned, aggregation, k_min, mapping_args, ph,
                       pw, channels_last),
    )
    return out


def _backward_triton(grad, rois, features, scales, ph, pw, sampling_ratio, aligned, aggregation, k_min,
                     mapping_args):
    features, channels_last = _layout(features)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    num_rois, channels = rois.shape[0], features[0].shape[1]
    deterministic = torch.are_deterministic_algorithms_enabled()
    # float32 accumulation for half types (atomics on fp16/bf16 lose the small terms), float64 for float64.
    acc_dtype = torch.float64 if features[0].dtype == torch.float64 else torch.float32
    if deterministic:
        # Fixed point: int64 atomics, whose sum does not depend on their order. A pixel of one level receives
        # at most K * ph * pw bin contributions, each at most max|grad|: scale so that this bound fits in 62
        # bits. The scale is a device tensor: no host synchronisation.
        headroom = math.ceil(math.log2(num_rois * ph * pw + 1)) + 1
        amax = torch.linalg.vector_norm(grad.detach(), math.inf, dtype=torch.float64)  # max |grad|, one pass
        fixed_scale = (2.0 ** (62 - headroom) / amax.clamp_min(2.0**-1000)).clamp_max(2.0**120).reshape(1)
        grads = [torch.zeros_like(f, dtype=torch.int64, memory_format=fmt) for f in features]
    else:
        grads = [torch.zeros_like(f, dtype=acc_dtype, memory_format=fmt) for f in features]
        fixed_scale = grad
    if grad.numel() > 0:
        K._roi_align_bwd_kernel[_grid(num_rois, channels)](
            grad, grads=tuple(grads), fixed_scale_ptr=fixed_scale, FIXED_POINT=deterministic,
            **dict(zip(("g_stride_l", "g_stride_k", "g_stride_c", "g_stride_ph", "g_stride_pw"),
                       _out_strides(grad, aggregation, channels))),
            **_kernel_args(features, rois.contiguous(), scales, sampling_ratio, aligned, aggregation, k_min,
                           mapping_args, ph, pw, channels_last),
        )
    if deterministic:
        # amax - amax is NaN when the incoming gradient is not finite: so is then every level's gradient.
        unscale = (fixed_scale.reciprocal() + (amax - amax)).to(acc_dtype)
        return [g.to(acc_dtype).mul_(unscale).to(f.dtype) for g, f in zip(grads, features)]
    return [g.to(f.dtype) for g, f in zip(grads, features)]


def _forward_reference(features, rois, scales, ph, pw, sampling_ratio, aligned, aggregation, k_min,
                       mapping_args):
    if aggregation in MAPPINGS:
        canonical_scale, canonical_level, finest_scale = mapping_args
        return reference.mapped_roi_align_ref(features, rois, (ph, pw), scales, sampling_ratio, aligned,
                                              aggregation, canonical_scale=canonical_scale,
                                              canonical_level=int(canonical_level), finest_scale=finest_scale)
    return reference.multilevel_roi_align_ref(features, rois, (ph, pw), scales, sampling_ratio, aligned,
                                              aggregation)


def _backward_reference(grad, rois, features, *args):
    # torch.func.vjp works inside a custom op, where plain autograd is switched off.
    _, vjp = torch.func.vjp(lambda *fs: _forward_reference(list(fs), rois, *args), *features)
    return list(vjp(grad))


# --------------------------------------------------------------------------------------- torch.library
@torch.library.custom_op("groie::roi_align", mutates_args=())
def _roi_align_op(features: list[torch.Tensor], rois: torch.Tensor, scales: list[float], pooled_height: int,
                  pooled_width: int, sampling_ratio: int, aligned: bool, aggregation: str, k_min: int,
                  canonical_scale: float, canonical_level: float, finest_scale: float) -> torch.Tensor:
    args = (scales, pooled_height, pooled_width, sampling_ratio, aligned, aggregation, k_min,
            (canonical_scale, canonical_level, finest_scale))
    if backend_for(rois) == "reference":
        return _forward_reference(features, rois, *args)
    return _forward_triton(features, rois, *args)


@_roi_align_op.register_fake
def _(features, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned, aggregation, k_min,
      canonical_scale, canonical_level, finest_scale):
    channels_last = _layout_is_channels_last(features[0])
    return _empty_output(features, aggregation, rois.shape[0], pooled_height, pooled_width, channels_last)


@torch.library.custom_op("groie::roi_align_backward", mutates_args=())
def _roi_align_backward_op(grad: torch.Tensor, rois: torch.Tensor, features: list[torch.Tensor],
                           scales: list[float], pooled_height: int, pooled_width: int, sampling_ratio: int,
                           aligned: bool, aggregation: str, k_min: int, canonical_scale: float,
                           canonical_level: float, finest_scale: float) -> list[torch.Tensor]:
    args = (scales, pooled_height, pooled_width, sampling_ratio, aligned, aggregation, k_min,
            (canonical_scale, canonical_level, finest_scale))
    if backend_for(rois) == "reference":
        return _backward_reference(grad, rois, features, *args)
    return _backward_triton(grad, rois, features, *args)


@_roi_align_backward_op.register_fake
def _(grad, rois, features, *args):
    return [torch.empty_like(f) for f in features]


def _setup_context(ctx, inputs, output):
    features, rois, *args = inputs
    ctx.save_for_backward(rois, *features)
    ctx.args = args


def _backward(ctx, grad):
    rois, *features = ctx.saved_tensors
    grads = _roi_align_backward_op(grad, rois, features, *ctx.args)
    return grads, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("groie::roi_align", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------- public API
def _call(features, rois, output_size, scales, sampling_ratio, aligned, aggregation, k_min=0,
          canonical_scale=224.0, canonical_level=4.0, finest_scale=56.0) -> torch.Tensor:
    ph, pw = _pair(output_size)
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio must be an int (<= 0 means adaptive), got {sampling_ratio!r}")
    # Half-precision rois would round the geometry; compute it in the accumulation dtype instead.
    if rois.dtype in (torch.float16, torch.bfloat16):
        rois = rois.float()
    return _roi_align_op(features, rois, scales, ph, pw, sampling_ratio, bool(aligned), aggregation, k_min,
                         float(canonical_scale), float(canonical_level), float(finest_scale))


def roi_align(input: torch.Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> torch.Tensor:
    """RoIAlign, a drop-in for :func:`torchvision.ops.roi_align` (same signature, defaults and results).

    Args:
        input: ``[N, C, H, W]`` float16 / bfloat16 / float32 / float64, NCHW or channels_last (any strides).
        boxes: ``Tensor[K, 5]`` rows ``(batch index, x1, y1, x2, y2)`` or ``list[Tensor[L_i, 4]]``, any float
            dtype, on ``input``'s device.
        output_size: ``int`` or ``(h, w)``, positive.
        spatial_scale: maps box coordinates to ``input`` coordinates (1 / stride), finite and >= 0.
        sampling_ratio: samples per bin along each axis; ``<= 0`` means ``ceil(roi_size / output_size)``.
        aligned: shift boxes by -0.5 pixel (the pixel-exact variant).

    Returns:
        ``[K, C, h, w]`` in ``input``'s dtype (channels_last if ``input`` is). A RoI whose batch index is
        outside ``[0, N)`` gets zeros; non-finite boxes give finite or zero values and never fault.

    Raises:
        TypeError: non-float input or rois, non-int sampling_ratio. ValueError: wrong shapes, devices,
        output_size or spatial_scale.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    features = _check_features([input], "input")
    rois = _check_rois(boxes_to_rois(boxes, input), input, "boxes")
    return _call(features, rois, output_size, _check_scales([spatial_scale], 1), sampling_ratio, aligned, "sum")


def multilevel_roi_align(features: Sequence[torch.Tensor], rois: torch.Tensor, output_size,
                         spatial_scales: Sequence[float], sampling_ratio: int = 2, aligned: bool = True,
                         aggregation: str = "sum") -> torch.Tensor:
    """GRoIE's all-level RoIAlign: every RoI pooled from every level, aggregated in the same launch.

    Args:
        features: L tensors ``[N, C, H_l, W_l]`` (same N, C, dtype, device; 1 <= L <= MAX_LEVELS). A level of
            size 0 contributes zeros.
        rois: ``Tensor[K, 5]`` in image coordinates. spatial_scales: L floats (1 / stride).
        aggregation: ``"sum"`` -> ``[K, C, h, w]`` (no per-level output is materialised),
            ``"concat"`` -> ``[K, L*C, h, w]`` (level 0 first), ``"stack"`` -> ``[L, K, C, h, w]``.

    One kernel launch forward and one backward, whatever L. Raises as :func:`roi_align`, and ValueError for
    an unknown aggregation or a number of spatial_scales that differs from the number of levels.
    """
    features = _check_features(features, "features")
    rois = _check_rois(boxes_to_rois(rois, features[0]), features[0])
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    scales = _check_scales(spatial_scales, len(features))
    return _call(features, rois, output_size, scales, sampling_ratio, aligned, aggregation)


def mapped_roi_align(features: Sequence[torch.Tensor], rois: torch.Tensor, output_size,
                     spatial_scales: Sequence[float], sampling_ratio: int = 2, aligned: bool = False,
                     mapping: str = "torchvision", canonical_scale: float = 224, canonical_level: int = 4,
                     finest_scale: float = 56) -> torch.Tensor:
    """Classic FPN RoIAlign: each RoI pooled from the one level its size maps to, chosen in the kernel.

    ``mapping="torchvision"``: torchvision's LevelMapper, ``floor(canonical_level + log2(sqrt(area) /
    canonical_scale) + 1e-6)`` clamped to the levels, with ``k_min = round(-log2(spatial_scales[0]))``.
    ``mapping="mmdet"``: mmdetection's ``floor(log2(sqrt(area) / finest_scale + 1e-6))`` clamped to
    ``[0, L-1]``. A RoI whose area is not finite (or negative) gets zeros. Returns ``[K, C, h, w]``; one launch,
    no sort, no gather, no host synchronisation.
    """
    features = _check_features(features, "features")
    rois = _check_rois(boxes_to_rois(rois, features[0]), features[0])
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    scales = _check_scales(spatial_scales, len(features))
    k_min = 0
    if mapping == "torchvision":
        if min(scales) <= 0:
            raise ValueError(f"spatial_scales must be positive for the torchvision mapping, got {scales}")
        k_min = round(-math.log2(scales[0]))
    return _call(features, rois, output_size, scales, sampling_ratio, aligned, mapping, k_min,
                 canonical_scale, canonical_level, finest_scale)
