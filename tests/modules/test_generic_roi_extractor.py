"""GRoIE layers: GenericRoIExtractor and GRoIEPooler against mmdetection's forward, and what mmdetection's
own tests (tests/test_models/test_roi_heads/test_roi_extractors/test_generic_roi_extractor.py) expect.

The extractor is checked against mmdetection's forward written out as a loop (torchvision's roi_align per
level, the pre-module per level, sum or concat, the post-module), after loading the loop's state_dict with
strict=True: outputs, input gradients and parameter gradients. Kernels run under the Triton interpreter
(tests/conftest.py), so shapes stay tiny; the detection models run on the reference backend.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from groie_triton.kernels import level_sum
from groie_triton.kernels import roi_align as roi_kernels
from torch import nn

import groie_triton
from groie_triton import extractor as extractor_module
from groie_triton.attention import GeneralizedAttention
from groie_triton.extractor import GenericRoIExtractor, GRoIEPooler, groie_paper_cfg
from groie_triton.testing import assert_close_to, count_launches, make_pyramid, random_rois

try:
    from mmcv.cnn.bricks import GeneralizedAttention as MmcvGeneralizedAttention
except ImportError:  # pragma: no cover - depends on the environment
    MmcvGeneralizedAttention = None

STRIDES = [4, 8, 16, 32]
IMAGE = (64, 80)
CHANNELS = 12  # 6 heads of 2 channels in the paper's attention; 12 is a multiple of 4 for its embedding


# The float64 test pyramid (2 images of IMAGE, CHANNELS channels) and k RoIs of 4 to 100 pixels over both
# images, some crossing the border.
_pyramid = functools.partial(make_pyramid, n=2, c=CHANNELS, image=IMAGE, strides=STRIDES, dtype=torch.float64)
_rois = functools.partial(random_rois, n=2, image=IMAGE, k=4, dtype=torch.float64)


# --------------------------------------------------------------------------- GenericRoIExtractor vs loop
class MmdetConvModule(nn.Module):
    """The shape of mmcv's ConvModule (conv + optional norm + ReLU), written independently of ours."""

    def __init__(self, channels, out_channels, kernel_size, norm=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, kernel_size, padding=kernel_size // 2,
                              bias=norm is None)
        self.norm_name = norm
        if norm == "gn":
            self.gn = nn.GroupNorm(3, out_channels)
        elif norm == "bn":
            self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = self.conv(x)
        if self.norm_name:
            x = getattr(self, self.norm_name)(x)
        return torch.relu(x)


