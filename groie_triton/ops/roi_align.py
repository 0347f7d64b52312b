"""RoIAlign ops: launchers, torch.library ops (namespace ``groie``), fake implementations, autograd, public API.

Layers, each small: the ``@triton.jit`` kernels live in :mod:`groie_triton.kernels.roi_align`; the public
functions check their arguments (:mod:`._checks`) and call the op ``groie::roi_align`` with flat primitives;
the op turns them into one :class:`~.geometry.PoolGeometry` and dispatches on
:func:`~groie_triton.backend.backend_for` to the launchers (which allocate, build the kernel arguments in
:func:`_kernel_args` and pick the grid) or to :func:`groie_triton.reference.pool_ref`. Fake implementations and
registered autograd let ``torch.compile(fullgraph=True)`` and ``torch.export`` see one node, and
:func:`roi_align` is scriptable (``torch.jit.script``), as torchvision's is.

Autocast policy: the ops have no autocast rule and run in the dtype of the feature maps they are given. This
is what torchvision's fp32 autocast policy buys, without the casts: the kernels accumulate in float32
(float64 for float64 maps) whatever the storage dtype, and return the features' dtype.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.jit.annotations import BroadcastingList2

from groie_triton import reference
from groie_triton.backend import acc_dtype, backend_for
from groie_triton.kernels import roi_align as K
from groie_triton.ops._checks import (
    check_features,
    check_rois,
    check_sampling_ratio,
    check_scales,
    pair,
    tl_acc_dtype,
)
from groie_triton.ops.geometry import AGGREGATIONS, MAPPINGS, PoolGeometry

__all__ = ["roi_align", "multilevel_roi_align", "mapped_roi_align", "boxes_to_rois", "MAX_LEVELS"]

MAX_LEVELS = K.MAX_LEVELS
_AGGREGATION_MODES = {"sum": K.SUM, "concat": K.PER_LEVEL, "stack": K.PER_LEVEL}
_MAPPING_MODES = {"torchvision": K.MAP_TORCHVISION, "mmdet": K.MAP_MMDET}


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
    channels_last = _layout_is_channels_last(features[0])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [f.contiguous(memory_format=fmt) for f in features], channels_last


def _empty_output(features: list[torch.Tensor], geometry: PoolGeometry, num_rois: int,
                  channels_last: bool) -> torch.Tensor:
    f0 = features[0]
    shape = geometry.output_shape(num_rois, f0.shape[1])
    if not channels_last:
        return f0.new_empty(shape)
    if geometry.aggregation == "stack":
        return f0.new_empty((shape[0], shape[1], shape[3], shape[4], shape[2])).permute(0, 1, 4, 2, 3)
    return f0.new_empty(shape).contiguous(memory_format=torch.channels_last)


def _out_strides(out: torch.Tensor, geometry: PoolGeometry, channels: int) -> tuple[int, int, int, int, int]:
    """(level, roi, channel, ph, pw) strides of the output (or its gradient) as the kernel addresses it."""
    if geometry.aggregation == "stack":
        return tuple(out.stride())
    s_k, s_c, s_ph, s_pw = out.stride()
    s_l = channels * s_c if geometry.aggregation == "concat" else 0
    return s_l, s_k, s_c, s_ph, s_pw


def _mode(geometry: PoolGeometry) -> int:
    """The kernels' MODE constant for a geometry."""
    if geometry.mapping is not None:
        return _MAPPING_MODES[geometry.mapping]
    return _AGGREGATION_MODES[geometry.aggregation]


def _split_scales(scales: Sequence[float]) -> dict[str, tuple[float, ...]]:
    """Each scale as three float32 parts whose float64 sum is exact (Triton passes Python floats as float32)."""
    parts = {"scales": [], "scales_mid": [], "scales_lo": []}
    for s in scales:
        rest = s
        for name in parts:
            part = float(np.float32(rest))
            parts[name].append(part)
            rest -= part
    return {name: tuple(values) for name, values in parts.items()}


