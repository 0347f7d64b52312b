"""Float64 ground truth for RoIAlign: plain loops over Python floats, written from the team spec.

Independent of :mod:`groie_triton.reference` on purpose, and slow: tiny shapes only. It takes what
torchvision cannot (bfloat16 maps, NaN/Inf boxes, out-of-range batch indices, empty maps), so it is what
the kernels are checked against for those.
"""

from __future__ import annotations

import math

import torch


def _grid(roi_size: float, pooled: int, size: int, sampling_ratio: int) -> int:
    """Samples per bin on one axis; adaptive: ceil(roi / pooled), NaN or negative -> 0, at most size + 2."""
    if sampling_ratio > 0:
        return sampling_ratio
    q = roi_size / pooled
    if math.isnan(q) or q < 0:
        return 0
    return size + 2 if q > size + 2 else min(math.ceil(q), size + 2)


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
        grid_h = _grid(roi_h, ph, height, sampling_ratio)
        grid_w = _grid(roi_w, pw, width, sampling_ratio)
        count = max(grid_h * grid_w, 1)
        for py in range(ph):
            for px in range(pw):
                total = 0.0
                for iy in range(grid_h):
                    y = start_h + py * bin_h + ((iy + 0.5) * bin_h) / grid_h
                    for ix in range(grid_w):
                        x = start_w + px * bin_w + ((ix + 0.5) * bin_w) / grid_w
                        value = _bilinear(fmap, y, x, height, width)
                        if value is not None:
                            total = total + value
                out[k, :, py, px] = torch.as_tensor(total / count)
    return out
