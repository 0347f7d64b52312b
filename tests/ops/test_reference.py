"""The pure-PyTorch reference against torchvision (where torchvision is defined) and the float64 oracle."""

from __future__ import annotations

import math
import time
from collections import OrderedDict

import pytest
import torch
from torch.testing import assert_close
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import initLevelMapper

from groie_triton.reference import (
    map_levels_mmdet,
    map_levels_torchvision,
    mapped_roi_align_ref,
    multilevel_roi_align_ref,
    roi_align_ref,
)
from groie_triton.testing import TOLERANCES
from tests.oracle import roi_align_oracle

# The library's table, but the reference is held to 1e-12 in float64: it computes exactly as torchvision's
# float64 op but for the order of a few sums, where the kernels are allowed a looser 1e-10.
TOL = {**TOLERANCES, torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uniform(gen, shape, low, high) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low


def _boxes(gen, num_images: int, img_h: float, img_w: float, per_kind: int = 6) -> torch.Tensor:
    """[K, 5] float64: boxes inside, partly outside, fully outside, much larger than the image and tiny
    (one empty), x2 >= x1, y2 >= y1. The large ones mostly have adaptive grids of more than 2H + 6 samples
    per bin, of which only those near the map are visited.
    """
    def kind(x_lo, x_hi, y_lo, y_hi, w_hi, h_hi):
        x1, y1 = _uniform(gen, per_kind, x_lo, x_hi), _uniform(gen, per_kind, y_lo, y_hi)
        w, h = _uniform(gen, per_kind, 0, w_hi), _uniform(gen, per_kind, 0, h_hi)
        return torch.stack([x1, y1, x1 + w, y1 + h], 1)

    boxes = torch.cat([
        kind(0, 0.7 * img_w, 0, 0.7 * img_h, 0.3 * img_w, 0.3 * img_h),  # inside
        kind(-0.5 * img_w, img_w, -0.5 * img_h, img_h, 1.2 * img_w, 1.2 * img_h),  # partly outside
        kind(1.1 * img_w, 1.4 * img_w, 0, img_h, 0.3 * img_w, 0.3 * img_h),  # right of the image
        kind(0, img_w, -1.5 * img_h, -1.3 * img_h, 0.3 * img_w, 0.2 * img_h),  # above the image
        kind(-10 * img_w, 0, -10 * img_h, 0, 20 * img_w, 20 * img_h),  # up to 20x the image, around it
        kind(0, img_w, 0, img_h, 0.4, 0.4),  # tiny
    ])
    boxes[-1, 2:] = boxes[-1, :2]  # empty
    batch = torch.randint(0, num_images, (boxes.shape[0], 1), generator=gen).double()
    return torch.cat([batch, boxes], 1)


def _relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as ``x`` [N, C, H, W] with other strides."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # storage order (H, N, W, C)
        return x.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    if layout == "sliced":  # every other column of a wider map
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def _features(gen, shape, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------- parity with torchvision
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("output_size", [(7, 7), (3, 4)])
def test_roi_align_matches_torchvision(dtype, aligned, sampling_ratio, output_size):
    gen = _gen(0)
    x = _features(gen, (3, 4, 11, 13), dtype)
    rois = _boxes(gen, 3, 22, 26).to(dtype)
    out = roi_align_ref(x, rois, output_size, 0.5, sampling_ratio, aligned)
    expected = roi_align(x, rois, output_size, 0.5, sampling_ratio, aligned)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced"])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_any_strides_matches_torchvision(layout, aligned):
    gen = _gen(1)
    x = _features(gen, (2, 5, 9, 12))
    rois = _boxes(gen, 2, 36, 48)
    out = roi_align_ref(_relayout(x, layout), rois, (7, 7), 0.25, -1, aligned)
    assert_close(out, roi_align(x, rois, (7, 7), 0.25, -1, aligned), **TOL[torch.float64])


def test_output_layout_and_dtype_follow_input():
    gen = _gen(2)
    x = _features(gen, (2, 6, 8, 8), torch.float16)
    rois = _boxes(gen, 2, 8, 8)
    out = roi_align_ref(x, rois, (3, 3), 1.0, 2, True)
    assert out.dtype == torch.float16 and out.is_contiguous()
    cl = roi_align_ref(_relayout(x, "channels_last"), rois, (3, 3), 1.0, 2, True)
    assert cl.dtype == torch.float16 and cl.is_contiguous(memory_format=torch.channels_last)
    assert_close(cl, out, rtol=0, atol=0)


def test_rois_of_any_float_dtype_are_cast_to_the_accumulation_dtype():
    gen = _gen(3)
    x = _features(gen, (2, 3, 10, 10), torch.float32)
    rois = _boxes(gen, 2, 40, 40)
    expected = roi_align_ref(x, rois.float(), (4, 4), 0.25, 2, False)
    assert_close(roi_align_ref(x, rois, (4, 4), 0.25, 2, False), expected, rtol=0, atol=0)
    half = rois.half()
    assert_close(roi_align_ref(x, half, (4, 4), 0.25, 2, False),
                 roi_align_ref(x, half.float(), (4, 4), 0.25, 2, False), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_half_precision_matches_oracle(dtype, sampling_ratio):
    gen = _gen(4)
    x = _features(gen, (2, 3, 7, 9), dtype)
    rois = _boxes(gen, 2, 14, 18, per_kind=2)
    out = roi_align_ref(x, rois, (3, 3), 0.5, sampling_ratio, True)
    assert out.dtype == dtype
    assert_close(out.double(), roi_align_oracle(x, rois, (3, 3), 0.5, sampling_ratio, True), **TOL[dtype])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_oracle_matches_torchvision(aligned, sampling_ratio):
    # The oracle is the ground truth where torchvision cannot go; check it where torchvision can.
    gen = _gen(15)
    x = _features(gen, (2, 2, 6, 7))
    rois = _boxes(gen, 2, 12, 14, per_kind=2)
    out = roi_align_oracle(x, rois, (3, 2), 0.5, sampling_ratio, aligned)
    assert_close(out, roi_align(x, rois, (3, 2), 0.5, sampling_ratio, aligned), **TOL[torch.float64])


# ------------------------------------------------------------------------ guards, against the oracle only
def _guard_rois() -> torch.Tensor:
    nan, inf = math.nan, math.inf
    return torch.tensor([
        [0, 1.0, 1.0, 5.5, 4.5],  # ordinary box, for scale
        [0, nan, 1, 5, 5], [0, 1, nan, 5, 5], [1, 1, 1, nan, 5], [1, 1, 1, 5, nan],
        [1, inf, 1, 5, 5], [0, 1, 1, inf, 5], [0, -inf, -inf, inf, inf], [1, -inf, 1, 3, 3],
        # 1e30 boxes whose samples never cancel to the map in float32 (a symmetric one can, by rounding)
        [0, 1, 1, 1e30, 1e30], [0, -1e30, 0, 2.7e30, 4], [1, 1e30, 1e30, 1e30, 1e30],
        [0, 0, 0, 40, 30],  # adaptive grid of 15 x 14: more than the map, torchvision's all the same
        [nan, 1, 1, 5, 5], [-1, 1, 1, 5, 5], [-0.5, 1, 1, 5, 5], [2, 1, 1, 5, 5], [1e10, 1, 1, 5, 5],
        [1.7, 0.5, 1, 5, 5], [0.999, 0.5, 1, 5, 5],  # fractional index: truncated
        [0, 6, 5, 2, 1], [1, 5, 1, 3, 6], [0, 2, 5, 6, 1],  # inverted boxes
    ], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_guards_match_oracle(dtype, aligned, sampling_ratio):
    gen = _gen(5)
    x = _features(gen, (2, 2, 6, 7), dtype)
    rois = _guard_rois()
    x_before, rois_before = x.clone(), rois.clone()
    out = roi_align_ref(x, rois, (2, 3), 1.0, sampling_ratio, aligned)
    assert out.shape == (rois.shape[0], 2, 2, 3) and torch.isfinite(out).all()
    assert_close(out.double(), roi_align_oracle(x, rois, (2, 3), 1.0, sampling_ratio, aligned), **TOL[dtype])
    assert_close(x, x_before, rtol=0, atol=0)
    assert_close(rois, rois_before, rtol=0, atol=0, equal_nan=True)
    assert out[0].abs().sum() > 0 and out[13:18].abs().sum() == 0  # valid box pooled; bad indices zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
def test_box_much_taller_than_a_one_pixel_map_matches_torchvision(dtype, aligned):
    # torchvision samples this bin 4 times (1 on the map): the adaptive grid has no cap.
    x = _features(_gen(6), (1, 3, 1, 1), dtype)
    rois = torch.tensor([[0, 0, 0, 1, 4.0]], dtype=dtype)
    out = roi_align_ref(x, rois, 1, 1.0, -1, aligned)
    assert_close(out, roi_align(x, rois, 1, 1.0, -1, aligned), rtol=0, atol=0)
    assert_close(out.double(), roi_align_oracle(x, rois, 1, 1.0, -1, aligned), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0])
def test_boxes_much_larger_than_the_map_match_torchvision(dtype, aligned, sampling_ratio):
    # Grids of 50 x 100 samples per bin (and more) on a 5 x 6 map: each bin visits only the samples
    # near the map, 2H + 6 by 2W + 6 at most, and divides by the full count as torchvision does.
    gen = _gen(16)
    x = _features(gen, (2, 3, 5, 6), dtype)
    rois = torch.tensor([
        [0, 0, 0, 300, 100], [1, -150, -40, 150, 60], [0, -290, -90, 10, 10], [1, 3, -200, 4, 300],
        [0, -1000, 2, 1000, 3],
    ], dtype=dtype)
    out = roi_align_ref(x, rois, (2, 3), 1.0, sampling_ratio, aligned)
    expected = roi_align(x, rois, (2, 3), 1.0, sampling_ratio, aligned)
    assert expected.abs().amax((1, 2, 3)).min() > 0  # every box reaches the map
    assert_close(out, expected, **TOL[dtype])
    assert_close(roi_align_oracle(x, rois, (2, 3), 1.0, sampling_ratio, aligned), expected.double(),
                 **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
def test_huge_and_infinite_boxes_are_cheap_and_finite(dtype, aligned):
    inf = math.inf
    x = _features(_gen(17), (2, 2, 6, 7), dtype)
    rois = torch.tensor([
        [0, 1, 1, 1e30, 1e30], [0, -1e30, 0, 2.7e30, 4], [1, -1e30, -1e30, 1e30, 1e30],
        [0, 1, -1e30, 5, 1e30], [0, 0, 0, inf, inf], [1, -inf, -inf, inf, inf], [0, 1, -inf, 5, inf],
        [1, 5, 1, 5, inf],
    ], dtype=torch.float64)
    began = time.perf_counter()
    out = roi_align_ref(x, rois, (2, 3), 1.0, -1, aligned)
    # Visiting 1e30 samples per bin would never end; the window is at most (2H + 6) x (2W + 6).
    assert time.perf_counter() - began < 5
    assert torch.isfinite(out).all()
    assert_close(out.double(), roi_align_oracle(x, rois, (2, 3), 1.0, -1, aligned), **TOL[dtype])
    # An infinite grid divides by an infinite count.
    assert not out[4:].any()


@pytest.mark.parametrize("shape", [(2, 3, 0, 0), (2, 3, 0, 5), (2, 3, 4, 0), (0, 3, 4, 5)])
def test_empty_maps_and_batches_give_zeros(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 3, 3], [1, -1, -1, 0, 0]], dtype=torch.float64)
    out = roi_align_ref(x, rois, (2, 2), 1.0, -1, True)
    assert_close(out, roi_align_oracle(x, rois, (2, 2), 1.0, -1, True), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_no_rois_gives_empty_output_in_the_graph():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = roi_align_ref(x, torch.zeros(0, 5), (7, 7), 1.0, -1, False)
    assert out.shape == (0, 3, 7, 7) and out.requires_grad
    (grad,) = torch.autograd.grad(out, x, torch.zeros_like(out))
    assert_close(grad, torch.zeros_like(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- multi-level
def _pyramid(gen, dtype=torch.float64, layout="contiguous"):
    shapes = [(2, 3, 16, 20), (2, 3, 8, 10), (2, 3, 4, 5)]
    return [_relayout(_features(gen, s, dtype), layout) for s in shapes], [1 / 4, 1 / 8, 1 / 16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_multilevel_matches_torchvision_loop(dtype, sampling_ratio, layout):
    gen = _gen(7)
    feats, scales = _pyramid(gen, dtype, layout)
    rois = _boxes(gen, 2, 64, 80).to(dtype)
    per_level = [roi_align(f, rois, (7, 7), s, sampling_ratio, True)
                 for f, s in zip(feats, scales, strict=True)]
    args = (feats, rois, (7, 7), scales, sampling_ratio, True)
    out = {a: multilevel_roi_align_ref(*args, a) for a in ("sum", "concat", "stack")}
    assert_close(out["sum"], sum(per_level), **TOL[dtype])
    assert_close(out["concat"], torch.cat(per_level, 1), **TOL[dtype])
    assert_close(out["stack"], torch.stack(per_level), **TOL[dtype])
    # Output layout as the kernels write it: channels last along C, or contiguous.
    channels_stride = [o.stride(-3) for o in out.values()]
    assert channels_stride == ([1, 1, 1] if layout == "channels_last" else [49, 49, 49])


def test_multilevel_rejects_bad_arguments():
    feats, scales = _pyramid(_gen(8))
    rois = torch.tensor([[0, 1.0, 1, 9, 9]], dtype=torch.float64)
    with pytest.raises(ValueError, match="aggregation"):
        multilevel_roi_align_ref(feats, rois, (7, 7), scales, 2, True, "mean")
    with pytest.raises(ValueError, match="spatial scale"):
        multilevel_roi_align_ref(feats, rois, (7, 7), scales[:2], 2, True, "sum")
    with pytest.raises(ValueError, match="mapping"):
        mapped_roi_align_ref(feats, rois, (7, 7), scales, 2, True, "fpn")


# ----------------------------------------------------------------------------------------- level mapping
def _boxes_of_sizes(sizes: torch.Tensor, aspect: float = 1.5) -> torch.Tensor:
    """[K, 5] boxes (all image 0) whose sqrt(area) is ``sizes``, w / h = aspect."""
    w, h = sizes * math.sqrt(aspect), sizes / math.sqrt(aspect)
    x1 = torch.linspace(0, 50, sizes.numel(), dtype=sizes.dtype)
    return torch.stack([torch.zeros_like(x1), x1, x1 / 2, x1 + w, x1 / 2 + h], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_map_levels_torchvision_matches_level_mapper(dtype):
    # sqrt(area) from 0 to 2000: every level, and the exact boundaries of canonical_scale 224
    sizes = torch.cat([torch.tensor([0.0, 1e-3, 112, 224, 448]), torch.logspace(0, 3.3, 400)])
    rois = _boxes_of_sizes(sizes.to(dtype))
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    expected = initLevelMapper(2, 5)([rois[:, 1:]])
    levels = map_levels_torchvision(rois, scales)
    assert levels.dtype == torch.int64 and set(levels.tolist()) == {0, 1, 2, 3}
    assert_close(levels, expected, rtol=0, atol=0)
    assert_close(map_levels_torchvision(rois, scales, canonical_scale=112, canonical_level=3),
                 initLevelMapper(2, 5, canonical_scale=112, canonical_level=3)([rois[:, 1:]]), rtol=0, atol=0)


def test_map_levels_nan_and_negative_area_give_minus_one():
    rois = torch.tensor([[0, 0, 0, math.nan, 5], [0, 5, 0, 0, 5], [0, 0, 0, 5, 5], [0, 0, 0, math.inf, 5]])
    assert map_levels_torchvision(rois, [1 / 4, 1 / 8, 1 / 16, 1 / 32]).tolist() == [-1, -1, 0, 3]
    assert map_levels_mmdet(rois, 4).tolist() == [-1, -1, 0, 3]


def test_map_levels_mmdet_thresholds():
    # mmdetection: scale < 112 -> 0, [112, 224) -> 1, [224, 448) -> 2, >= 448 -> 3 (with finest_scale 56).
    sizes = torch.tensor([0.0, 50, 111.9, 112, 223.9, 224, 447.9, 448, 5000], dtype=torch.float64)
    rois = _boxes_of_sizes(sizes, aspect=1.0)
    assert map_levels_mmdet(rois, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert map_levels_mmdet(rois, 2, finest_scale=28).tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]


def _pyramid4(gen, dtype=torch.float64):
    shapes = [(2, 3, 64, 80), (2, 3, 32, 40), (2, 3, 16, 20), (2, 3, 8, 10)]
    return [_features(gen, s, dtype) for s in shapes], [1 / 4, 1 / 8, 1 / 16, 1 / 32]


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_mapped_torchvision_matches_multiscale_roi_align(sampling_ratio):
    gen = _gen(9)
    feats, scales = _pyramid4(gen)
    rois = _boxes(gen, 2, 256, 320)
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], (7, 7), sampling_ratio)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    expected = pooler(OrderedDict((str(i), f) for i, f in enumerate(feats)), boxes, [(256, 320)] * 2)
    order = torch.cat([torch.nonzero(rois[:, 0] == i).flatten() for i in range(2)])
    out = mapped_roi_align_ref(feats, rois[order], (7, 7), scales, sampling_ratio, False, "torchvision")
    assert_close(out, expected, **TOL[torch.float64])


def test_mapped_mmdet_matches_torchvision_per_level():
    gen = _gen(10)
    feats, scales = _pyramid4(gen, torch.float32)
    rois = torch.cat([_boxes(gen, 2, 256, 320), torch.tensor([[0, 0, 0, math.nan, 9.0]])]).float()
    out = mapped_roi_align_ref(feats, rois, (7, 7), scales, 2, True, "mmdet")
    levels = map_levels_mmdet(rois, 4)
    expected = torch.zeros_like(out)
    for level, (f, s) in enumerate(zip(feats, scales, strict=True)):
        mask = levels == level
        expected[mask] = roi_align(f, rois[mask], (7, 7), s, 2, True)
    assert levels[-1] == -1 and len(set(levels.tolist())) >= 3
    assert_close(out, expected, **TOL[torch.float32])


# -------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_matches_torchvision(aligned, sampling_ratio, layout):
    gen = _gen(11)
    x = _relayout(_features(gen, (2, 3, 9, 11)), layout).requires_grad_(True)
    x_tv = x.detach().clone().requires_grad_(True)
    rois = _boxes(gen, 2, 18, 22)
    out = roi_align_ref(x, rois, (3, 4), 0.5, sampling_ratio, aligned)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad_out)
    roi_align(x_tv, rois, (3, 4), 0.5, sampling_ratio, aligned).backward(grad_out)
    assert_close(x.grad, x_tv.grad, **TOL[torch.float64])


def test_multilevel_backward_matches_torchvision_loop():
    gen = _gen(12)
    feats, scales = _pyramid(gen)
    feats = [f.requires_grad_(True) for f in feats]
    feats_tv = [f.detach().clone().requires_grad_(True) for f in feats]
    rois = _boxes(gen, 2, 64, 80)
    out = multilevel_roi_align_ref(feats, rois, (7, 7), scales, 2, True, "sum")
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad_out)
    expected = sum(roi_align(f, rois, (7, 7), s, 2, True) for f, s in zip(feats_tv, scales, strict=True))
    expected.backward(grad_out)
    for f, f_tv in zip(feats, feats_tv, strict=True):
        assert_close(f.grad, f_tv.grad, **TOL[torch.float64])


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_gradcheck(sampling_ratio):
    gen = _gen(13)
    a = _features(gen, (2, 1, 4, 5)).requires_grad_(True)
    b = _features(gen, (2, 1, 2, 3)).requires_grad_(True)
    rois = torch.cat([_boxes(gen, 2, 4, 5, per_kind=1), _guard_rois()[[1, 8, 12, 20]]])
    assert torch.autograd.gradcheck(lambda t: roi_align_ref(t, rois, (2, 3), 1.0, sampling_ratio, True), (a,))
    assert torch.autograd.gradcheck(
        lambda s, t: multilevel_roi_align_ref([s, t], rois, (2, 2), [1.0, 0.5], sampling_ratio, False, "sum"),
        (a, b))
    assert torch.autograd.gradcheck(
        lambda s, t: mapped_roi_align_ref([s, t], rois, (2, 2), [1.0, 0.5], sampling_ratio, False, "mmdet",
                                          finest_scale=2),
        (a, b))


def test_backward_is_deterministic():
    gen = _gen(14)
    x = _features(gen, (1, 16, 12, 12), torch.float32).requires_grad_(True)
    xy = _uniform(gen, (200, 2), 0, 8)
    rois = torch.cat([torch.zeros(200, 1), xy, xy + 4], 1).float()  # heavily overlapping: shared pixels
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # the reference backward must not raise under it
    try:
        grads = [torch.autograd.grad(roi_align_ref(x, rois, (7, 7), 1.0, 2, True).square().sum(), x)[0]
                 for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
