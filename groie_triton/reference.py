"""Pure-PyTorch RoIAlign: the CPU backend without the Triton interpreter, and the reference the kernels match.

Semantics are torchvision's ``roi_align`` plus the library's guards for degenerate input (bad batch index,
NaN/Inf boxes, empty levels). Bilinear sampling is a gather of feature rows from a ``[N*H*W, C]`` table
weighted by the bilinear taps (``embedding_bag``, one bag per output bin), so autograd gives the backward, a
dense CPU accumulation that is deterministic run to run. Boxes get no gradient, as in torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import torch
import torch.nn.functional as F
from torch import Tensor

from groie_triton.backend import acc_dtype
from groie_triton.ops.geometry import AGGREGATIONS, MAPPINGS, PoolGeometry

__all__ = [
    "roi_align_ref",
    "multilevel_roi_align_ref",
    "mapped_roi_align_ref",
    "pool_ref",
    "map_levels_torchvision",
    "map_levels_mmdet",
    "level_sum_act_ref",
    "level_sum_act_backward_ref",
]

# Sample taps (index, weight, mask) built at once: bounds memory whatever the number of RoIs and the adaptive
# grid (a huge box visits up to (2H + 6) x (2W + 6) samples per bin), while keeping the Python loop short.
_TAP_BUDGET = 1 << 22


def _pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    if ph <= 0 or pw <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return int(ph), int(pw)


def _grid_size(roi_size: Tensor, pooled: int, sampling_ratio: int) -> Tensor:
    """Samples per bin along one axis, a float [K] in ``roi_size``'s dtype, as torchvision's grid.

    The fixed ratio, or adaptive ceil(roi_size / pooled) with NaN or negative -> 0 and no cap: it may be
    huge or +inf (only the samples near the map are visited, see :func:`_axis_taps`).
    """
    if sampling_ratio > 0:
        return torch.full_like(roi_size, sampling_ratio)
    grid = torch.ceil(roi_size / pooled)
    return torch.where(grid > 0, grid, 0)


def _visited(grid: Tensor, size: int, sampling_ratio: int) -> Tensor:
    """How many sample indices per bin along one axis are visited, int64 [K].

    All of a fixed ratio. Adaptive: a grid above 1 spaces samples bin / grid >= 0.5 apart, so at most
    2 * size + 3 of them lie in [-1, size]; 2 * size + 6 from :func:`_first_sample` leaves room for rounding.
    """
    if sampling_ratio > 0:
        return grid.long()
    return grid.clamp(max=2 * size + 6).long()


def _first_sample(base: Tensor, bin_size: Tensor, grid: Tensor, sampling_ratio: int) -> Tensor:
    """Per bin, the first sample index that may lie at or after -1 (one early, for rounding), in [0, grid].

    base: [K, P] start of each bin; bin_size, grid: [K, 1]. Sample i sits at base + (i + 0.5) * step with
    step = bin / grid, so it is >= -1 from i = (-1 - base) / step - 0.5 on. A NaN (empty grid, NaN or
    infinite box: every sample is then NaN or infinite) gives 0.
    """
    if sampling_ratio > 0:
        return torch.zeros_like(base)
    first = torch.ceil((-1 - base) / (bin_size / grid) - 0.5) - 1
    return torch.minimum(torch.where(first > 0, first, 0), grid)


def _axis_taps(start: Tensor, bin_size: Tensor, grid: Tensor, visited: Tensor, pooled: int, size: int,
               sampling_ratio: int):
    """Bilinear taps of the visited samples along one axis: ``visited`` indices per bin from the first.

    start, bin_size, grid: [K] accumulation dtype; visited: [K] int64 (:func:`_visited`), padded to its
    largest, S. Returns ``index`` [K, pooled, S, 2] int64 (low, high pixel), ``weight`` [K, pooled, S, 2]
    (1 - frac, frac) and ``inside`` [K, pooled, S] bool, False for a sample outside [-1, size], NaN, past
    its RoI's grid or in the padding. Weights stay finite everywhere.
    """
    j = torch.arange(int(visited.max()) if visited.numel() else 0, device=start.device)
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)
    start, bin_size, grid = start[:, None], bin_size[:, None], grid[:, None]
    base = start + p * bin_size
    first = _first_sample(base, bin_size, grid, sampling_ratio)
    i = first[..., None] + j.to(start.dtype)
    bin_size, grid = bin_size[..., None], grid[..., None]
    # torchvision's sample position, rounding included.
    coord = base[..., None] + ((i + 0.5) * bin_size) / grid
    inside = (coord >= -1) & (coord <= size) & (i < grid) & (j < visited[:, None, None])
    coord = torch.where(inside, coord.clamp(min=0), 0)
    low = coord.long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, 0, coord - low)
    return torch.stack([low, high], -1), torch.stack([1 - frac, frac], -1), inside


def _pool_bins(table: Tensor, rows: Tensor, y_w: Tensor, y_in: Tensor, x_idx: Tensor, x_w: Tensor,
               x_in: Tensor, width: int, iy_step: int) -> Tensor:
    """Weighted sum of the bilinear samples of each bin, [n * ph * pw, C] (bins in (RoI, py, px) order).

    table: [N*H*W, C] feature rows; rows: [n, ph, Gy, 2] table row of each y tap (batch * H + y); the
    other taps as :func:`_axis_taps` returns them. Steps over iy_step grid rows.
    """
    gy = rows.shape[2]
    # Axes: [n, ph, pw, iy, ix, y corner, x corner].
    x_idx, x_w = x_idx[:, None, :, None, :, None, :], x_w[:, None, :, None, :, None, :]
    x_in = x_in[:, None, :, None, :, None, None]
    sums = []
    for iy0 in range(0, max(gy, 1), iy_step):
        sl = slice(iy0, iy0 + iy_step)
        index = rows[:, :, None, sl, None, :, None] * width + x_idx
        weight = y_w[:, :, None, sl, None, :, None] * x_w
        keep = (y_in[:, :, None, sl, None, None, None] & x_in).expand(index.shape).flatten(3)
        counts = keep.sum(-1).flatten()
        kept = keep.flatten().nonzero().squeeze(1)
        # One bag per bin holding its samples inside the map (the others are never read): a fused gather
        # and weighted sum, whose backward accumulates into the table rows in a fixed order.
        sums.append(F.embedding_bag(index.flatten()[kept], table, counts.cumsum(0) - counts, mode="sum",
                                    per_sample_weights=weight.flatten()[kept]))
    return reduce(torch.add, sums)


def _roi_align_acc(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                   sampling_ratio: int, aligned: bool) -> Tensor:
    """:func:`roi_align_ref` before the output layout and cast: [K, ph, pw, C] in the accumulation dtype."""
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got shape {tuple(input.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be [K, 5] (batch index, x1, y1, x2, y2), got shape {tuple(rois.shape)}")
    acc = acc_dtype(input.dtype)
    n, channels, height, width = input.shape
    ph, pw = _pair(output_size)
    rois = rois.detach().to(device=input.device, dtype=acc)
    k = rois.shape[0]

    offset = 0.5 if aligned else 0.0
    start_w, start_h, end_w, end_h = (rois[:, 1:] * spatial_scale - offset).unbind(1)
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not aligned:
        # clamp keeps NaN (a NaN box stays NaN and samples nothing), unlike an IEEE maxNum.
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    gh = _grid_size(roi_h, ph, sampling_ratio)
    gw = _grid_size(roi_w, pw, sampling_ratio)
    # fmax: an infinite grid times an empty one (NaN) has no sample, count 1; an infinite grid gives 0.
    count = torch.fmax(gh * gw, gh.new_ones(()))
    vh, vw = _visited(gh, height, sampling_ratio), _visited(gw, width, sampling_ratio)

    batch = rois[:, 0]
    enabled = (batch >= 0) & (batch < n) & (height > 0) & (width > 0)
    batch = torch.where(enabled, batch, 0).long()
    y_idx, y_w, y_in = _axis_taps(start_h, roi_h / ph, gh, vh, ph, height, sampling_ratio)
    x_idx, x_w, x_in = _axis_taps(start_w, roi_w / pw, gw, vw, pw, width, sampling_ratio)
    # Dividing the taps instead of the sums saves a pass over the output: exact for power-of-two counts
    # (sampling_ratio 2), otherwise one more rounding per tap than torchvision's sum / count.
    y_w = y_w / count[:, None, None, None]
    y_in = y_in & enabled[:, None, None]
    rows = batch[:, None, None, None] * height + y_idx

    # Feature rows [N*H*W, C]: one copy at most (none for channels_last input in the accumulation dtype).
    table = input.to(acc, memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, channels)

    # Chunks of RoIs with similar visited grids pad little; each step builds at most _TAP_BUDGET sample taps
    # (one RoI and some of its grid rows when it alone has more). A fixed sampling_ratio keeps the RoI order.
    order = torch.argsort(vh * vw, descending=True, stable=True)
    gh_bound = vh[order].flip(0).cummax(0).values.flip(0).tolist()
    gw_bound = vw[order].flip(0).cummax(0).values.flip(0).tolist()
    pieces, r0 = [], 0
    while r0 < k or not pieces:
        gy, gx = (gh_bound[r0], gw_bound[r0]) if r0 < k else (0, 0)
        per_row = ph * pw * 4 * max(gx, 1)
        iy_step = max(1, min(gy, _TAP_BUDGET // per_row))
        sel = order[r0:r0 + max(1, _TAP_BUDGET // (per_row * iy_step))]
        pieces.append(_pool_bins(table, rows[sel][:, :, :gy], y_w[sel][:, :, :gy], y_in[sel][:, :, :gy],
                                 x_idx[sel][:, :, :gx], x_w[sel][:, :, :gx], x_in[sel][:, :, :gx], width,
                                 iy_step))
        r0 += sel.numel()
    pooled = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(k, ph, pw, channels)
    if sampling_ratio <= 0:
        pooled = pooled.index_select(0, torch.argsort(order))
    return pooled


def _is_channels_last(t: Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _finish(pooled: Tensor, like: Tensor) -> Tensor:
    """[..., ph, pw, C] accumulation -> [..., C, ph, pw], ``like``'s dtype, channels_last iff ``like`` is."""
    out = pooled.movedim(-1, -3)
    return (out if _is_channels_last(like) else out.contiguous()).to(like.dtype)


