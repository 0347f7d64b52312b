"""GRoIE end to end on CUDA: GenericRoIExtractor with the paper's pre/post modules against mmdetection's
per-level loop (torchvision roi_align per level, the shared pre-module on each, sum, post-module) and against
the same module on CPU (the pure-PyTorch reference backend); then a detector train step."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from _gpu_helpers import DEVICE, DRY_RUN, STRIDES, assert_matches, pyramid, rois

from groie_triton import GenericRoIExtractor
from groie_triton.extractor import groie_paper_cfg

C = 48  # divisible by the attention's 6 heads and not a power of two


def _extractor(kind):
    torch.manual_seed(0)
    return GenericRoIExtractor(**groie_paper_cfg(kind, channels=C)).to(DEVICE).eval()


def _loop(ext, feats, boxes):
    """mmdetection's GenericRoIExtractor.forward: one roi_align per level, pre on each, sum, post."""
    layer = ext.roi_layers[0]
    size = ext.output_size
    total = 0
    for f, s in zip(feats, STRIDES):
        pooled = torchvision.ops.roi_align(f, boxes, size, 1.0 / s, layer.sampling_ratio, layer.aligned)
        total = total + ext.pre_module(pooled)
    return ext.post_module(total)


@pytest.mark.parametrize("kind,layout", [("bbox", "nchw"), ("bbox", "channels_last"), ("mask", "nchw")])
def test_groie_extractor_matches_loop_and_cpu(kind, layout, no_tf32):
    ext = _extractor(kind)
    assert ext.with_pre and ext.with_post
    feats = [f.requires_grad_() for f in pyramid(torch.float32, layout, c=C, image=(128, 160))]
    boxes = rois(image=(128, 160), k=32, min_size=8.0, max_size=120.0)
    out = ext(feats, boxes)
    g = torch.randn_like(out)
    params = [p for p in ext.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [*feats, *params], g)

    loop_feats = [f.detach().contiguous().requires_grad_() for f in feats]
    ref = _loop(ext, loop_feats, boxes)
    ref_grads = torch.autograd.grad(ref, [*loop_feats, *params], g)
    assert out.shape == (32, C, *ext.output_size)
    assert_matches(out, ref.double(), torch.float32)
    for a, r in zip(grads, ref_grads):
        assert_matches(a, r.double(), torch.float32)

    # The same module on CPU runs the pure-PyTorch reference implementation (TRITON_INTERPRET is off here).
    cpu = copy.deepcopy(ext).cpu()
    cpu_out = cpu([f.detach().cpu() for f in feats], boxes.cpu())
    assert_matches(out.cpu(), cpu_out.double(), torch.float32)


def _batch(size=256):
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(2):
        images.append(torch.rand(3, size, size, generator=g).to(DEVICE))
        boxes = torch.tensor([[20.0, 30.0, 120.0, 140.0], [150.0, 40.0, 230.0, 200.0], [60.0 + i, 150.0, 110.0, 240.0]])
        masks = torch.zeros(3, size, size, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
            m[y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes.to(DEVICE), "labels": torch.tensor([1, 2, 3]).to(DEVICE),
                        "masks": masks.to(DEVICE)})
    return images, targets


@pytest.mark.parametrize("extractor", ["groie", "baseline"])
def test_detector_train_step_on_cuda(extractor):
    """Mask R-CNN (resnet18-FPN) with the GRoIE or the in-kernel-mapped baseline poolers: two SGD steps on
    CUDA give finite losses and move the RoI extractor's parameters; inference then runs."""
    if DRY_RUN:
        pytest.skip("CUDA only (a Mask R-CNN step under the interpreter takes too long)")
    from groie_triton.detection import build_model, train_step

    torch.manual_seed(0)
    model = build_model(model="mask_rcnn", extractor=extractor, backbone="resnet18", image_size=256).to(DEVICE)
    images, targets = _batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    pool = model.roi_heads.box_roi_pool
    before = {n: p.detach().clone() for n, p in pool.named_parameters()}
    losses = [train_step(model, optimizer, images, targets) for _ in range(2)]
    for step in losses:
        assert all(torch.isfinite(torch.tensor(v)) for v in step.values()), step
        assert {"loss_classifier", "loss_box_reg", "loss_mask"} <= set(step), step
    if extractor == "groie":
        assert before, "the GRoIE pooler should hold the pre/post modules' parameters"
        moved = [n for n, p in pool.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert moved, "no GRoIE parameter was updated: no gradient reached the pooler"
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and all("masks" in d for d in detections)
