"""What tests and benchmarks share: the one dtype -> tolerance table and the pyramid / RoI generators.

Outputs are compared against torchvision or a float64 reference cast down, through
:func:`torch.testing.assert_close`, so a failure says where and by how much. float32/float64 kernels
accumulate like torchvision up to summation order; half types are within the rounding of the output (float16
eps 2**-10, bfloat16 eps 2**-7), since the kernels accumulate in float32 and round once. Tolerances are
relative to outputs of order 1 (``randn`` features); callers with larger outputs scale ``atol``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["TOLERANCES", "DTYPE_NAMES", "tolerance", "assert_close_to", "make_pyramid", "random_rois",
           "edge_rois", "count_launches"]

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

DTYPE_NAMES: dict[str, torch.dtype] = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16,
                                       "bf16": torch.bfloat16}
"""Triton's short dtype names (used by the benchmark and the compile report) -> torch dtypes."""


def tolerance(dtype: torch.dtype | str) -> dict[str, float]:
    """``{"atol", "rtol"}`` for a torch dtype or a short name (``"fp32"``)."""
    return TOLERANCES[DTYPE_NAMES.get(dtype, dtype)]


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw) -> None:
    """assert_close with the table's tolerance for ``dtype`` (default: ``actual``'s), compared in float64."""
    tol = {**tolerance(dtype or actual.dtype), **kw}
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def make_pyramid(n: int = 2, c: int = 4, image: tuple[int, int] = (64, 80), strides: Sequence[int] = (4, 8, 16, 32),
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """An FPN pyramid of ``randn`` maps ``[n, c, ceil(H / s), ceil(W / s)]``, one per stride.

    Drawn in float64 and cast, so every dtype sees the same values; channels_last on request.
    """
    g = torch.Generator().manual_seed(seed)
    feats = []
    for s in strides:
        f = torch.randn(n, c, math.ceil(image[0] / s), math.ceil(image[1] / s), generator=g, dtype=torch.float64)
        f = f.to(dtype=dtype, device=device)
        feats.append(f.contiguous(memory_format=torch.channels_last) if channels_last else f)
    return feats


def random_rois(n: int = 2, image: tuple[int, int] = (64, 80), k: int = 6, seed: int = 0,
                dtype: torch.dtype = torch.float32, min_size: float = 4.0, max_size: float = 100.0,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """``Tensor[k, 5]`` of boxes log-uniform in size from ``min_size`` to ``max_size`` pixels, centred anywhere
    in the ``image`` (so some cross its border), batch indices cycling over the ``n`` images."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(torch.empty(k, 2, dtype=torch.float64).uniform_(math.log(min_size), math.log(max_size),
                                                                     generator=g))
    centre = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([image[1], image[0]])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    index = (torch.arange(k) % max(n, 1)).to(torch.float64)[:, None]
    return torch.cat([index, boxes], 1).to(dtype=dtype, device=device)


def edge_rois(n: int = 2, h: int = 11, w: int = 13, scale: float = 0.5, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """``Tensor[8, 5]`` of the boxes that trip RoIAlign implementations up, for an ``h x w`` map at ``scale``:
    inside, partly outside (both corners), fully outside, tiny, zero width, the whole image, fractional."""
    H, W = h / scale, w / scale
    boxes = [
        [0, 2.0, 3.0, W - 4.0, H - 2.0],
        [1, -7.5, -3.0, W / 2, H / 3],
        [0, W / 2, H / 2, W + 9.0, H + 5.5],
        [1, W + 3.0, H + 3.0, W + 20.0, H + 30.0],
        [0, 5.3, 6.1, 5.9, 6.4],
        [1, 4.0, 4.0, 4.0, 9.0],
        [0, 0.0, 0.0, W, H],
        [1, 1.7, 2.9, 13.1, 7.3],
    ]
    rois = torch.tensor(boxes, dtype=torch.float64)
    rois[:, 0] = rois[:, 0] % max(n, 1)
    return rois.to(dtype)


def count_launches(monkeypatch, module, names: Sequence[str], launches: list | None = None) -> list:
    """Record, in ``launches`` (a new list by default), the name of each launch of the listed autotuned
    kernels of ``module``; ``monkeypatch`` (pytest's) restores them after the test."""
    launches = [] if launches is None else launches
    for name in names:
        kernel = getattr(module, name)
        original = kernel.run

        def counting(*args, _name=name, _original=original, **kw):
            launches.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(kernel, "run", counting)
    return launches