def roi_align_ref(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                  sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign as torchvision computes it, plus the library's guards; differentiable in ``input``.

    Args:
        input: [N, C, H, W] float16 / bfloat16 / float32 / float64, any strides (N, H, W may be 0).
        rois: [K, 5] rows (batch index, x1, y1, x2, y2) in image coordinates, any float dtype.
        output_size: (ph, pw) (an int means square).
        spatial_scale: image to ``input`` coordinates (1 / stride).
        sampling_ratio: samples per bin along each axis; <= 0 means ceil(roi_size / output_size) per RoI.
        aligned: shift by -0.5 pixel (pixel-exact variant).

    Returns:
        [K, C, ph, pw] in ``input``'s dtype (computed in float64 for float64 input, float32 otherwise);
        channels_last if ``input`` is, contiguous otherwise (as the kernels). Guards: a batch index outside
        [0, N) or NaN and an empty map give zeros, NaN/Inf boxes zeros or finite values, never a fault. The
        adaptive grid is torchvision's, uncapped (0 for NaN/negative sizes, possibly huge or infinite: count
        then infinite, output 0), but only the samples that may lie on the map are visited, so any box costs
        at most (2H + 6) x (2W + 6) samples per bin.

    Raises:
        ValueError: ``input`` not 4-D, ``rois`` not [K, 5], non-positive ``output_size``.
    """
    return _finish(_roi_align_acc(input, rois, output_size, spatial_scale, sampling_ratio, aligned), input)


def multilevel_roi_align_ref(features: Sequence[Tensor], rois: Tensor, output_size: tuple[int, int],
                             spatial_scales: Sequence[float], sampling_ratio: int, aligned: bool,
                             aggregation: str = "sum") -> Tensor:
    """Every RoI pooled from every level (GRoIE), aggregated.

    Args:
        features: L tensors [N, C, H_l, W_l] of one dtype; rois [K, 5] in image coordinates;
            spatial_scales: L floats (1 / stride); the rest as :func:`roi_align_ref`.
        aggregation: "sum" -> [K, C, ph, pw] (summed in the accumulation dtype, level 0 first, one cast),
            "concat" -> [K, L*C, ph, pw] (level 0 first), "stack" -> [L, K, C, ph, pw]. Layout and dtype
            follow ``features[0]`` as in :func:`roi_align_ref`.

    Raises:
        ValueError: unknown aggregation, no level, or len(spatial_scales) != len(features).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not features or len(features) != len(spatial_scales):
        raise ValueError(f"need one spatial scale per level, got {len(features)} levels and "
                         f"{len(spatial_scales)} scales")
    pooled = [_roi_align_acc(f, rois, output_size, s, sampling_ratio, aligned)
              for f, s in zip(features, spatial_scales, strict=True)]
    if aggregation == "sum":
        out = reduce(torch.add, pooled)
    elif aggregation == "concat":
        out = torch.cat(pooled, dim=-1)
    else:
        out = torch.stack(pooled)
    return _finish(out, features[0])


