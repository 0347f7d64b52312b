"""Single-level roi_align / RoIAlign, compiled, against torchvision's CUDA op (float64) and the float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from _gpu_helpers import (
    DEVICE,
    DRY_RUN,
    DTYPE_IDS,
    DTYPES,
    LAYOUTS,
    assert_matches,
    check_layout,
    forward_backward,
    pyramid,
    rois,
    upcast,
)

import groie_triton
from groie_triton.testing import edge_rois
from tests.oracle import roi_align_oracle

# (spatial_scale, output_size, sampling_ratio, aligned): torchvision's defaults (adaptive, not aligned) first.
SETTINGS = [(0.25, 7, -1, False), (0.25, (7, 5), 2, True)]
SETTING_IDS = ["adaptive-unaligned", "sr2-aligned-7x5"]


def _feature(dtype, layout, c=40, seed=0):
    return pyramid(dtype, layout, c=c, image=(64, 80), strides=(4,), seed=seed)[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_roi_align_matches_torchvision(dtype, layout, setting):
    scale, size, sr, aligned = setting
    x = _feature(dtype, layout)
    boxes = rois(k=24)
    assert groie_triton.backend_for(x) == ("triton-interpreter" if DRY_RUN else "triton")
    out, grads, g = forward_backward(lambda fs: groie_triton.roi_align(fs[0], boxes, size, scale, sr, aligned), [x])
    ref, ref_grads, _ = forward_backward(
        lambda fs: torchvision.ops.roi_align(fs[0], boxes.to(fs[0].dtype), size, scale, sr, aligned), upcast([x]),
        g.double())
    assert out.dtype == dtype
    check_layout(out, layout)
    assert_matches(out, ref, dtype)
    assert grads[0].dtype == dtype and grads[0].shape == x.shape
    assert_matches(grads[0], ref_grads[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_roi_align_same_dtype_as_torchvision(dtype):
    """Drop-in parity in the input's own dtype (torchvision accumulates fp32/fp64 in that dtype too)."""
    x = _feature(dtype, "nchw")
    boxes = [b[:, 1:].to(dtype) for b in rois(k=24).split(12)]  # the list[Tensor[L, 4]] form
    ours = groie_triton.RoIAlign(7, 0.25, 2, aligned=True)(x, boxes)
    theirs = torchvision.ops.RoIAlign(7, 0.25, 2, aligned=True)(x, boxes)
    assert_matches(ours, theirs.double(), dtype)


# Boxes torchvision's CUDA op cannot be asked about: NaN / Inf corners, batch indices out of range or NaN.
_BAD = [[0, float("nan"), 1.0, 5.0, 6.0], [1, 2.0, 3.0, float("inf"), 9.0], [0, -float("inf"), 0.0, 4.0, 4.0],
        [-1, 1.0, 1.0, 8.0, 8.0], [2, 1.0, 1.0, 8.0, 8.0], [float("nan"), 1.0, 1.0, 8.0, 8.0],
        [1, 3.0, 2.0, 1.0, 1.0]]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("setting", [(0.5, (3, 4), -1, True), (0.5, (3, 4), 2, False)], ids=["adaptive", "sr2"])
def test_roi_align_matches_oracle(dtype, layout, setting):
    """Edge boxes (partly/fully outside, tiny, zero width, whole map) and bad ones, vs the float64 oracle."""
    scale, size, sr, aligned = setting
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 11, 13, generator=g, dtype=torch.float64).to(dtype)
    # float32 boxes for both (the oracle sees exactly the coordinates the kernel reads).
    boxes = torch.cat([edge_rois(n=2, h=11, w=13, scale=scale, dtype=torch.float64),
                       torch.tensor(_BAD, dtype=torch.float64)]).float()
    expected = roi_align_oracle(x, boxes.double(), size, scale, sr, aligned)
    xc = x.to(DEVICE)
    if layout == "channels_last":
        xc = xc.contiguous(memory_format=torch.channels_last)
    out = groie_triton.roi_align(xc, boxes.to(DEVICE), size, scale, sr, aligned)
    assert_matches(out.cpu(), expected, dtype)


def test_roi_align_empty_and_single_channel():
    x = _feature(torch.float32, "nchw", c=1)
    assert groie_triton.roi_align(x, torch.zeros(0, 5, device=DEVICE), 7, 0.25, 2).shape == (0, 1, 7, 7)
    boxes = rois(k=5)
    ref = torchvision.ops.roi_align(x.double(), boxes.double(), 7, 0.25, 2, True)
    assert_matches(groie_triton.roi_align(x, boxes, 7, 0.25, 2, True), ref, torch.float32)


def test_roi_align_half_boxes_and_strided_input():
    """fp16 boxes (geometry computed in float32) and a non-contiguous, non-channels_last input."""
    x = _feature(torch.float32, "nchw", c=24)
    view = x.transpose(2, 3)  # neither NCHW- nor channels_last-contiguous
    boxes = rois(k=16, image=(80, 64))
    ours = groie_triton.roi_align(view, boxes.half(), 5, 0.25, 2, True)
    ref = torchvision.ops.roi_align(view.double(), boxes.half().double(), 5, 0.25, 2, True)
    assert_matches(ours, ref, torch.float32)
    assert math.isfinite(ours.sum().item())
