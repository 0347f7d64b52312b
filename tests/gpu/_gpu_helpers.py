"""Shared pieces of tests/gpu: CUDA pyramids and RoIs, torchvision references, gradient helpers.

References run torchvision's CUDA ops on the same values in the kernels' accumulation dtype (float32 for
float16 / bfloat16 / float32, float64 for float64): RoI geometry is then rounded as the kernels round it, which
matters for fp32 at coordinates of hundreds of pixels, and torchvision's own half kernels (which accumulate in
half, and may not dispatch bfloat16 at all) are never the reference. Outputs are compared within the tolerance
of the tested dtype (groie_triton.testing).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torchvision

from groie_triton.testing import make_pyramid, random_rois, tolerance

DEVICE = os.environ.get("GROIE_GPU_TEST_DEVICE", "cuda")
"""Where the suite runs: CUDA. ``GROIE_GPU_TEST_DEVICE=cpu TRITON_INTERPRET=1`` is a dry run of the tests'
own logic under the Triton interpreter on CPU (slow; run a few with -k; the CUDA-only tests skip themselves),
for machines without a GPU. It proves the tests' plumbing, not the compiled kernels."""
DRY_RUN = DEVICE != "cuda"

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = ["fp16", "bf16", "fp32", "fp64"]
LAYOUTS = ["nchw", "channels_last"]
STRIDES = (4, 8, 16, 32)
SCALES = [1.0 / s for s in STRIDES]


def pyramid(dtype: torch.dtype, layout: str, n: int = 2, c: int = 40, image=(64, 80), strides=STRIDES,
            seed: int = 0) -> list[torch.Tensor]:
    """make_pyramid on CUDA (C = 40 by default: not a multiple of any channel block, so masks are exercised)."""
    return make_pyramid(n=n, c=c, image=image, strides=strides, dtype=dtype, channels_last=layout != "nchw",
                        seed=seed, device=DEVICE)


def rois(n: int = 2, image=(64, 80), k: int = 24, seed: int = 1, min_size: float = 2.0, max_size: float = 90.0,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return random_rois(n=n, image=image, k=k, seed=seed, min_size=min_size, max_size=max_size, dtype=dtype,
                       device=DEVICE)


def check_layout(out: torch.Tensor, layout: str) -> None:
    """A 4-D output keeps the input's layout (DESIGN.md: channels_last in, channels_last out)."""
    if out.dim() == 4 and layout == "channels_last" and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), out.stride()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """actual (any dtype) against a float64 expected, at the tolerance of ``dtype`` (default actual's), atol
    scaled by the size of the expected values (gradients are sums of many contributions)."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    tol = tolerance(dtype)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol["atol"] * scale, rtol=tol["rtol"])


def tv_multilevel(feats: Sequence[torch.Tensor], rois: torch.Tensor, output_size, scales: Sequence[float],
                  sampling_ratio: int, aligned: bool, aggregation: str) -> torch.Tensor:
    """mmdetection's GRoIE loop: torchvision roi_align on every level, then sum / concat / stack."""
    outs = [torchvision.ops.roi_align(f, rois.to(f.dtype), output_size, s, sampling_ratio, aligned)
            for f, s in zip(feats, scales)]
    if aggregation == "sum":
        return torch.stack(outs).sum(0)
    if aggregation == "concat":
        return torch.cat(outs, 1)
    return torch.stack(outs)


def mmdet_levels(rois: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """mmdetection's map_roi_levels: floor(log2(sqrt(area) / finest_scale + 1e-6)) clamped to [0, L - 1]."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def tv_mapped(feats: Sequence[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor, output_size,
              scales: Sequence[float], sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """Each RoI pooled by torchvision from the one level ``levels`` names (the per-level loop, in float64)."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], ph, pw)
    for lvl, (f, s) in enumerate(zip(feats, scales)):
        idx = (levels == lvl).nonzero().flatten()
        if idx.numel():
            out = out.index_put((idx,), torchvision.ops.roi_align(f, rois[idx].to(f.dtype), (ph, pw), s,
                                                                  sampling_ratio, aligned))
    return out


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate and compute RoI geometry in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The reference's inputs: the same values in the kernels' accumulation dtype, contiguous NCHW."""
    return [f.detach().to(acc_dtype(f.dtype)).contiguous() for f in feats]


def forward_backward(fn: Callable[[list[torch.Tensor]], torch.Tensor], feats: Sequence[torch.Tensor],
                     grad_out: torch.Tensor | None = None, seed: int = 7):
    """(output, grads of the features, grad_out) of fn at ``feats``; grad_out drawn (randn) in the output's
    dtype unless given."""
    leaves = [f.detach().requires_grad_() for f in feats]
    out = fn(leaves)
    if grad_out is None:
        g = torch.Generator(device=out.device).manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float64).to(out.dtype)
    grad_out = grad_out.to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [torch.zeros_like(f) if g is None else g for f, g in zip(leaves, grads)]
    return out.detach(), grads, grad_out


def free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def split_boxes(rois: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Tensor[K, 5] -> torchvision's list[Tensor[L_i, 4]] (one per image, RoIs regrouped by image)."""
    return [rois[rois[:, 0] == i, 1:] for i in range(n)]


def regrouped(rois: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of rois in the order split_boxes returns them."""
    return torch.cat([rois[rois[:, 0] == i] for i in range(n)])


def autotuners():
    """{name: Autotuner} of every autotuned kernel of groie_triton.kernels.roi_align, found by type."""
    from groie_triton.kernels import roi_align as K
    from triton.runtime.autotuner import Autotuner

    return {name: obj for name, obj in sorted(vars(K).items()) if isinstance(obj, Autotuner)}


def is_backward(name: str) -> bool:
    return "bwd" in name or "backward" in name


def clear_autotune_caches() -> None:
    for tuner in autotuners().values():
        tuner.cache.clear()


__all__ = ["DEVICE", "DRY_RUN", "DTYPES", "DTYPE_IDS", "LAYOUTS", "STRIDES", "SCALES", "pyramid", "rois",
           "check_layout",
           "assert_matches", "tv_multilevel", "mmdet_levels", "tv_mapped", "upcast", "acc_dtype",
           "forward_backward", "free_gib", "split_boxes", "regrouped", "autotuners", "is_backward",
           "clear_autotune_caches"]
