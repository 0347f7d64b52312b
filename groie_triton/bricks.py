"""mmcv's building blocks as GRoIE configs use them: ConvModule, its norm/activation builders, and the
builders that turn mmdetection cfg dicts into pre/post modules and RoI layers.

A cfg dict is ``dict(type=<name>, **arguments)`` as in mmcv/mmdetection configs. The names accepted are those
GRoIE's configs use (listed on each builder); an unknown ``type`` is a ValueError and arguments the type does
not take a TypeError, both naming the cfg key (``pre_cfg``, ``norm_cfg``, ...). The modules keep mmcv's
attribute names and state_dict keys, so mmcv/mmdetection checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

from groie_triton.attention import GeneralizedAttention
from groie_triton.poolers import RoIAlign

__all__ = ["ConvModule", "build_norm_layer", "build_activation_layer", "build_plugin", "build_roi_layers"]

_RELU = MappingProxyType({"type": "ReLU"})


def _split_type(cfg: Any, key: str, registry: Mapping[str, Any]) -> tuple[Any, dict]:
    """(registry entry, remaining arguments) of a cfg dict; ValueError naming ``key`` when it is unusable."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{key} must be a dict with a 'type' key, got {type(cfg).__name__}")
    args = dict(cfg)
    if "type" not in args:
        raise ValueError(f"{key} has no 'type' key; expected one of {sorted(registry)}")
    kind = args.pop("type")
    if kind not in registry:
        raise ValueError(f"{key}['type'] = {kind!r} is not supported; expected one of {sorted(registry)}")
    return registry[kind], args


def _construct(cls, args: dict, key: str):
    try:
        return cls(**args)
    except TypeError as exc:
        raise TypeError(f"{key}: cannot build {cls.__name__} from {args}: {exc}") from exc


_CONV_TYPES = {"Conv": nn.Conv2d, "Conv2d": nn.Conv2d}
# mmcv's names: the attribute a ConvModule stores its norm under is "bn", "gn" or "in".
_NORM_TYPES = {
    "BN": (nn.BatchNorm2d, "bn"),
    "BN2d": (nn.BatchNorm2d, "bn"),
    "SyncBN": (nn.SyncBatchNorm, "bn"),
    "GN": (nn.GroupNorm, "gn"),
    "IN": (nn.InstanceNorm2d, "in"),
    "IN2d": (nn.InstanceNorm2d, "in"),
}
_ACT_TYPES = {
    "ReLU": nn.ReLU,
    "LeakyReLU": nn.LeakyReLU,
    "PReLU": nn.PReLU,
    "RReLU": nn.RReLU,
    "ReLU6": nn.ReLU6,
    "ELU": nn.ELU,
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
    "GELU": nn.GELU,
    "SiLU": nn.SiLU,
    "Swish": nn.SiLU,
}
# Activations built with mmcv's `inplace` setting; the others take no such argument.
_INPLACE_ACTS = {"ReLU", "LeakyReLU", "RReLU", "ReLU6", "ELU", "SiLU", "Swish"}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def build_norm_layer(norm_cfg: Mapping, num_features: int) -> tuple[str, nn.Module]:
    """(attribute name, layer) of an mmcv norm cfg, as mmcv's ``build_norm_layer`` names it ("bn", "gn", "in").

    ``norm_cfg``: ``dict(type="BN" | "BN2d" | "SyncBN" | "GN" | "IN" | "IN2d", ...)``; GN needs
    ``num_groups``; ``requires_grad=False`` freezes the affine parameters; ``eps`` defaults to 1e-5.

    Raises:
        ValueError: an unknown type, or GN without ``num_groups`` (the message names ``norm_cfg``).
        TypeError: arguments the norm does not take.
    """
    (cls, name), args = _split_type(norm_cfg, "norm_cfg", _NORM_TYPES)
    requires_grad = args.pop("requires_grad", True)
    args.setdefault("eps", 1e-5)
    if cls is nn.GroupNorm:
        if "num_groups" not in args:
            raise ValueError("norm_cfg['num_groups'] is required for type 'GN'")
        layer = _construct(cls, dict(num_channels=num_features, **args), "norm_cfg")
    else:
        layer = _construct(cls, dict(num_features=num_features, **args), "norm_cfg")
    for param in layer.parameters():
        param.requires_grad = requires_grad
    return name, layer


