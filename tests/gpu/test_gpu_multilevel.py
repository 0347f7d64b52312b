"""Multi-level modes, compiled: per-level aggregation (sum / concat / stack) and in-kernel level mapping
(torchvision's MultiScaleRoIAlign, mmdetection's mapping), forward and backward, every dtype and layout."""

from __future__ import annotations

import pytest
import torch
import torchvision
from _gpu_helpers import (
    DTYPE_IDS,
    DTYPES,
    LAYOUTS,
    SCALES,
    assert_matches,
    check_layout,
    forward_backward,
    mmdet_levels,
    pyramid,
    regrouped,
    rois,
    split_boxes,
    tv_mapped,
    tv_multilevel,
    upcast,
)

import groie_triton


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("aggregation", ["sum", "concat", "stack"])
def test_multilevel_matches_torchvision_loop(aggregation, dtype, layout):
    feats = pyramid(dtype, layout)
    boxes = rois(k=24)

    def ours(fs):
        return groie_triton.multilevel_roi_align(fs, boxes, 7, SCALES, 2, True, aggregation)

    def loop(fs):
        return tv_multilevel(fs, boxes.double(), 7, SCALES, 2, True, aggregation)

    out, grads, g = forward_backward(ours, feats)
    ref, ref_grads, _ = forward_backward(loop, upcast(feats), g.double())
    assert out.dtype == dtype
    check_layout(out, layout)
    assert_matches(out, ref, dtype)
    for lvl, (gr, rg, f) in enumerate(zip(grads, ref_grads, feats)):
        assert gr.dtype == dtype and gr.shape == f.shape, lvl
        assert_matches(gr, rg, dtype)


@pytest.mark.parametrize("aggregation", ["sum", "concat", "stack"])
def test_multilevel_output_size_rectangular_adaptive(aggregation):
    """Non-square output, adaptive sampling, unaligned: the other constexpr branches, fp32."""
    feats = pyramid(torch.float32, "nchw", c=24)
    boxes = rois(k=16)
    out = groie_triton.multilevel_roi_align(feats, boxes, (5, 3), SCALES, -1, False, aggregation)
    ref = tv_multilevel(upcast(feats), boxes.double(), (5, 3), SCALES, -1, False, aggregation)
    assert_matches(out, ref, torch.float32)


# A larger image and boxes from 8 to 600 px so that both mappings send RoIs to every level.
_IMAGE = (512, 640)


def _mapped_case(dtype, layout, k=64):
    feats = pyramid(dtype, layout, c=24, image=_IMAGE)
    boxes = rois(image=_IMAGE, k=k, min_size=8.0, max_size=600.0)
    return feats, boxes


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_multiscale_roi_align_matches_torchvision(dtype, layout):
    """groie_triton.MultiScaleRoIAlign (level chosen in the kernel) vs torchvision.ops.MultiScaleRoIAlign."""
    feats, boxes = _mapped_case(dtype, layout)
    names = ["0", "1", "2", "3"]
    image_shapes = [_IMAGE, _IMAGE]
    blist = split_boxes(boxes, 2)
    ours_m = groie_triton.MultiScaleRoIAlign(names, 7, 2)
    theirs_m = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    out, grads, g = forward_backward(lambda fs: ours_m(dict(zip(names, fs)), blist, image_shapes), feats)
    ref, ref_grads, _ = forward_backward(
        lambda fs: theirs_m(dict(zip(names, fs)), [b.to(fs[0].dtype) for b in blist], image_shapes), upcast(feats),
        g.double())
    levels = torchvision.ops.poolers.LevelMapper(2, 5)([regrouped(boxes, 2)[:, 1:]])
    assert levels.unique().numel() >= 3, "the case should reach several levels"
    check_layout(out, layout)
    assert_matches(out, ref, dtype)
    for gr, rg in zip(grads, ref_grads):
        assert_matches(gr, rg, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
def test_mapped_mmdet_matches_loop(dtype, layout):
    feats, boxes = _mapped_case(dtype, layout)
    levels = mmdet_levels(boxes.double(), len(feats))
    assert levels.unique().numel() >= 3, "the case should reach several levels"

    def ours(fs):
        return groie_triton.mapped_roi_align(fs, boxes, 7, SCALES, 2, True, mapping="mmdet")

    out, grads, g = forward_backward(ours, feats)
    ref, ref_grads, _ = forward_backward(lambda fs: tv_mapped(fs, boxes.double(), levels, 7, SCALES, 2, True),
                                         upcast(feats), g.double())
    check_layout(out, layout)
    assert_matches(out, ref, dtype)
    for gr, rg in zip(grads, ref_grads):
        assert_matches(gr, rg, dtype)


def test_mapped_torchvision_function_matches_module():
    """mapped_roi_align(mapping='torchvision') is what the module runs: same numbers, fp32."""
    feats, boxes = _mapped_case(torch.float32, "nchw")
    levels = torchvision.ops.poolers.LevelMapper(2, 5)([boxes[:, 1:]])
    out = groie_triton.mapped_roi_align(feats, boxes, 7, SCALES, 2, False, mapping="torchvision")
    ref = tv_mapped(upcast(feats), boxes.double(), levels, 7, SCALES, 2, False)
    assert_matches(out, ref, torch.float32)
