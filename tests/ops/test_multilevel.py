"""Fused multi-level RoIAlign and in-kernel level mapping against per-level torchvision loops."""

import math

import pytest
import torch
import torchvision
from groie_triton.kernels import roi_align as kernels
from torchvision.ops.poolers import initLevelMapper

from groie_triton import MAX_LEVELS, MultiScaleRoIAlign, mapped_roi_align, multilevel_roi_align
from groie_triton.testing import TOLERANCES, assert_close_to, count_launches, make_pyramid, random_rois
from tests.oracle import roi_align_oracle

STRIDES = [4, 8, 16, 32]


def loop(feats, rois, output_size, scales, sampling_ratio, aligned, aggregation):
    """mmdetection's GRoIE: one torchvision roi_align per level, then sum / cat / stack."""
    outs = [torchvision.ops.roi_align(f, rois, output_size, s, sampling_ratio, aligned) for f, s in zip(feats, scales)]
    return {"sum": lambda: sum(outs), "concat": lambda: torch.cat(outs, 1), "stack": lambda: torch.stack(outs)}[
        aggregation]()


SCALES = [1 / s for s in STRIDES]


@pytest.mark.parametrize(
    "aggregation, output_size, sampling_ratio, aligned",
    [(a, 7, s, al) for a in ("sum", "concat", "stack") for s in (2, 0) for al in (True, False)]
    + [("sum", 14, 2, True), ("concat", 14, 0, False)],
)
def test_aggregations_match_per_level_loop(aggregation, output_size, sampling_ratio, aligned):
    feats, rois = make_pyramid(dtype=torch.float64), random_rois(dtype=torch.float64)
    out = multilevel_roi_align(feats, rois, output_size, SCALES, sampling_ratio, aligned, aggregation)
    expected = loop(feats, rois, output_size, SCALES, sampling_ratio, aligned, aggregation)
    assert out.shape == expected.shape
    assert_close_to(out, expected)