def _kernel_args(geometry: PoolGeometry, features: list[torch.Tensor], rois: torch.Tensor, channels_last: bool, *,
                 out: torch.Tensor | None = None, grad: torch.Tensor | None = None,
                 grads: list[torch.Tensor] | None = None, fixed_scale: torch.Tensor | None = None) -> dict:
    """Every keyword argument of ``_roi_align_fwd_kernel`` (``out`` given) or ``_roi_align_bwd_kernel``
    (``grad`` and the level gradients ``grads`` given; ``fixed_scale``, a device scalar, for the deterministic
    fixed-point scatter).

    The one place that knows the kernels' signature: ``features`` and ``rois`` are laid out already
    (:func:`_layout`, contiguous rois); launch with ``kernel[K.grid(...)](**_kernel_args(...))``.
    """
    f0 = features[0]
    channels = int(f0.shape[1])
    args = dict(
        rois_ptr=rois,
        heights=tuple(int(f.shape[2]) for f in features),
        widths=tuple(int(f.shape[3]) for f in features),
        **_split_scales(geometry.spatial_scales),
        N=int(f0.shape[0]), C=channels,
        canonical_scale=float(geometry.canonical_scale), canonical_level=float(geometry.canonical_level),
        finest_scale=float(geometry.finest_scale),
        PH=geometry.pooled_height, PW=geometry.pooled_width, NUM_LEVELS=len(features), MODE=_mode(geometry),
        K_MIN=int(geometry.k_min), ALIGNED=bool(geometry.aligned), SAMPLING=max(int(geometry.sampling_ratio), 0),
        CHANNELS_LAST=channels_last, INDEX64=any(math.prod(f.shape[1:]) >= 2**31 for f in features),
        ACC=tl_acc_dtype(f0.dtype), enable_fp_fusion=True,
    )
    if out is not None:
        strides = _out_strides(out, geometry, channels)
        args.update(out_ptr=out, feats=tuple(features),
                    **dict(zip(("o_stride_l", "o_stride_k", "o_stride_c", "o_stride_ph", "o_stride_pw"), strides)))
    else:
        strides = _out_strides(grad, geometry, channels)
        # Without a fixed-point scale the kernel reads none: any tensor stands in for the pointer.
        args.update(grad_out_ptr=grad, grads=tuple(grads), FIXED_POINT=fixed_scale is not None,
                    fixed_scale_ptr=grad if fixed_scale is None else fixed_scale,
                    **dict(zip(("g_stride_l", "g_stride_k", "g_stride_c", "g_stride_ph", "g_stride_pw"), strides)))
    return args


def _forward_triton(features: list[torch.Tensor], rois: torch.Tensor, geometry: PoolGeometry) -> torch.Tensor:
    features, channels_last = _layout(features)
    num_rois, channels = rois.shape[0], features[0].shape[1]
    out = _empty_output(features, geometry, num_rois, channels_last)
    if out.numel() == 0:
        return out
    K._roi_align_fwd_kernel[K.grid(num_rois, channels, geometry.pooled_height * geometry.pooled_width)](
        **_kernel_args(geometry, features, rois.contiguous(), channels_last, out=out))
    return out


def _backward_triton(grad: torch.Tensor, rois: torch.Tensor, features: list[torch.Tensor],
                     geometry: PoolGeometry) -> list[torch.Tensor]:
    # The backward reads no feature values: only shapes, dtype and the layout its gradients are laid out in
    # (no contiguous copy of the pyramid, which _layout makes for other strides).
    channels_last = _layout_is_channels_last(features[0])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    num_rois, channels = rois.shape[0], features[0].shape[1]
    ph, pw = geometry.output_size
    deterministic = torch.are_deterministic_algorithms_enabled()
    # float32 accumulation for half types (atomics on fp16/bf16 lose the small terms), float64 for float64.
    acc = acc_dtype(features[0].dtype)
    if deterministic:
        # Fixed point: int64 atomics, whose sum does not depend on their order. A pixel of one level receives
        # at most K * ph * pw bin contributions, each at most max|grad|: scale so that this bound fits in 62
        # bits. The scale is a device tensor: no host synchronisation.
        headroom = math.ceil(math.log2(num_rois * ph * pw + 1)) + 1
        amax = torch.linalg.vector_norm(grad.detach(), math.inf, dtype=torch.float64)  # max |grad|, one pass
        fixed_scale = (2.0 ** (62 - headroom) / amax.clamp_min(2.0**-1000)).clamp_max(2.0**120).reshape(1)
        grads = [torch.zeros_like(f, dtype=torch.int64, memory_format=fmt) for f in features]
    else:
        grads = [torch.zeros_like(f, dtype=acc, memory_format=fmt) for f in features]
        fixed_scale = None
    if grad.numel() > 0:
        K._roi_align_bwd_kernel[K.grid(num_rois, channels, ph * pw)](
            **_kernel_args(geometry, features, rois.contiguous(), channels_last, grad=grad, grads=grads,
                           fixed_scale=fixed_scale))
    if deterministic:
        # amax - amax is NaN when the incoming gradient is not finite: so is then every level's gradient.
        unscale = (fixed_scale.reciprocal() + (amax - amax)).to(acc)
        return [g.to(acc).mul_(unscale).to(f.dtype) for g, f in zip(grads, features)]
    return [g.to(f.dtype) for g, f in zip(grads, features)]


