"""Sizes that break 32-bit indexing or grid limits: a level of more than 2**31 elements, and K > 65535 RoIs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from _gpu_helpers import (
    DEVICE,
    DRY_RUN,
    SCALES,
    assert_matches,
    free_gib,
    pyramid,
    rois,
    tv_mapped,
    tv_multilevel,
    upcast,
)

import groie_triton

pytestmark = pytest.mark.skipif(DRY_RUN, reason="CUDA only (sizes)")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_level_of_more_than_2_31_elements(layout):
    """An fp16 map of 64 x 5800 x 5800 (2**31 + 5.9M elements, 4.3 GB) with RoIs at its far end, forward and
    backward. torchvision indexes such a map with 32-bit ints, so the reference is torchvision on the crop
    that holds the RoIs (boxes shifted by the crop's origin; every sample stays inside the crop)."""
    if free_gib() < 20:
        pytest.skip(f"needs 20 GiB of free GPU memory, {free_gib():.1f} GiB free")
    c, h, w = 64, 5800, 5800
    assert c * h * w > 2**31
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(1, c, h, w, generator=g, device=DEVICE, dtype=torch.float16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y0, x0 = h - 200, w - 200
    # Widths and heights are multiples of 3.5 and corners multiples of 0.25, so with 7x7 bins and 2x2 samples
    # every sample coordinate is exact in float32: the kernel's float32 geometry and the float64 reference
    # (shifted to the crop) see the same points, and only the fp16 rounding of the results differs.
    corners = torch.tensor([[0, 5620.25, 5610.75, 5795.25, 5792.75], [0, 5700.5, 5650.25, 5798.5, 5797.25],
                            [0, 5605.75, 5758.0, 5647.75, 5800.0], [0, 5751.0, 5605.0, 5800.0, 5689.0]],
                           device=DEVICE)
    x.requires_grad_()
    out = groie_triton.roi_align(x, corners, 7, 1.0, 2, True)
    grad_out = torch.randn(out.shape, generator=g, device=DEVICE, dtype=torch.float16)
    (grad,) = torch.autograd.grad(out, x, grad_out)

    crop = x.detach()[:, :, y0:, x0:].double().requires_grad_()
    shifted = corners.double() - torch.tensor([0.0, x0, y0, x0, y0], device=DEVICE, dtype=torch.float64)
    ref = torchvision.ops.roi_align(crop, shifted, 7, 1.0, 2, True)
    (ref_grad,) = torch.autograd.grad(ref, crop, grad_out.double())
    assert_matches(out, ref, torch.float16)
    assert_matches(grad[:, :, y0:, x0:], ref_grad, torch.float16)
    # Nothing outside the crop was touched.
    assert grad[:, :, :y0].abs().max().item() == 0
    assert grad[:, :, y0:, :x0].abs().max().item() == 0


@pytest.mark.parametrize("aggregation", ["sum", "stack", "mapped"])
def test_more_than_65535_rois(aggregation):
    """K = 70000: more RoIs than a CUDA grid's y or z dimension holds; forward and backward vs torchvision."""
    feats = pyramid(torch.float32, "nchw", c=16, image=(256, 320))
    boxes = rois(image=(256, 320), k=70_000, min_size=4.0, max_size=300.0)
    leaves = [f.requires_grad_() for f in feats]
    if aggregation == "mapped":
        out = groie_triton.mapped_roi_align(leaves, boxes, 7, SCALES, 2, False)
        levels = torchvision.ops.poolers.LevelMapper(2, 5)([boxes[:, 1:]])
        ref_leaves = [f.requires_grad_() for f in upcast(feats)]
        ref = tv_mapped(ref_leaves, boxes.double(), levels, 7, SCALES, 2, False)
    else:
        out = groie_triton.multilevel_roi_align(leaves, boxes, 7, SCALES, 2, True, aggregation)
        ref_leaves = [f.requires_grad_() for f in upcast(feats)]
        ref = tv_multilevel(ref_leaves, boxes.double(), 7, SCALES, 2, True, aggregation)
    assert out.shape == ref.shape
    assert_matches(out, ref, torch.float32)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    for a, r in zip(grads, ref_grads):
        assert_matches(a, r, torch.float32)
    # The last RoIs were written (not left at whatever memory held): the tail matches on its own too.
    assert_matches(out[-100:] if aggregation != "stack" else out[:, -100:],
                   ref[-100:] if aggregation != "stack" else ref[:, -100:], torch.float32)