def _level_index(level: Tensor, lowest: int, highest: int) -> Tensor:
    """Clamp a float level to [lowest, highest] and shift it to an index; NaN -> -1 (±Inf clamp)."""
    return torch.where(level.isnan(), -1.0, level.clamp(lowest, highest) - lowest).long()


def _roi_sizes(rois: Tensor) -> Tensor:
    """sqrt of the box area, in float64 for float64 rois and float32 otherwise; NaN for a negative area."""
    boxes = rois.detach()[:, 1:].to(acc_dtype(rois.dtype))
    return torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def map_levels_torchvision(rois: Tensor, spatial_scales: Sequence[float], canonical_scale: float = 224,
                           canonical_level: int = 4) -> Tensor:
    """Level index of each RoI by torchvision's LevelMapper (FPN eq. 1), int64 [K].

    ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)`` clamped to [k_min, k_max] minus
    k_min, with k_min = round(-log2(spatial_scales[0])), k_max = round(-log2(spatial_scales[-1])). A zero
    area maps to level 0 as in torchvision; a NaN level (negative or NaN area) gives -1.
    """
    k_min = round(-math.log2(spatial_scales[0]))
    k_max = round(-math.log2(spatial_scales[-1]))
    level = torch.floor(canonical_level + torch.log2(_roi_sizes(rois) / canonical_scale) + 1e-6)
    return _level_index(level, k_min, k_max)