def _backward_reference(grad: torch.Tensor, rois: torch.Tensor, features: list[torch.Tensor],
                        geometry: PoolGeometry) -> list[torch.Tensor]:
    # torch.func.vjp works inside a custom op, where plain autograd is switched off.
    _, vjp = torch.func.vjp(lambda *fs: reference.pool_ref(list(fs), rois, geometry), *features)
    return list(vjp(grad))


# --------------------------------------------------------------------------------------- torch.library
def _geometry(scales, pooled_height, pooled_width, sampling_ratio, aligned, aggregation, mapping, k_min,
              canonical_scale, canonical_level, finest_scale) -> PoolGeometry:
    """The op's flat arguments (a custom op takes no dataclass) as one geometry."""
    return PoolGeometry(pooled_height, pooled_width, tuple(scales), sampling_ratio, aligned, aggregation, mapping,
                        k_min, canonical_scale, canonical_level, finest_scale)


@torch.library.custom_op("groie::roi_align", mutates_args=())
def _roi_align_op(features: list[Tensor], rois: Tensor, scales: list[float], pooled_height: int,
                  pooled_width: int, sampling_ratio: int, aligned: bool, aggregation: str | None,
                  mapping: str | None, k_min: int, canonical_scale: float, canonical_level: float,
                  finest_scale: float) -> Tensor:
    geometry = _geometry(scales, pooled_height, pooled_width, sampling_ratio, aligned, aggregation, mapping, k_min,
                         canonical_scale, canonical_level, finest_scale)
    # The public functions check this already; TorchScript and direct torch.ops.groie calls reach the kernels
    # only through here. Shapes, dtypes and devices: free on the host.
    features = check_features(features, "features", MAX_LEVELS)
    check_rois(rois, features[0])
    if backend_for(rois) == "reference":
        return reference.pool_ref(features, rois, geometry)
    return _forward_triton(features, rois, geometry)


@_roi_align_op.register_fake
def _(features, rois, *args):
    return _empty_output(features, _geometry(*args), rois.shape[0], _layout_is_channels_last(features[0]))


@torch.library.custom_op("groie::roi_align_backward", mutates_args=())
def _roi_align_backward_op(grad: Tensor, rois: Tensor, features: list[Tensor], scales: list[float],
                           pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool,
                           aggregation: str | None, mapping: str | None, k_min: int, canonical_scale: float,
                           canonical_level: float, finest_scale: float) -> list[Tensor]:
    geometry = _geometry(scales, pooled_height, pooled_width, sampling_ratio, aligned, aggregation, mapping, k_min,
                         canonical_scale, canonical_level, finest_scale)
    if backend_for(rois) == "reference":
        return _backward_reference(grad, rois, features, geometry)
    return _backward_triton(grad, rois, features, geometry)


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
    return (grads, *[None] * (1 + len(ctx.args)))


