"""Argument checks shared by the public ops: plain Python, run before a custom op is called (never inside one)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import triton.language as tl

from groie_triton.backend import acc_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tl_acc_dtype(dtype: torch.dtype):
    """:func:`~groie_triton.backend.acc_dtype` as the Triton dtype a kernel's ``ACC`` constexpr takes."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def pair(output_size, name: str = "output_size") -> tuple[int, int]:
    if isinstance(output_size, int):
        size = (output_size, output_size)
    elif isinstance(output_size, (list, tuple)) and len(output_size) == 2:
        size = tuple(output_size)
    else:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {output_size!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in size) or min(size) <= 0:
        raise ValueError(f"{name} must be positive integers, got {output_size!r}")
    return int(size[0]), int(size[1])


def check_features(features, name: str, max_levels: int) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor) or not isinstance(features, Iterable):
        raise TypeError(f"{name} must be a sequence of [N, C, H, W] tensors, one per level, got "
                        f"{'one tensor' if isinstance(features, torch.Tensor) else type(features).__name__}")
    features = list(features)
    if not features:
        raise ValueError(f"{name} must hold at least one level")
    if len(features) > max_levels:
        raise ValueError(f"{name} has {len(features)} levels; the kernels support at most {max_levels}")
    first = features[0]
    for i, f in enumerate(features):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() != 4:
            raise ValueError(f"{name}[{i}] must be 4-D [N, C, H, W], got shape {tuple(f.shape)}")
        if f.dtype not in FLOAT_DTYPES:
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


def check_rois(rois: torch.Tensor, like: torch.Tensor, name: str = "rois") -> torch.Tensor:
    if not isinstance(rois, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor[K, 5] or a list of Tensor[L_i, 4], got {type(rois).__name__}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"{name} must have shape [K, 5] (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}")
    if not rois.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {rois.dtype}")
    if rois.device != like.device:
        raise ValueError(f"{name} is on {rois.device} but the features are on {like.device}")
    return rois


def check_scales(spatial_scales, num_levels: int) -> list[float]:
    """The scales as a list, one per level, each finite and >= 0.

    Real numbers are made Python floats; under ``torch.compile(dynamic=True)`` a scale may be a
    ``torch.SymFloat``, which is passed through as it is and checked by comparisons that compile to guards.
    """
    if isinstance(spatial_scales, (int, float, torch.SymFloat, torch.SymInt)):
        spatial_scales = [spatial_scales]
    spatial_scales = [s if isinstance(s, (torch.SymFloat, torch.SymInt)) else float(s) for s in spatial_scales]
    if len(spatial_scales) != num_levels:
        raise ValueError(f"spatial_scales has {len(spatial_scales)} entries but there are {num_levels} levels")
    for s in spatial_scales:
        # Comparisons, not math.isfinite: torch.compile traces them on a symbolic scale too (NaN fails both).
        if not (abs(s) < math.inf and s >= 0):
            raise ValueError(f"spatial_scales must be finite and non-negative, got {s}")
    return spatial_scales


def check_sampling_ratio(sampling_ratio) -> int:
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio must be an int (<= 0 means adaptive), got {sampling_ratio!r}")
    return sampling_ratio