def map_levels_mmdet(rois: Tensor, num_levels: int, finest_scale: float = 56) -> Tensor:
    """Level index of each RoI by mmdetection's ``map_roi_levels``, int64 [K].

    ``floor(log2(sqrt(area) / finest_scale + 1e-6))`` clamped to [0, num_levels - 1]; NaN -> -1.
    """
    level = torch.floor(torch.log2(_roi_sizes(rois) / finest_scale + 1e-6))
    return _level_index(level, 0, num_levels - 1)


def mapped_roi_align_ref(features: Sequence[Tensor], rois: Tensor, output_size: tuple[int, int],
                         spatial_scales: Sequence[float], sampling_ratio: int, aligned: bool,
                         mapping: str = "torchvision", canonical_scale: float = 224, canonical_level: int = 4,
                         finest_scale: float = 56) -> Tensor:
    """Classic FPN RoIAlign: each RoI pooled from the one level its size maps to, [K, C, ph, pw].

    ``mapping`` is "torchvision" (:func:`map_levels_torchvision`) or "mmdet" (:func:`map_levels_mmdet`);
    the mapping runs on the rois cast to the accumulation dtype of ``features``. A RoI mapped to -1 gets
    zeros. Other arguments as :func:`multilevel_roi_align_ref`.

    Raises:
        ValueError: unknown mapping, no level, or len(spatial_scales) != len(features).
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    if not features or len(features) != len(spatial_scales):
        raise ValueError(f"need one spatial scale per level, got {len(features)} levels and "
                         f"{len(spatial_scales)} scales")
    acc = acc_dtype(features[0].dtype)
    rois = rois.detach().to(device=features[0].device, dtype=acc)
    if mapping == "torchvision":
        levels = map_levels_torchvision(rois, spatial_scales, canonical_scale, canonical_level)
    else:
        levels = map_levels_mmdet(rois, len(features), finest_scale)
    out = features[0].new_zeros((rois.shape[0], *_pair(output_size), features[0].shape[1]), dtype=acc)
    # Every level runs (possibly on no RoI) so each feature map stays in the autograd graph.
    for level, (feature, scale) in enumerate(zip(features, spatial_scales, strict=True)):
        index = torch.nonzero(levels == level).flatten()
        out = out.index_copy(0, index, _roi_align_acc(feature, rois[index], output_size, scale,
                                                      sampling_ratio, aligned))
    return _finish(out, features[0])


def pool_ref(features: Sequence[Tensor], rois: Tensor, geometry: PoolGeometry) -> Tensor:
    """The op ``groie::roi_align`` on the reference backend: :func:`multilevel_roi_align_ref` for a geometry
    with an aggregation, :func:`mapped_roi_align_ref` for one with a level mapping."""
    g = geometry
    if g.mapping is not None:
        return mapped_roi_align_ref(features, rois, g.output_size, g.spatial_scales, g.sampling_ratio, g.aligned,
                                    g.mapping, canonical_scale=g.canonical_scale,
                                    canonical_level=int(g.canonical_level), finest_scale=g.finest_scale)
    return multilevel_roi_align_ref(features, rois, g.output_size, g.spatial_scales, g.sampling_ratio, g.aligned,
                                    g.aggregation)


# ------------------------------------------------------------------------------------ level sum + activation
def _activate(v: Tensor, activation: str, negative_slope: float) -> Tensor:
    if activation == "relu":
        return torch.relu(v)
    if activation == "leaky_relu":
        return F.leaky_relu(v, negative_slope)
    return v


def level_sum_act_ref(y: Tensor, activation: str, negative_slope: float) -> Tensor:
    """``sum_l act(y[l])`` over the first dimension, level 0 first, in the accumulation dtype; y's dtype.

    ``activation`` is ``"none"``, ``"relu"`` or ``"leaky_relu"`` (with ``negative_slope``).
    """
    acc = acc_dtype(y.dtype)
    out = _activate(y[0].to(acc), activation, negative_slope)
    for level in y[1:]:
        out = out + _activate(level.to(acc), activation, negative_slope)
    return out.to(y.dtype)


def level_sum_act_backward_ref(grad: Tensor, y: Tensor, activation: str, negative_slope: float) -> Tensor:
    """Gradient of :func:`level_sum_act_ref` with respect to y, contiguous: ``grad * act'(y[l])`` per level,
    with torch's derivative at 0 and for NaN (0 for relu, ``negative_slope`` for leaky_relu)."""
    acc = acc_dtype(y.dtype)
    g = grad.to(acc).expand_as(y)
    if activation == "relu":
        g = torch.where(y > 0, g, torch.zeros((), dtype=acc, device=g.device))
    elif activation == "leaky_relu":
        g = torch.where(y > 0, g, g * negative_slope)
    return g.to(y.dtype).contiguous()
