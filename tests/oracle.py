"""Float64 ground truth for RoIAlign: plain loops over Python floats, written from the team spec.

Independent of :mod:`groie_triton.reference` on purpose, and slow: tiny shapes only. It takes what
torchvision cannot (bfloat16 maps, NaN/Inf boxes, out-of-range batch indices, empty maps), so it is what
the kernels are checked against for those.
"""

from __future__ import annotations

import math

import torch


def _grid(roi_size: float, pooled: int, sampling_ratio: int) -> float:
    """Samples per bin on one axis, a float as in the kernels.

    The fixed ratio, or adaptive ceil(roi / pooled) with NaN or negative -> 0 and no cap (it may be huge,
    or inf for an infinite box).
    """
    if sampling_ratio > 0:
        return float(sampling_ratio)
    q = roi_size / pooled
    if math.isnan(q) or q <= 0:
        return 0.0
    return q if math.isinf(q) else float(math.ceil(q))


def _sample_coords(start: float, bin_size: float, p: int, grid: float, size: int, adaptive: bool) -> list:
    """Coordinates of the samples of bin p along one axis that are worth checking against [-1, size].

    All ``grid`` of them for a fixed ratio. Adaptive grids can be huge, so only a window of indices:
    sample i lies at base + (i + 0.5) * step, base = start + p * bin_size, step = bin_size / grid > 0
    (grid = ceil(bin_size) > 0 implies bin_size > 0), hence it is in [-1, size] iff
    (-1 - base) / step - 0.5 <= i <= (size - base) / step - 0.5. That real range, widened by 2 indices on
    each side against rounding and clamped to [0, grid), holds every sample that can lie on the map.
    (Only past |base| = 2**52 can the rounding exceed 2 indices; a sample then reaches the map only if
    bin_size >= |base| - 1, so grid >= 2**52 and the bin's few samples on the map weigh nothing once
    divided by the count.)
    """
    base = start + p * bin_size
    if not adaptive:
        indices = range(int(grid))
    elif grid == 0:
        indices = range(0)
    elif not (math.isfinite(base) and math.isfinite(bin_size)):
        # base +-inf or NaN, or an infinite bin (then grid is inf, and inf / inf is NaN): every sample is
        # NaN or infinite, none lies on the map.
        indices = range(0)
    else:
        step = bin_size / grid
        lo = (-1 - base) / step - 0.5
        hi = (size - base) / step - 0.5
        first = math.ceil(min(max(lo - 2, 0.0), grid))
        last = math.floor(max(min(hi + 2, grid - 1), -1.0))
        indices = range(first, last + 1)
    # torchvision's expression, rounding included.
    return [start + p * bin_size + ((i + 0.5) * bin_size) / grid for i in indices]


def _bilinear(fmap, y: float, x: float, height: int, width: int):
    """Bilinear value of fmap [C, H, W] at (y, x), torchvision's clamping; None outside [-1, H] x [-1, W]."""
    if not (-1.0 <= y <= height and -1.0 <= x <= width):  # also False for NaN
        return None
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * fmap[:, y_low, x_low] + hy * lx * fmap[:, y_low, x_high]
            + ly * hx * fmap[:, y_high, x_low] + ly * lx * fmap[:, y_high, x_high])


def roi_align_oracle(input: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float,
                     sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """RoIAlign of ``input`` [N, C, H, W] at ``rois`` [K, 5]: [K, C, ph, pw] float64, whatever the dtypes."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    fmaps = input.detach().cpu().double().numpy()
    boxes = rois.detach().cpu().double().tolist()
    n, channels, height, width = fmaps.shape
    out = torch.zeros(len(boxes), channels, ph, pw, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(boxes):
        if not (0 <= b < n) or height == 0 or width == 0:
            continue
        fmap = fmaps[int(b)]
        start_w, start_h = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w = x2 * spatial_scale - offset - start_w
        roi_h = y2 * spatial_scale - offset - start_h
        if not aligned:
            roi_w = roi_w if math.isnan(roi_w) else max(roi_w, 1.0)
            roi_h = roi_h if math.isnan(roi_h) else max(roi_h, 1.0)
        bin_h, bin_w = roi_h / ph, roi_w / pw
        adaptive = sampling_ratio <= 0
        grid_h = _grid(roi_h, ph, sampling_ratio)
        grid_w = _grid(roi_w, pw, sampling_ratio)
        # No sample on one axis: count 1 (0 * inf would be NaN); an infinite grid: count inf, output 0.
        count = max(grid_h * grid_w, 1.0) if grid_h > 0 and grid_w > 0 else 1.0
        ys = [_sample_coords(start_h, bin_h, py, grid_h, height, adaptive) for py in range(ph)]
        xs = [_sample_coords(start_w, bin_w, px, grid_w, width, adaptive) for px in range(pw)]
        for py in range(ph):
            for px in range(pw):
                total = 0.0
                for y in ys[py]:
                    for x in xs[px]:
                        value = _bilinear(fmap, y, x, height, width)
                        if value is not None:
                            total = total + value
                out[k, :, py, px] = torch.as_tensor(total / count)
    return out
