"""The ops inside torch.compile(fullgraph=True) with inductor, and inside a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch
from _gpu_helpers import DRY_RUN, SCALES, assert_matches, forward_backward, pyramid, rois

import groie_triton


def _step(feats, boxes, aggregation):
    if aggregation == "mapped":
        out = groie_triton.mapped_roi_align(feats, boxes, 7, SCALES, 2, False)
    else:
        out = groie_triton.multilevel_roi_align(feats, boxes, 7, SCALES, 2, True, aggregation)
    return torch.relu(out) * 2.0 + 1.0  # neighbours for inductor to fuse around the custom op


@pytest.mark.parametrize("aggregation", ["sum", "stack", "mapped"])
def test_torch_compile_fullgraph_inductor(aggregation):
    torch._dynamo.reset()
    feats = pyramid(torch.float32, "nchw", c=32)
    boxes = rois(k=24)
    compiled = torch.compile(lambda fs, b: _step(fs, b, aggregation), fullgraph=True, backend="inductor")
    out, grads, g = forward_backward(lambda fs: compiled(fs, boxes), feats)
    ref, ref_grads, _ = forward_backward(lambda fs: _step(fs, boxes, aggregation), feats, g)
    assert_matches(out, ref.double(), torch.float32)  # same kernels, same inputs
    for a, r in zip(grads, ref_grads):
        assert_matches(a, r.double(), torch.float32)
    # A new number of RoIs: dynamic or recompiled, still the eager result.
    other = rois(k=40, seed=9)
    assert_matches(compiled(feats, other), _step(feats, other, aggregation).double(), torch.float32)


def test_torch_compile_module_channels_last_fp16():
    torch._dynamo.reset()
    feats = pyramid(torch.float16, "channels_last", c=32, image=(512, 640))
    boxes = rois(image=(512, 640), k=32, min_size=8.0, max_size=600.0)
    names = ["0", "1", "2", "3"]
    pooler = groie_triton.MultiScaleRoIAlign(names, 7, 2)
    blist = [boxes[boxes[:, 0] == i, 1:] for i in range(2)]
    eager = pooler(dict(zip(names, feats)), blist, [(512, 640)] * 2)
    compiled = torch.compile(pooler, fullgraph=True, backend="inductor")
    assert_matches(compiled(dict(zip(names, feats)), blist, [(512, 640)] * 2), eager.double(), torch.float16)


@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("aggregation", ["sum", "concat", "mapped"])
def test_cuda_graph_capture_and_replay(aggregation, deterministic_mode):
    """Forward and backward captured once, replayed on new feature, RoI and gradient values (same shapes):
    no host synchronisation on the op path, and the replay gives the eager results for the new values."""
    if DRY_RUN:
        pytest.skip("CUDA only")
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        feats = [f.requires_grad_() for f in pyramid(torch.float32, "nchw", c=32)]
        boxes = rois(k=24).clone()
        grad_out = torch.randn_like(_step(feats, boxes, aggregation))

        def step():
            out = _step(feats, boxes, aggregation)
            return (out, *torch.autograd.grad(out, feats, grad_out))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compile, autotune and allocate outside the capture
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()

        new_feats = [f.detach() for f in pyramid(torch.float32, "nchw", c=32, seed=11)]
        new_boxes = rois(k=24, seed=12)
        new_grad = torch.randn_like(grad_out)
        with torch.no_grad():
            for f, nf in zip(feats, new_feats):
                f.copy_(nf)
            boxes.copy_(new_boxes)
            grad_out.copy_(new_grad)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for s, e in zip(static, eager):
            if deterministic_mode:
                assert torch.equal(s, e)
            else:
                assert_matches(s, e.double(), torch.float32)
        # Replaying again gives the same again (the gradient buffers are re-zeroed inside the graph).
        first = [s.clone() for s in static]
        graph.replay()
        torch.cuda.synchronize()
        for s, f in zip(static, first):
            assert_matches(s, f.double(), torch.float32)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