def build_activation_layer(act_cfg: Mapping, inplace: bool = True) -> nn.Module:
    """The activation of an mmcv act cfg: ``dict(type="ReLU" | "LeakyReLU" | "PReLU" | "RReLU" | "ReLU6" |
    "ELU" | "Sigmoid" | "Tanh" | "GELU" | "SiLU" | "Swish", ...)``.

    ``inplace`` applies where the activation takes it and the cfg does not set it (ConvModule's rule).
    ValueError for an unknown type, TypeError for arguments it does not take (both name ``act_cfg``).
    """
    cls, args = _split_type(act_cfg, "act_cfg", _ACT_TYPES)
    if act_cfg["type"] in _INPLACE_ACTS:
        args.setdefault("inplace", inplace)
    return _construct(cls, args, "act_cfg")


class ConvModule(nn.Module):
    """Conv2d + optional norm + optional activation, with mmcv ConvModule's arguments and state_dict keys.

    Keys: ``conv.weight``, ``conv.bias`` (when there is a bias: by default exactly when there is no norm),
    the norm under ``bn`` / ``gn`` / ``in`` as mmcv names it, and ``activate.weight`` for PReLU.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as nn.Conv2d.
        bias: ``"auto"`` (bias iff no norm) or a bool.
        conv_cfg: None or ``dict(type="Conv2d" | "Conv")``.
        norm_cfg: None or a cfg of :func:`build_norm_layer`.
        act_cfg: None (no activation) or a cfg of :func:`build_activation_layer`; default ReLU.
        inplace: in-place activation where the activation supports it.
        with_spectral_norm: wrap the conv in ``torch.nn.utils.spectral_norm``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        order: a permutation of ``("conv", "norm", "act")``.

    Raises:
        ValueError: an unknown type in a cfg dict (the message names the key), a bad order or padding mode.
        TypeError: a cfg dict that is not a dict, or arguments its type does not take.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool | str = "auto",
        conv_cfg: Mapping | None = None,
        norm_cfg: Mapping | None = None,
        act_cfg: Mapping | None = _RELU,
        inplace: bool = True,
        with_spectral_norm: bool = False,
        padding_mode: str = "zeros",
        order: Sequence[str] = ("conv", "norm", "act"),
    ) -> None:
        super().__init__()
        order = tuple(order)
        if len(order) != 3 or set(order) != {"conv", "norm", "act"}:
            raise ValueError(f"order must be a permutation of ('conv', 'norm', 'act'), got {order!r}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        if bias != "auto" and not isinstance(bias, bool):
            raise ValueError(f"bias must be 'auto' or a bool, got {bias!r}")
        conv_cls, conv_args = nn.Conv2d, {}
        if conv_cfg is not None:
            conv_cls, conv_args = _split_type(conv_cfg, "conv_cfg", _CONV_TYPES)

        self.conv_cfg = None if conv_cfg is None else dict(conv_cfg)
        self.norm_cfg = None if norm_cfg is None else dict(norm_cfg)
        self.act_cfg = None if act_cfg is None else dict(act_cfg)
        self.inplace = inplace
        self.with_spectral_norm = with_spectral_norm
        self.order = order
        self.with_norm = norm_cfg is not None
        self.with_activation = act_cfg is not None
        self.with_bias = (not self.with_norm) if bias == "auto" else bias

        conv = _construct(
            conv_cls,
            dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                 padding=padding, dilation=dilation, groups=groups, bias=self.with_bias,
                 padding_mode=padding_mode, **conv_args),
            "conv_cfg",
        )
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.conv = conv

        if self.with_norm:
            norm_channels = out_channels if order.index("norm") > order.index("conv") else in_channels
            self.norm_name, norm = build_norm_layer(norm_cfg, norm_channels)
            self.add_module(self.norm_name, norm)
        else:
            self.norm_name = None

        if self.with_activation:
            self.activate = build_activation_layer(act_cfg, inplace)

        self.reset_parameters()
        if with_spectral_norm:
            self.conv = nn.utils.spectral_norm(self.conv)

    @property
    def norm(self) -> nn.Module | None:
        """The norm layer (``self.bn`` / ``self.gn`` / ``self.in``), or None."""
        return getattr(self, self.norm_name) if self.norm_name else None

    def reset_parameters(self) -> None:
        """mmcv's initialisation: Kaiming-normal (fan_out) conv weight, zero bias, norm weight 1, bias 0."""
        if self.with_activation and self.act_cfg["type"] == "LeakyReLU":
            a, nonlinearity = self.act_cfg.get("negative_slope", 0.01), "leaky_relu"
        else:
            a, nonlinearity = 0, "relu"
        nn.init.kaiming_normal_(self.conv.weight, a=a, mode="fan_out", nonlinearity=nonlinearity)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        norm = self.norm
        if norm is not None and getattr(norm, "weight", None) is not None:
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)

    def forward(self, x: Tensor, activate: bool = True, norm: bool = True) -> Tensor:
        """[N, in_channels, H, W] -> [N, out_channels, H', W'], the layers in ``order``."""
        for layer in self.order:
            if layer == "conv":
                x = self.conv(x)
            elif layer == "norm" and norm and self.with_norm:
                x = self.norm(x)
            elif layer == "act" and activate and self.with_activation:
                x = self.activate(x)
        return x