class LoopGRoIE(nn.Module):
    """mmdetection's GenericRoIExtractor.forward, level by level."""

    def __init__(self, output_size, sampling_ratio, aggregation, pre=None, post=None):
        super().__init__()
        self.output_size, self.sampling_ratio, self.aggregation = output_size, sampling_ratio, aggregation
        if post is not None:
            self.post_module = post
        if pre is not None:
            self.pre_module = pre

    def forward(self, feats, rois, roi_scale_factor=None):
        if roi_scale_factor is not None:
            cx, cy = (rois[:, 1] + rois[:, 3]) / 2, (rois[:, 2] + rois[:, 4]) / 2
            w, h = (rois[:, 3] - rois[:, 1]) * roi_scale_factor, (rois[:, 4] - rois[:, 2]) * roi_scale_factor
            rois = torch.stack([rois[:, 0], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        outs = []
        for feat, stride in zip(feats, STRIDES[: len(feats)], strict=True):  # roi_layers[:num_levels]
            t = torchvision.ops.roi_align(feat, rois, self.output_size, 1 / stride, self.sampling_ratio, True)
            if hasattr(self, "pre_module"):
                t = self.pre_module(t)
            outs.append(t)
        out = torch.cat(outs, 1) if self.aggregation == "concat" else sum(outs[1:], outs[0])
        if hasattr(self, "post_module"):
            out = self.post_module(out)
        return out


def _attention(channels):
    cls = MmcvGeneralizedAttention or GeneralizedAttention
    return cls(channels, spatial_range=-1, num_heads=6, attention_type="0100", kv_stride=2)


def _case(variant, output_size):
    """(GenericRoIExtractor cfg, loop module) for a variant; the loop's parameters are random."""
    cfg = groie_paper_cfg("bbox", CHANNELS)
    cfg["roi_layer"]["output_size"] = output_size
    pre = MmdetConvModule(CHANNELS, CHANNELS, 5)
    post = _attention(CHANNELS)
    if variant == "none":
        del cfg["pre_cfg"], cfg["post_cfg"]
        pre = post = None
    elif variant == "pre":
        del cfg["post_cfg"]
        post = None
    elif variant == "concat":
        cfg.update(aggregation="concat", out_channels=4 * CHANNELS)
        cfg["post_cfg"]["in_channels"] = 4 * CHANNELS
        post = _attention(4 * CHANNELS)
    elif variant in ("gn", "bn"):
        del cfg["post_cfg"]
        cfg["pre_cfg"]["norm_cfg"] = dict(type="GN", num_groups=3) if variant == "gn" else dict(type="BN")
        pre, post = MmdetConvModule(CHANNELS, CHANNELS, 5, norm=variant), None
    loop = LoopGRoIE(output_size, 2, cfg["aggregation"], pre, post).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in loop.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return cfg, loop


@pytest.mark.parametrize(
    "variant, output_size, scale_factor",
    [("none", 7, None), ("pre", 7, 1.5), ("prepost", 7, None), ("concat", 7, None),
     ("none", 14, 1.5), ("pre", 14, None), ("prepost", 14, 1.5), ("concat", 14, None),
     ("gn", 7, None), ("bn", 7, None)],
)
def test_extractor_matches_mmdetection_loop(variant, output_size, scale_factor):
    cfg, loop = _case(variant, output_size)
    ours = GenericRoIExtractor(**cfg).double()
    ours.load_state_dict(loop.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(loop.state_dict())
    feats, feats_loop = _pyramid(), _pyramid()
    for f in feats + feats_loop:
        f.requires_grad_(True)
    rois = _rois() if output_size == 7 else _rois(k=2)  # the interpreter's cost grows with bins

    out, expected = ours(feats, rois, scale_factor), loop(feats_loop, rois, scale_factor)
    assert out.shape == (len(rois), cfg["out_channels"], output_size, output_size)
    assert_close_to(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for f, f_loop in zip(feats, feats_loop, strict=True):
        assert_close_to(f.grad, f_loop.grad)
    loop_params = dict(loop.named_parameters())
    for name, p in ours.named_parameters():
        assert_close_to(p.grad, loop_params[name].grad, msg=name)
    # Batch-statistics norms run level by level, so their running statistics are the loop's too.
    for name, buf in ours.named_buffers():
        torch.testing.assert_close(buf, dict(loop.named_buffers())[name], msg=name)


def test_shared_pre_module_is_one_stack_launch_one_conv_and_one_level_sum(monkeypatch):
    launches = count_launches(monkeypatch, roi_kernels, ["_roi_align_fwd_kernel", "_roi_align_bwd_kernel"])
    count_launches(monkeypatch, level_sum, ["_level_sum_act_fwd", "_level_sum_act_bwd"], launches)
    aggregations = []
    original = extractor_module.multilevel_roi_align

    def recording(*args, **kwargs):
        aggregations.append(args[6])
        return original(*args, **kwargs)

    monkeypatch.setattr(extractor_module, "multilevel_roi_align", recording)
    cfg = groie_paper_cfg("bbox", CHANNELS)
    del cfg["post_cfg"]
    ext = GenericRoIExtractor(**cfg).double()
    conv_batches = []
    ext.pre_module.conv.register_forward_hook(lambda m, inputs, out: conv_batches.append(inputs[0].shape[0]))
    feats = [f.requires_grad_(True) for f in _pyramid()]
    launches.clear()
    ext(feats, _rois()).sum().backward()
    assert aggregations == ["stack"]
    assert conv_batches == [4 * len(STRIDES)]
    assert launches == ["_roi_align_fwd_kernel", "_level_sum_act_fwd", "_level_sum_act_bwd",
                        "_roi_align_bwd_kernel"]


def test_channels_last_features_take_the_same_path_and_give_the_same_result():
    cfg = groie_paper_cfg("bbox", CHANNELS)
    del cfg["post_cfg"]
    ext = GenericRoIExtractor(**cfg).double()
    nchw = [f.requires_grad_(True) for f in _pyramid()]
    nhwc = [f.requires_grad_(True) for f in _pyramid(channels_last=True)]
    out_nchw, out_nhwc = ext(nchw, _rois()), ext(nhwc, _rois())
    assert out_nhwc.is_contiguous(memory_format=torch.channels_last)
    assert_close_to(out_nhwc, out_nchw)
    out_nchw.sum().backward()
    out_nhwc.sum().backward()
    for a, b in zip(nchw, nhwc, strict=True):
        assert_close_to(b.grad, a.grad)


def test_without_pre_module_the_sum_is_fused_into_the_pooling(monkeypatch):
    aggregations = []
    original = extractor_module.multilevel_roi_align
    monkeypatch.setattr(extractor_module, "multilevel_roi_align",
                        lambda *a, **k: aggregations.append(a[6]) or original(*a, **k))
    cfg = groie_paper_cfg("bbox", CHANNELS)
    del cfg["pre_cfg"], cfg["post_cfg"]
    GenericRoIExtractor(**cfg)(_pyramid(dtype=torch.float32), _rois(dtype=torch.float32))
    assert aggregations == ["sum"]


def test_empty_rois_give_zeros_and_keep_every_parameter_in_the_graph():
    ext = GenericRoIExtractor(**groie_paper_cfg("mask", CHANNELS))
    feats = [f.requires_grad_(True) for f in _pyramid(dtype=torch.float32)]
    out = ext(feats, _rois(dtype=torch.float32)[:0])
    assert out.shape == (0, CHANNELS, 14, 14) and out.dtype == torch.float32
    out.sum().backward()
    for name, p in ext.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    assert all(f.grad is not None and torch.count_nonzero(f.grad) == 0 for f in feats)


def test_paper_state_dict_keys_are_mmdetections_and_a_checkpoint_loads_strictly():
    ext = GenericRoIExtractor(**groie_paper_cfg("bbox", 256))
    keys = [
        "post_module.gamma", "post_module.query_conv.weight", "post_module.value_conv.weight",
        "post_module.appr_geom_fc_x.weight", "post_module.appr_geom_fc_y.weight",
        "post_module.proj_conv.weight", "post_module.proj_conv.bias", "pre_module.conv.weight",
        "pre_module.conv.bias",
    ]
    assert sorted(ext.state_dict()) == sorted(keys)
    prefix = "roi_head.bbox_roi_extractor."
    checkpoint = {prefix + k: torch.randn_like(v) for k, v in ext.state_dict().items()}
    checkpoint["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(3, 3)
    fresh = GenericRoIExtractor(**groie_paper_cfg("bbox", 256))
    extractor_state = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    fresh.load_state_dict(extractor_state, strict=True)
    assert torch.equal(fresh.pre_module.conv.weight, checkpoint[prefix + "pre_module.conv.weight"])


def test_mmdetection_config_dicts_are_accepted_as_they_are():
    # configs/groie/faster-rcnn_r50_fpn_groie_1x_coco.py: roi_layer without `aligned` (mmcv default True).
    ext = GenericRoIExtractor(
        aggregation="sum",
        roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=2),
        out_channels=256,
        featmap_strides=[4, 8, 16, 32],
        pre_cfg=dict(type="ConvModule", in_channels=256, out_channels=256, kernel_size=5, padding=2,
                     inplace=False),
        post_cfg=dict(type="GeneralizedAttention", in_channels=256, spatial_range=-1, num_heads=6,
                      attention_type="0100", kv_stride=2),
    )
    assert ext.output_size == (7, 7) and ext.roi_layers[0].aligned and ext.roi_layers[0].sampling_ratio == 2
    assert [layer.spatial_scale for layer in ext.roi_layers] == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert isinstance(ext.roi_layers[0], groie_triton.RoIAlign)
    assert ext.pre_module.conv.kernel_size == (5, 5) and ext.pre_module.conv.padding == (2, 2)
    assert ext.post_module.attention_type == [False, True, False, False] and ext.post_module.num_heads == 6


@pytest.mark.parametrize("variant, num_levels", [("prepost", 2), ("none", 3), ("concat", 2)])
def test_fewer_levels_than_strides_pool_from_the_finest_strides_like_mmdetection(variant, num_levels):
    if variant == "concat":
        cfg = dict(groie_paper_cfg("bbox", CHANNELS), aggregation="concat", out_channels=num_levels * CHANNELS)
        del cfg["pre_cfg"], cfg["post_cfg"]
        loop = LoopGRoIE(7, 2, "concat").double()
    else:
        cfg, loop = _case(variant, 7)
    ours = GenericRoIExtractor(**cfg).double()
    ours.load_state_dict(loop.state_dict(), strict=True)
    feats = [f.requires_grad_(True) for f in _pyramid()[:num_levels]]
    feats_loop = [f.detach().clone().requires_grad_(True) for f in feats]
    out, expected = ours(feats, _rois()), loop(feats_loop, _rois())
    assert out.shape == (4, cfg["out_channels"], 7, 7)
    assert_close_to(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for f, f_loop in zip(feats, feats_loop, strict=True):
        assert_close_to(f.grad, f_loop.grad)


# ------------------------------------- what mmdetection's tests/.../test_generic_roi_extractor.py checks
_MMDET_CONV = dict(type="ConvModule", in_channels=16, out_channels=16, kernel_size=5, padding=2, inplace=False)
_MMDET_IMAGE = (800, 1344)  # its pyramid: 200x336, 100x168, 50x84, 25x42
_MMDET_ROI = torch.tensor([[0.0, 587.8285, 52.1405, 886.2484, 341.5644]])


def _mmdet_test_cfg(**changes) -> dict:
    """The cfg of mmdetection's test: 7x7 RoIAlign with sampling 2, 16 channels, strides 4 to 32."""
    return {"roi_layer": dict(type="RoIAlign", output_size=7, sampling_ratio=2), "out_channels": 16,
            "featmap_strides": [4, 8, 16, 32], **changes}


def test_generic_roi_extractor_matches_mmdet_tests_init():
    ext = GenericRoIExtractor(**_mmdet_test_cfg())
    assert not ext.with_pre and not ext.with_post
    # mmdetection asserts; here a ValueError naming the argument (see the module docstring).
    with pytest.raises(ValueError, match="aggregation must be one of"):
        GenericRoIExtractor(**_mmdet_test_cfg(aggregation="other"))


def test_generic_roi_extractor_matches_mmdet_tests_forward():
    ext = GenericRoIExtractor(**_mmdet_test_cfg(pre_cfg=_MMDET_CONV, post_cfg=_MMDET_CONV))
    feats = make_pyramid(n=1, c=16, image=_MMDET_IMAGE)
    # No RoIs, two of the four levels: mmdetection's empty result, [0, out_channels, 7, 7] in the maps' dtype.
    empty = ext(feats[:2], torch.empty(0, 5))
    assert len(empty) == 0 and empty.shape == (0, 16, 7, 7) and empty.dtype == torch.float32
    # One level, then all four.
    assert ext(feats[:1], _MMDET_ROI).shape == (1, 16, 7, 7)
    assert ext(feats, _MMDET_ROI).shape == (1, 16, 7, 7)
    # Concat without pre/post: 4 levels x 16 channels.
    concat = GenericRoIExtractor(**_mmdet_test_cfg(aggregation="concat", out_channels=16 * 4))
    assert concat(feats, _MMDET_ROI).shape == (1, 64, 7, 7)
    # out_channels that concat does not give (256 * 5 for 4 levels of 256): mmdetection asserts, ValueError here.
    wrong = GenericRoIExtractor(**_mmdet_test_cfg(aggregation="concat", out_channels=256 * 5))
    with pytest.raises(ValueError, match="out_channels is 1280 but concat aggregation gives 1024"):
        wrong(make_pyramid(n=1, c=256), _MMDET_ROI)


# --------------------------------------------------------------------------------------------- bad input
def _paper(**changes):
    cfg = groie_paper_cfg("bbox", CHANNELS)
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize(
    "cfg, error, match",
    [
        (_paper(roi_layer=dict(type="RoIPool", output_size=7)), ValueError,
         r"roi_layer\['type'\] = 'RoIPool'"),
        (_paper(roi_layer=dict(output_size=7)), ValueError, r"roi_layer has no 'type'"),
        (_paper(roi_layer=dict(type="RoIAlign")), ValueError, r"roi_layer\['output_size'\]"),
        (_paper(roi_layer=dict(type="RoIAlign", output_size=7, pool_mode="max")), ValueError,
         r"roi_layer\['pool_mode'\]"),
        (_paper(roi_layer=dict(type="RoIAlign", output_size=7, spatial_scale=1.0)), ValueError,
         r"roi_layer\['spatial_scale'\]"),
        (_paper(pre_cfg=dict(type="NonLocal2d", in_channels=CHANNELS)), ValueError, r"pre_cfg\['type'\]"),
        (_paper(post_cfg=dict(type="ContextBlock", in_channels=CHANNELS)), ValueError, r"post_cfg\['type'\]"),
        (_paper(pre_cfg=dict(type="ConvModule", in_channels=CHANNELS, out_channels=CHANNELS, kernel_size=3,
                             norm_cfg=dict(type="XN"))), ValueError, r"norm_cfg\['type'\] = 'XN'"),
        (_paper(pre_cfg=dict(type="ConvModule", in_channels=CHANNELS, out_channels=CHANNELS, kernel_size=3,
                             norm_cfg=dict(type="GN"))), ValueError, r"norm_cfg\['num_groups'\]"),
        (_paper(pre_cfg=dict(type="ConvModule", in_channels=CHANNELS, out_channels=CHANNELS, kernel_size=3,
                             act_cfg=dict(type="Mish"))), ValueError, r"act_cfg\['type'\] = 'Mish'"),
        (_paper(pre_cfg=dict(type="ConvModule", in_channels=CHANNELS, out_channels=CHANNELS, kernel_size=3,
                             stride_x=2)), TypeError, r"pre_cfg"),
        (_paper(aggregation="max"), ValueError, "aggregation must be one of"),
        (_paper(aggregation="concat"), ValueError, r"out_channels is 12 .* concat over 4 levels gives 48"),
        (_paper(out_channels=16), ValueError, "out_channels is 16"),
        (_paper(featmap_strides=[]), ValueError, "featmap_strides"),
    ],
)
def test_bad_config_raises_naming_the_key(cfg, error, match):
    with pytest.raises(error, match=match):
        GenericRoIExtractor(**cfg)


def test_post_module_for_other_channels_raises():
    cfg = _paper()
    cfg["post_cfg"]["in_channels"] = 24
    with pytest.raises(ValueError, match=r"post_cfg\['in_channels'\] is 24 but out_channels is 12"):
        GenericRoIExtractor(**cfg)


@pytest.mark.parametrize(
    "changes, feats, match",
    [
        (dict(), _pyramid(strides=[4, 8, 16, 32, 64]), "featmap_strides has 4 entries but feats has 5 levels"),
        (dict(aggregation="concat", pre_cfg=None, post_cfg=None, out_channels=40), _pyramid(),
         r"out_channels is 40 but concat aggregation gives 48 channels \(4 levels x 12\)"),
        (dict(pre_cfg=None, post_cfg=None, out_channels=16), _pyramid(),
         "out_channels is 16 but sum aggregation gives 12"),
        (dict(), _pyramid(c=8), r"pre_cfg\['in_channels'\] is 12 but the feature maps have 8 channels"),
    ],
)
def test_bad_forward_input_raises(changes, feats, match):
    cfg = _paper(**changes)
    for key in ("pre_cfg", "post_cfg"):
        if cfg[key] is None:
            del cfg[key]
    with pytest.raises(ValueError, match=match):
        GenericRoIExtractor(**cfg)(feats, _rois())


@pytest.mark.parametrize(
    "feats, error, match",
    [
        (torch.zeros(2, 12, 8, 8), TypeError, "feats must be a sequence .* got one tensor"),
        (5, TypeError, "feats must be a sequence .* got int"),
        ([], ValueError, "feats must hold at least one level"),
        ([torch.zeros(2, 12, 8, 8), torch.zeros(2, 12, 4, 4, dtype=torch.float64)], TypeError,
         r"feats\[1\] has dtype torch.float64 but level 0 has torch.float32"),
    ],
)
def test_bad_feats_raise_naming_feats(feats, error, match):
    with pytest.raises(error, match=match):
        GenericRoIExtractor(**_paper())(feats, _rois())


# ------------------------------------------------------------------------------------------- GRoIEPooler
def test_pooler_equals_the_extractor_with_the_same_weights():
    pooler = GRoIEPooler.from_paper(["p2", "p3", "p4", "p5"], "bbox", CHANNELS).double()
    with torch.no_grad():
        pooler.post_module.gamma.fill_(0.5)
    ext = GenericRoIExtractor(**groie_paper_cfg("bbox", CHANNELS)).double()
    ext.load_state_dict(pooler.state_dict(), strict=True)
    feats = _pyramid()
    x = {"p2": feats[0], "p3": feats[1], "p4": feats[2], "p5": feats[3], "pool": feats[3][:, :, ::2, ::2]}
    rois = _rois()
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    out = pooler(x, boxes, [IMAGE, (60, 72)])
    assert pooler.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    order = torch.cat([torch.nonzero(rois[:, 0] == i)[:, 0] for i in range(2)])
    assert_close_to(out, ext(feats, rois[order]))


def test_pooler_is_a_torchvision_multiscale_roi_align_with_the_paper_config():
    for kind, size in (("bbox", 7), ("mask", 14)):
        pooler = GRoIEPooler.from_paper(["0", "1", "2", "3"], kind, channels=64)
        assert isinstance(pooler, torchvision.ops.MultiScaleRoIAlign)
        assert pooler.output_size == (size, size) and pooler.sampling_ratio == 2 and pooler.aligned
        assert pooler.aggregation == "sum"
        assert pooler.pre_module.conv.kernel_size == (5, 5) and pooler.pre_module.conv.padding == (2, 2)
        assert pooler.pre_module.in_channels == pooler.pre_module.out_channels == 64
        attention = pooler.post_module
        assert (attention.num_heads, attention.kv_stride, attention.spatial_range) == (6, 2, -1)
        assert attention.attention_type == [False, True, False, False]
    with pytest.raises(ValueError, match="kind"):
        GRoIEPooler.from_paper(["0"], "keypoint")
    with pytest.raises(ValueError, match="aggregation"):
        GRoIEPooler(["0"], 7, 2, aggregation="mean")


def test_pooler_without_boxes_returns_zeros_in_the_graph():
    pooler = GRoIEPooler(["0", "1"], 7, 2, pre_cfg=dict(type="ConvModule", in_channels=4, out_channels=6,
                                                         kernel_size=3, padding=1), aggregation="concat")
    x = {"0": torch.randn(1, 4, 16, 16), "1": torch.randn(1, 4, 8, 8)}
    out = pooler(x, [torch.zeros(0, 4)], [(64, 64)])
    assert out.shape == (0, 12, 7, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in pooler.parameters())


# ----------------------------------------------------------------------------- torchvision detectors
def _tiny_backbone(channels):
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.misc import FrozenBatchNorm2d

    # resnet_fpn_backbone fixes 256 FPN channels; BackboneWithFPN builds the same ResNet-18 FPN narrower.
    body = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    return BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                           [64, 128, 256, 512], channels)


def _images_and_targets(with_masks):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g) for _ in range(2)]
    targets = []
    for boxes in ([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]], [[5.0, 5.0, 40.0, 50.0]]):
        boxes = torch.tensor(boxes)
        target = {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}
        if with_masks:
            masks = torch.zeros(len(boxes), 96, 128, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                masks[i, y1:y2, x1:x2] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


def _train_step_and_eval(model, with_masks):
    images, targets = _images_and_targets(with_masks)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det in detections:
        assert torch.isfinite(det["boxes"]).all()
        if with_masks:
            assert det["masks"].shape[1:] == (1, 96, 128)
    return losses


DETECTOR_KWARGS = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_train=40, rpn_post_nms_top_n_train=12,
                       rpn_pre_nms_top_n_test=40, rpn_post_nms_top_n_test=12, box_batch_size_per_image=8,
                       box_detections_per_img=5)


def test_groie_pooler_trains_and_evaluates_in_faster_rcnn(monkeypatch):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # reference backend: the detector stays fast on CPU
    torch.manual_seed(0)
    channels = 16
    model = FasterRCNN(
        _tiny_backbone(channels), num_classes=None,
        box_roi_pool=GRoIEPooler.from_paper(["0", "1", "2", "3"], "bbox", channels),
        box_head=TwoMLPHead(channels * 7 * 7, 32), box_predictor=FastRCNNPredictor(32, 2), **DETECTOR_KWARGS,
    )
    pooler = model.roi_heads.box_roi_pool
    losses = _train_step_and_eval(model, with_masks=False)
    assert set(losses) >= {"loss_classifier", "loss_box_reg"}
    assert pooler.pre_module.conv.weight.grad is not None and pooler.post_module.gamma.grad is not None


def test_groie_pooler_trains_and_evaluates_in_mask_rcnn(monkeypatch):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    channels = 16
    model = MaskRCNN(
        _tiny_backbone(channels), num_classes=None,
        box_roi_pool=GRoIEPooler.from_paper(["0", "1", "2", "3"], "bbox", channels),
        box_head=TwoMLPHead(channels * 7 * 7, 32), box_predictor=FastRCNNPredictor(32, 2),
        mask_roi_pool=GRoIEPooler.from_paper(["0", "1", "2", "3"], "mask", channels),
        mask_head=MaskRCNNHeads(channels, [16], 1), mask_predictor=MaskRCNNPredictor(16, 16, 2),
        **DETECTOR_KWARGS,
    )
    losses = _train_step_and_eval(model, with_masks=True)
    assert "loss_mask" in losses
    assert model.roi_heads.mask_roi_pool.pre_module.conv.weight.grad is not None
