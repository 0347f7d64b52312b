"""mmcv's building blocks (groie_triton.bricks): ConvModule, the norm/activation builders and build_plugin,
against mmcv where it is importable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from groie_triton import extractor
from groie_triton.attention import GeneralizedAttention
from groie_triton.bricks import ConvModule, build_activation_layer, build_norm_layer, build_plugin
from groie_triton.testing import assert_close_to

try:
    from mmcv.cnn import build_norm_layer as mmcv_build_norm_layer
    from mmcv.cnn.bricks import ConvModule as MmcvConvModule
except ImportError:  # pragma: no cover - depends on the environment
    MmcvConvModule = mmcv_build_norm_layer = None
needs_mmcv = pytest.mark.skipif(
    MmcvConvModule is None,
    reason="mmcv is not importable (pip install mmcv-lite, a test extra, to compare against mmcv's modules)",
)


@pytest.mark.parametrize(
    "kwargs, keys",
    [
        ({}, ["conv.weight", "conv.bias"]),
        (dict(norm_cfg=dict(type="GN", num_groups=4)), ["conv.weight", "gn.weight", "gn.bias"]),
        (dict(norm_cfg=dict(type="BN")),
         ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
          "bn.num_batches_tracked"]),
        (dict(act_cfg=dict(type="PReLU")), ["conv.weight", "conv.bias", "activate.weight"]),
        (dict(act_cfg=None, bias=False), ["conv.weight"]),
    ],
)
def test_conv_module_state_dict_keys_are_mmcvs(kwargs, keys):
    m = ConvModule(8, 8, 3, padding=1, **kwargs)
    assert list(m.state_dict()) == keys
    if MmcvConvModule is not None:
        assert list(MmcvConvModule(8, 8, 3, padding=1, **kwargs).state_dict()) == keys


@needs_mmcv
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=5, padding=2, inplace=False),
        dict(kernel_size=3, padding=1, norm_cfg=dict(type="GN", num_groups=2),
             act_cfg=dict(type="LeakyReLU")),
        dict(kernel_size=3, padding=1, norm_cfg=dict(type="BN"), order=("norm", "conv", "act")),
        dict(kernel_size=3, padding=2, dilation=2, padding_mode="reflect", act_cfg=dict(type="ELU")),
    ],
)
def test_conv_module_matches_mmcv(kwargs):
    torch.manual_seed(0)
    theirs = MmcvConvModule(8, 6, **kwargs).double()
    ours = ConvModule(8, 6, **kwargs).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 8, 7, 7, dtype=torch.float64)
    assert_close_to(ours(x), theirs(x))


def test_conv_module_initialisation_is_mmcvs():
    m = ConvModule(8, 8, 3, norm_cfg=dict(type="GN", num_groups=2), bias=True)
    assert torch.equal(m.conv.bias, torch.zeros(8))
    assert torch.equal(m.gn.weight, torch.ones(8)) and torch.equal(m.gn.bias, torch.zeros(8))
    frozen = ConvModule(8, 8, 3, norm_cfg=dict(type="BN", requires_grad=False))
    assert not any(p.requires_grad for p in frozen.bn.parameters())


@pytest.mark.parametrize(
    "cfg, name, cls",
    [(dict(type="BN"), "bn", nn.BatchNorm2d), (dict(type="GN", num_groups=2), "gn", nn.GroupNorm),
     (dict(type="IN"), "in", nn.InstanceNorm2d), (dict(type="SyncBN"), "bn", nn.SyncBatchNorm)],
)
def test_norm_layer_names_are_mmcvs(cfg, name, cls):
    built_name, layer = build_norm_layer(cfg, 8)
    assert built_name == name and type(layer) is cls
    if mmcv_build_norm_layer is not None and cfg["type"] != "SyncBN":
        theirs_name, theirs = mmcv_build_norm_layer(cfg, 8)
        assert theirs_name == name and list(theirs.state_dict()) == list(layer.state_dict())


def test_activation_layer_takes_inplace_where_the_activation_has_it():
    assert build_activation_layer(dict(type="ReLU"), inplace=False).inplace is False
    assert build_activation_layer(dict(type="LeakyReLU", inplace=False)).inplace is False
    assert isinstance(build_activation_layer(dict(type="GELU")), nn.GELU)
    with pytest.raises(ValueError, match=r"act_cfg\['type'\] = 'Mish'"):
        build_activation_layer(dict(type="Mish"))


def test_build_plugin_passes_modules_through_and_builds_cfgs():
    conv = nn.Conv2d(4, 4, 1)
    assert build_plugin(conv) is conv
    assert isinstance(build_plugin(dict(type="GeneralizedAttention", in_channels=8, num_heads=2)),
                      GeneralizedAttention)
    with pytest.raises(TypeError, match="post_cfg must be a dict"):
        build_plugin(["ConvModule"], "post_cfg")


def test_extractor_module_still_exports_the_bricks():
    assert extractor.ConvModule is ConvModule and extractor.build_plugin is build_plugin
