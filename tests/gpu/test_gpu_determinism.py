"""Deterministic backward on CUDA: with torch.use_deterministic_algorithms(True) the gradients are bit-identical
run to run and whatever order the RoIs come in, and still match torchvision (computed outside the mode: its
CUDA backward uses float atomics and refuses to run under it)."""

from __future__ import annotations

import pytest
import torch
from _gpu_helpers import (
    DEVICE,
    DTYPE_IDS,
    DTYPES,
    SCALES,
    assert_matches,
    forward_backward,
    pyramid,
    rois,
    tv_multilevel,
    upcast,
)

import groie_triton


def _grads(feats, boxes, grad_out, aggregation="sum"):
    def ours(fs):
        return groie_triton.multilevel_roi_align(fs, boxes, 7, SCALES, 2, True, aggregation)

    return forward_backward(ours, feats, grad_out)[1]


@pytest.mark.parametrize(
    "dtype,layout,aggregation",
    [(d, "nchw", "sum") for d in DTYPES] + [(torch.float32, "channels_last", "sum"),
                                            (torch.float16, "nchw", "stack")],
    ids=[f"{i}-nchw-sum" for i in DTYPE_IDS] + ["fp32-channels_last-sum", "fp16-nchw-stack"],
)
def test_backward_bit_identical(dtype, layout, aggregation, deterministic):
    feats = pyramid(dtype, layout)
    boxes = rois(k=96, max_size=60.0)  # many overlapping RoIs: many atomics land on the same pixels
    out = groie_triton.multilevel_roi_align(feats, boxes, 7, SCALES, 2, True, aggregation)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    grad_out = torch.randn(out.shape, generator=g, device=DEVICE, dtype=torch.float64).to(dtype)
    first = _grads(feats, boxes, grad_out, aggregation)
    for _ in range(3):
        again = _grads(feats, boxes, grad_out, aggregation)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "deterministic backward differs between runs"
    # The RoIs in another order (and their gradients with them): the same gradient up to rounding (the
    # contract is run-to-run identity; an order-independent scheme such as fixed-point atomics gives the same
    # bits here too, an ordered reduction need not).
    perm = torch.randperm(boxes.shape[0], generator=torch.Generator().manual_seed(0)).to(DEVICE)
    permuted_grad = grad_out[:, perm] if aggregation == "stack" else grad_out[perm]
    shuffled = _grads(feats, boxes[perm], permuted_grad, aggregation)
    for a, b in zip(first, shuffled):
        assert_matches(b, a.double(), dtype)

    torch.use_deterministic_algorithms(False)
    _, ref_grads, _ = forward_backward(
        lambda fs: tv_multilevel(fs, boxes.double(), 7, SCALES, 2, True, aggregation), upcast(feats),
        grad_out.double())
    for a, r in zip(first, ref_grads):
        assert_matches(a, r, dtype)


def test_single_level_and_mapped_bit_identical(deterministic):
    feats = pyramid(torch.float32, "nchw", c=24, image=(512, 640))
    boxes = rois(image=(512, 640), k=64, min_size=8.0, max_size=600.0)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    grad_out = torch.randn(64, 24, 7, 7, generator=g, device=DEVICE)
    for fn in (lambda fs: groie_triton.roi_align(fs[0], boxes, 7, 0.25, -1, False),
               lambda fs: groie_triton.mapped_roi_align(fs, boxes, 7, SCALES, 2, False)):
        first = forward_backward(fn, feats, grad_out)[1]
        second = forward_backward(fn, feats, grad_out)[1]
        assert all(torch.equal(a, b) for a, b in zip(first, second))