_PLUGIN_TYPES = {"ConvModule": ConvModule, "GeneralizedAttention": GeneralizedAttention}


def build_plugin(cfg: Mapping | nn.Module, key: str = "cfg") -> nn.Module:
    """A pre/post module from an mmdetection cfg dict (``type`` "ConvModule" or "GeneralizedAttention").

    An ``nn.Module`` is returned as it is. ``key`` names the argument in error messages (ValueError for an
    unknown type, TypeError for arguments the type does not take or a cfg that is not a dict).
    """
    if isinstance(cfg, nn.Module):
        return cfg
    cls, args = _split_type(cfg, key, _PLUGIN_TYPES)
    return _construct(cls, args, key)


_ROI_LAYER_KEYS = ("output_size", "sampling_ratio", "aligned", "pool_mode", "use_torchvision")


def _roi_layer_args(cfg: Mapping) -> dict:
    """output_size (pair), sampling_ratio and aligned of an mmcv RoIAlign cfg, mmcv's defaults filled in."""
    _, args = _split_type(cfg, "roi_layer", {"RoIAlign": None})
    for name in args:
        if name not in _ROI_LAYER_KEYS:
            raise ValueError(f"roi_layer[{name!r}] is not a RoIAlign argument; those are {_ROI_LAYER_KEYS}")
    if "output_size" not in args:
        raise ValueError("roi_layer['output_size'] is required")
    if args.get("pool_mode", "avg") != "avg":
        raise ValueError(f"roi_layer['pool_mode'] = {args['pool_mode']!r}: only 'avg' is supported")
    size = args["output_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"roi_layer['output_size'] must be a positive int or pair: {args['output_size']!r}")
    # use_torchvision picks mmcv's backend; torchvision's RoIAlign and mmcv's give the same result.
    return {"output_size": size, "sampling_ratio": int(args.get("sampling_ratio", 0)),
            "aligned": bool(args.get("aligned", True))}


def build_roi_layers(layer_cfg: Mapping, featmap_strides: Sequence[int]) -> nn.ModuleList:
    """One :class:`groie_triton.RoIAlign` per stride (``spatial_scale = 1 / stride``), from an mmcv cfg.

    ``layer_cfg``: ``dict(type="RoIAlign", output_size, sampling_ratio=0, aligned=True)`` (mmcv's defaults;
    ``pool_mode="avg"`` and ``use_torchvision`` are accepted). ValueError naming the key otherwise.
    """
    args = _roi_layer_args(layer_cfg)
    return nn.ModuleList(RoIAlign(spatial_scale=1.0 / s, **args) for s in featmap_strides)