@pytest.mark.parametrize("aggregation", ["sum", "concat", "stack"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_layouts_match_float64_loop(dtype, channels_last, aggregation):
    feats = make_pyramid(dtype=dtype, channels_last=channels_last)
    rois = random_rois()
    out = multilevel_roi_align(feats, rois, 7, SCALES, 2, True, aggregation)
    assert out.dtype == dtype
    expected = loop([f.double() for f in feats], rois.double(), 7, SCALES, 2, True, aggregation)
    assert_close_to(out, expected.to(dtype), dtype)


@pytest.mark.parametrize("aggregation", ["sum", "concat", "stack"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_matches_per_level_loop(aggregation, channels_last):
    feats = [f.requires_grad_() for f in make_pyramid(dtype=torch.float64, channels_last=channels_last)]
    feats_tv = [f.detach().clone().requires_grad_() for f in feats]
    rois = random_rois(dtype=torch.float64)
    out = multilevel_roi_align(feats, rois, 7, SCALES, 2, True, aggregation)
    grad = torch.randn_like(out)
    out.backward(grad)
    loop(feats_tv, rois, 7, SCALES, 2, True, aggregation).backward(grad)
    for f, f_tv in zip(feats, feats_tv):
        assert_close_to(f.grad, f_tv.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_backward_accumulates_in_float32(dtype):
    feats = [f.requires_grad_() for f in make_pyramid(dtype=dtype)]
    feats64 = [f.detach().double().requires_grad_() for f in feats]
    rois = random_rois()
    multilevel_roi_align(feats, rois, 7, SCALES, 2, True).sum().backward()
    loop(feats64, rois.double(), 7, SCALES, 2, True, "sum").sum().backward()
    for f, f64 in zip(feats, feats64):
        assert f.grad.dtype == dtype
        assert_close_to(f.grad, f64.grad.to(dtype), dtype, atol=4 * TOLERANCES[dtype]["atol"])


@pytest.mark.parametrize("aggregation", ["sum", "stack"])
def test_gradcheck_float64(aggregation):
    feats = [f.requires_grad_() for f in make_pyramid(n=1, c=2, image=(24, 24), strides=[4, 8], dtype=torch.float64)]
    rois = random_rois(n=1, image=(24, 24), k=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *fs: multilevel_roi_align(fs, rois, 3, [1 / 4, 1 / 8], 2, True, aggregation), tuple(feats),
        fast_mode=True)


def test_unequal_levels_zero_size_level_one_and_six_levels():
    rois = random_rois()
    one = make_pyramid(strides=[8])
    assert_close_to(multilevel_roi_align(one, rois, 7, [1 / 8]), loop(one, rois, 7, [1 / 8], 2, True, "sum"))
    six = make_pyramid(strides=[2, 4, 8, 16, 32, 64])
    scales6 = [1 / s for s in (2, 4, 8, 16, 32, 64)]
    assert_close_to(multilevel_roi_align(six, rois, 7, scales6, 2, True, "concat"),
                    loop(six, rois, 7, scales6, 2, True, "concat"))
    # A 0x0 level contributes zeros; torchvision crashes on it, so compare with the float64 oracle.
    with_empty = make_pyramid(strides=[4, 8]) + [torch.zeros(2, 4, 0, 0)]
    out = multilevel_roi_align(with_empty, rois, 7, [1 / 4, 1 / 8, 1 / 16], 2, True, "stack")
    assert not out[2].any()
    assert_close_to(out[0], roi_align_oracle(with_empty[0].double(), rois.double(), 7, 1 / 4, 2, True))


def test_empty_rois_give_empty_outputs_and_zero_grads():
    feats = [f.requires_grad_() for f in make_pyramid()]
    for aggregation, shape in (("sum", (0, 4, 7, 7)), ("concat", (0, 16, 7, 7)), ("stack", (4, 0, 4, 7, 7))):
        out = multilevel_roi_align(feats, torch.zeros(0, 5), 7, SCALES, aggregation=aggregation)
        assert out.shape == shape
    out.sum().backward()
    assert all(not f.grad.any() for f in feats)


def test_max_levels_supported():
    strides = [2**i for i in range(MAX_LEVELS)]
    feats = make_pyramid(n=1, c=2, image=(32, 32), strides=strides)
    rois = random_rois(n=1, image=(32, 32), k=2)
    scales = [1 / s for s in strides]
    assert_close_to(multilevel_roi_align(feats, rois, 3, scales), loop(feats, rois, 3, scales, 2, True, "sum"))


def tv_levels(rois, scales, canonical_scale=224, canonical_level=4):
    mapper = initLevelMapper(round(-math.log2(scales[0])), round(-math.log2(scales[-1])), canonical_scale,
                             canonical_level)
    return mapper([rois[:, 1:]])


def spanning_rois(n=2, image=(512, 640)):
    """Boxes from 8 to 900 pixels: every level, including those clamped at k_min and k_max."""
    sides = torch.tensor([8.0, 30.0, 70.0, 111.0, 150.0, 230.0, 300.0, 460.0, 700.0, 900.0], dtype=torch.float64)
    x1 = torch.linspace(0, image[1] / 2, len(sides), dtype=torch.float64)
    boxes = torch.stack([x1, x1 / 2, x1 + sides, x1 / 2 + sides * 0.8], 1)
    index = (torch.arange(len(sides)) % n).double()[:, None]
    return torch.cat([index, boxes], 1).float()


def test_mapped_roi_align_matches_torchvision_level_mapper():
    image = (512, 640)
    feats = make_pyramid(c=3, image=image, strides=[4, 8, 16, 32], seed=1)
    rois = spanning_rois(image=image)
    levels = tv_levels(rois, SCALES)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    out = mapped_roi_align(feats, rois, 7, SCALES, 2, aligned=False)
    for k in range(rois.shape[0]):
        lvl = int(levels[k])
        expected = torchvision.ops.roi_align(feats[lvl], rois[k:k + 1], 7, SCALES[lvl], 2, False)
        assert_close_to(out[k:k + 1], expected)


def test_mmdet_mapping():
    feats = make_pyramid(c=3, image=(512, 640), seed=2)
    rois = spanning_rois()
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(min=0, max=3).long()
    out = mapped_roi_align(feats, rois, 7, SCALES, 0, aligned=True, mapping="mmdet")
    for k in range(rois.shape[0]):
        lvl = int(levels[k])
        expected = torchvision.ops.roi_align(feats[lvl], rois[k:k + 1], 7, SCALES[lvl], 0, True)
        assert_close_to(out[k:k + 1], expected)


def test_multiscale_roialign_matches_torchvision_with_images_of_different_sizes():
    image_shapes = [(512, 640), (400, 600)]
    names = ["p2", "p3", "p4", "p5"]
    pyramid = make_pyramid(c=3, image=(512, 640), seed=3)
    x = {name: f for name, f in zip(names, pyramid)}
    x["pool"] = torch.randn(2, 3, 8, 10)  # not in featmap_names: ignored
    rois = spanning_rois()
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    ours = MultiScaleRoIAlign(names, 7, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    assert isinstance(ours, torchvision.ops.MultiScaleRoIAlign)
    assert_close_to(ours(x, boxes, image_shapes), theirs(x, boxes, image_shapes))
    assert ours.scales == theirs.scales


def test_multiscale_roialign_single_level_and_backward():
    x = {"p3": torch.randn(2, 3, 16, 20, dtype=torch.float64, requires_grad=True)}
    x_tv = {"p3": x["p3"].detach().clone().requires_grad_()}
    rois = random_rois(image=(128, 160), dtype=torch.float64)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    ours = MultiScaleRoIAlign(["p3"], 5, 2)(x, boxes, [(128, 160)] * 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(["p3"], 5, 2)(x_tv, boxes, [(128, 160)] * 2)
    assert_close_to(ours, theirs)
    ours.sum().backward()
    theirs.sum().backward()
    assert_close_to(x["p3"].grad, x_tv["p3"].grad)


def test_one_launch_each_way_whatever_the_levels(monkeypatch):
    launches = count_launches(monkeypatch, kernels, ["_roi_align_fwd_kernel", "_roi_align_bwd_kernel"])
    feats = [f.requires_grad_() for f in make_pyramid()]
    multilevel_roi_align(feats, random_rois(), 7, SCALES).sum().backward()
    assert launches == ["_roi_align_fwd_kernel", "_roi_align_bwd_kernel"]


def test_torch_compile_fullgraph_multilevel():
    feats, rois = make_pyramid(), random_rois()

    def f(feats, rois):
        return multilevel_roi_align(feats, rois, 7, SCALES, 2, True, "sum").relu()

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(feats, rois), f(feats, rois),
                               atol=0, rtol=0)


def test_torch_compile_dynamic_mapped_with_scales_as_arguments():
    # dynamic=True traces the scales as symbolic floats; the torchvision mapping derives k_min from the first
    # one on the host. Each new scale must give eager's result (a guard, not a stale k_min).
    rois = torch.tensor([[0.0, 0, 0, 20, 20], [0, 1, 1, 60, 60], [0, 2, 3, 9, 7]])

    def f(feats, rois, s0, s1):
        return mapped_roi_align(feats, rois, 2, [s0, s1], 2, False, canonical_scale=32, canonical_level=2)

    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    for scales in ((0.25, 0.125), (0.5, 0.25)):
        feats = [torch.rand(1, 4, 16, 16), torch.rand(1, 4, 8, 8)]
        torch.testing.assert_close(compiled(feats, rois, *scales), f(feats, rois, *scales), atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(spatial_scales=SCALES[:3]), ValueError, "spatial_scales has 3 entries but there are 4 levels"),
        (dict(aggregation="max"), ValueError, "aggregation must be one of"),
        (dict(features="batch"), ValueError, r"features\[0\] must be a torch.Tensor|4-D"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(features=make_pyramid(), rois=random_rois(), output_size=7, spatial_scales=SCALES)
    with pytest.raises((error, TypeError), match=match):
        multilevel_roi_align(**{**args, **kwargs})


def test_mismatched_levels_raise():
    feats = make_pyramid()
    rois = random_rois()
    with pytest.raises(ValueError, match=r"features\[1\] has batch size 1 but level 0 has 2"):
        multilevel_roi_align([feats[0], feats[1][:1]], rois, 7, SCALES[:2])
    with pytest.raises(ValueError, match=r"features\[1\] has 2 channels but level 0 has 4"):
        multilevel_roi_align([feats[0], feats[1][:, :2]], rois, 7, SCALES[:2])
    with pytest.raises(TypeError, match=r"features\[1\] has dtype torch.float64"):
        multilevel_roi_align([feats[0], feats[1].double()], rois, 7, SCALES[:2])
    with pytest.raises(ValueError, match=r"features\[1\] is on meta"):
        multilevel_roi_align([feats[0], feats[1].to("meta")], rois, 7, SCALES[:2])
    with pytest.raises(ValueError, match="at most 8"):
        multilevel_roi_align([feats[0]] * 9, rois, 7, [0.25] * 9)
    with pytest.raises(ValueError, match="at least one level"):
        multilevel_roi_align([], rois, 7, [])
    with pytest.raises(KeyError, match=r"featmap_names \['p6'\]"):
        MultiScaleRoIAlign(["p2", "p6"], 7, 2)({"p2": feats[0]}, [rois[:, 1:]], [(64, 80)])
    with pytest.raises(ValueError, match="mapping must be one of"):
        mapped_roi_align(feats, rois, 7, SCALES, mapping="detectron")