torch.library.register_autograd("groie::roi_align", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------- public API
def _call(features: list[torch.Tensor], rois: torch.Tensor, output_size, scales: list, sampling_ratio: int,
          aligned: bool, aggregation: str | None = "sum", mapping: str | None = None, k_min: int = 0,
          canonical_scale: float = 224.0, canonical_level: float = 4.0, finest_scale: float = 56.0) -> Tensor:
    ph, pw = pair(output_size)
    check_sampling_ratio(sampling_ratio)
    # Half-precision rois would round the geometry; compute it in the accumulation dtype instead.
    if rois.dtype in (torch.float16, torch.bfloat16):
        rois = rois.float()
    return _roi_align_op(features, rois, scales, ph, pw, sampling_ratio, bool(aligned), aggregation, mapping,
                         int(k_min), float(canonical_scale), float(canonical_level), float(finest_scale))


def _roi_align_checked(input: Tensor, boxes, output_size, spatial_scale: float, sampling_ratio: int,
                       aligned: bool) -> Tensor:
    """:func:`roi_align` outside TorchScript: every argument checked, with messages."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    features = check_features([input], "input", MAX_LEVELS)
    rois = check_rois(boxes_to_rois(boxes, input), input, "boxes")
    return _call(features, rois, output_size, check_scales([spatial_scale], 1), sampling_ratio, aligned)


def _scripted_rois(boxes: Tensor | list[Tensor]) -> Tensor:
    """:func:`boxes_to_rois` as TorchScript compiles it (no checks, as torchvision's)."""
    if isinstance(boxes, torch.Tensor):
        return boxes
    indices = []
    for i, b in enumerate(boxes):
        indices.append(torch.full_like(b[:, :1], float(i)))
    return torch.cat([torch.cat(indices, 0), torch.cat(boxes, 0)], 1)


def roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size: BroadcastingList2[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign, a drop-in for :func:`torchvision.ops.roi_align` (same signature, defaults and results).

    Scriptable as torchvision's: under ``torch.jit.script`` it calls ``torch.ops.groie.roi_align`` directly,
    without the argument checks below.

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
    if not torch.jit.is_scripting():
        return _roi_align_checked(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    rois = _scripted_rois(boxes)
    if rois.dtype == torch.float16 or rois.dtype == torch.bfloat16:
        rois = rois.float()
    return torch.ops.groie.roi_align([input], rois, [spatial_scale], output_size[0], output_size[1], sampling_ratio,
                                     aligned, "sum", None, 0, 224.0, 4.0, 56.0)


def multilevel_roi_align(features: Sequence[torch.Tensor], rois: torch.Tensor, output_size,
                         spatial_scales: Sequence[float], sampling_ratio: int = 2, aligned: bool = True,
                         aggregation: str = "sum") -> torch.Tensor:
    """GRoIE's all-level RoIAlign: every RoI pooled from every level, aggregated in the same launch.

    Args:
        features: L tensors ``[N, C, H_l, W_l]`` (same N, C, dtype, device; 1 <= L <= MAX_LEVELS). A level of
            size 0 contributes zeros.
        rois: ``Tensor[K, 5]`` in image coordinates. spatial_scales: L floats (1 / stride).
        aggregation: one of :data:`~.geometry.AGGREGATIONS`: ``"sum"`` -> ``[K, C, h, w]`` (no per-level
            output is materialised), ``"concat"`` -> ``[K, L*C, h, w]`` (level 0 first), ``"stack"`` ->
            ``[L, K, C, h, w]``.

    One kernel launch forward and one backward, whatever L. Raises as :func:`roi_align`, and ValueError for
    an unknown aggregation or a number of spatial_scales that differs from the number of levels.
    """
    features = check_features(features, "features", MAX_LEVELS)
    rois = check_rois(boxes_to_rois(rois, features[0]), features[0])
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    scales = check_scales(spatial_scales, len(features))
    return _call(features, rois, output_size, scales, sampling_ratio, aligned, aggregation=aggregation)


def mapped_roi_align(features: Sequence[torch.Tensor], rois: torch.Tensor, output_size,
                     spatial_scales: Sequence[float], sampling_ratio: int = 2, aligned: bool = False,
                     mapping: str = "torchvision", canonical_scale: float = 224, canonical_level: int = 4,
                     finest_scale: float = 56) -> torch.Tensor:
    """Classic FPN RoIAlign: each RoI pooled from the one level its size maps to, chosen in the kernel.

    ``mapping`` is one of :data:`~.geometry.MAPPINGS`. ``"torchvision"``: torchvision's LevelMapper,
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)`` clamped to the levels, with
    ``k_min = round(-log2(spatial_scales[0]))``. ``"mmdet"``: mmdetection's ``floor(log2(sqrt(area) /
    finest_scale + 1e-6))`` clamped to ``[0, L-1]``. A RoI whose area is not finite (or negative) gets zeros.
    Returns ``[K, C, h, w]``; one launch, no sort, no gather, no host synchronisation.
    """
    features = check_features(features, "features", MAX_LEVELS)
    rois = check_rois(boxes_to_rois(rois, features[0]), features[0])
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    scales = check_scales(spatial_scales, len(features))
    k_min = 0
    if mapping == "torchvision":
        if min(scales) <= 0:
            raise ValueError(f"spatial_scales must be positive for the torchvision mapping, got {scales}")
        k_min = round(-math.log2(scales[0]))
    return _call(features, rois, output_size, scales, sampling_ratio, aligned, aggregation=None, mapping=mapping,
                 k_min=k_min, canonical_scale=canonical_scale, canonical_level=canonical_level,
                 finest_scale=finest_scale)
