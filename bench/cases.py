"""The benchmark's cases and providers: one definition shared by the GPU timing run and the CPU parity run.

A :class:`Case` is a point of the sweep: RoIs, channels, output size, levels, dtype and layout, on a pyramid
of 2 images of 800x1344 with strides 4..32 (4 levels) or 4..64 (5 levels), sampling ratio 2. A :class:`Size`
says how big it runs: :func:`full_size` on a GPU and for the cost model, :func:`reduced_size` under the Triton
interpreter. A provider maps :class:`Inputs` to the pooled ``[K, C, ph, pw]`` tensor:

    groie             groie_triton.multilevel_roi_align(aggregation="sum"): all levels, one launch
    loop              mmdetection's GRoIE: zeros, then per level torchvision.ops.roi_align added in place
    torchvision_msra  torchvision.ops.MultiScaleRoIAlign: each RoI pooled from one level (LevelMapper)
    groie_single      groie_triton.MultiScaleRoIAlign: the same result, the level chosen inside the kernel
    groie_deterministic  groie's forward; its backward under torch.use_deterministic_algorithms(True)
                      (int64 fixed-point atomics: bit-identical run to run)

``groie`` and ``loop`` compute GRoIE's sum (aligned=True); ``torchvision_msra`` and ``groie_single`` compute
the classic FPN pooling (aligned=False, as torchvision's pooler). Parity compares each provider with the
torchvision provider of the same maths, run in float64 (:data:`PARITY_REFERENCE`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torchvision
from torchvision.ops.poolers import initLevelMapper

import groie_triton
from bench import cost_model
from bench.cost_model import MODES, PROVIDERS
from groie_triton.testing import tolerance

__all__ = [
    "IMAGE",
    "N_IMAGES",
    "SAMPLING_RATIO",
    "DTYPES",
    "LAYOUTS",
    "PROVIDERS",
    "MODES",
    "PARITY_REFERENCE",
    "parity_tolerance",
    "Case",
    "Size",
    "Inputs",
    "SWEEP",
    "QUICK",
    "QUICK_PARITY_ROIS",
    "DEFAULT_CASE",
    "select_cases",
    "full_size",
    "reduced_size",
    "make_inputs",
    "problem",
    "run_provider",
    "mode_callable",
    "parity",
]

IMAGE = (800, 1344)
N_IMAGES = 2
SAMPLING_RATIO = 2
STRIDES = {4: (4, 8, 16, 32), 5: (4, 8, 16, 32, 64)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
LEVEL_NAMES = ("p2", "p3", "p4", "p5", "p6")

PARITY_REFERENCE = {
    "groie": "loop",
    "loop": "loop",
    "torchvision_msra": "torchvision_msra",
    "groie_single": "torchvision_msra",
    "groie_deterministic": "loop",
}
"""The provider whose float64 run is each provider's reference."""


def parity_tolerance(dtype: str) -> float:
    """Max abs error allowed against the float64 reference, times max(1, max |reference|): the ``atol`` of
    :func:`groie_triton.testing.tolerance` (float32 and float64 match up to summation order; half types are
    within the rounding of the output, the kernels accumulating in fp32)."""
    return tolerance(dtype)["atol"]


@dataclass(frozen=True)
class Case:
    """One point of the sweep. ``name`` (e.g. ``K1024-C256-7x7-L4-fp32-nchw``) is how the CLI selects it."""

    num_rois: int
    channels: int
    output_size: int
    num_levels: int
    dtype: str
    layout: str

    @property
    def name(self) -> str:
        o = self.output_size
        return f"K{self.num_rois}-C{self.channels}-{o}x{o}-L{self.num_levels}-{self.dtype}-{self.layout}"

    @property
    def strides(self) -> tuple[int, ...]:
        return STRIDES[self.num_levels]

    @property
    def scales(self) -> list[float]:
        return [1.0 / s for s in self.strides]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def channels_last(self) -> bool:
        return self.layout == "channels_last"


SWEEP = tuple(
    Case(k, c, o, levels, dtype, layout)
    for k in (128, 512, 1024, 4096)
    for c in (64, 256)
    for o in (7, 14)
    for levels in (4, 5)
    for dtype in DTYPES
    for layout in LAYOUTS
)
DEFAULT_CASE = Case(1024, 256, 7, 4, "fp32", "nchw")
"""GRoIE's published setting: 512 sampled RoIs per image x 2 images, 256 channels, 7x7, P2-P5, fp32."""
QUICK = (
    DEFAULT_CASE,
    Case(512, 64, 14, 5, "fp16", "channels_last"),
    Case(128, 64, 7, 4, "bf16", "nchw"),
    Case(4096, 256, 7, 5, "fp32", "channels_last"),
)
"""--quick: the default case plus three that cover every dtype, layout, output size and level count."""


def select_cases(patterns: Sequence[str] | None, quick: bool) -> list[Case]:
    """Cases named by ``patterns`` (names or globs, ``default`` for :data:`DEFAULT_CASE`), in sweep order.

    Without patterns: :data:`QUICK` if ``quick`` else :data:`SWEEP`. Raises ValueError naming a pattern that
    matches no case.
    """
    if not patterns:
        return list(QUICK if quick else SWEEP)
    chosen: set[str] = set()
    for pattern in patterns:
        pattern = DEFAULT_CASE.name if pattern == "default" else pattern
        hits = {c.name for c in SWEEP if fnmatch.fnmatchcase(c.name, pattern)}
        if not hits:
            raise ValueError(
                f"unknown case {pattern!r}: case names look like {DEFAULT_CASE.name} "
                f"(K in 128/512/1024/4096, C in 64/256, 7x7 or 14x14, L4 or L5, fp32/fp16/bf16, "
                f"nchw or channels_last); globs such as 'K1024-*-fp16-*' and 'default' work"
            )
        chosen |= hits
    return [c for c in SWEEP if c.name in chosen]


@dataclass(frozen=True)
class Size:
    """How big a case runs: image size, RoIs, channels, and box sides (sqrt of area) in image pixels.

    ``canonical_scale`` shrinks with the image so that the level mapping spreads RoIs as at full size.
    """

    image: tuple[int, int]
    num_rois: int
    channels: int
    canonical_scale: float
    box_sides: tuple[float, float]

    def describe(self) -> str:
        return f"K{self.num_rois} C{self.channels} {self.image[0]}x{self.image[1]}"


def full_size(case: Case) -> Size:
    """The case as stated: 2 images of 800x1344, box sides from 16 to 800 pixels."""
    return Size(IMAGE, case.num_rois, case.channels, 224.0, (16.0, 800.0))


REDUCTION = 8


QUICK_PARITY_ROIS = 2
"""RoIs of the parity run with ``--quick`` (one per image): half the interpreted work of :func:`reduced_size`."""


def reduced_size(case: Case, num_rois: int = 4) -> Size:
    """The case at 1/8 of the image, ``num_rois`` RoIs (split over the images) and C/32 channels: what the
    Triton interpreter runs in seconds.

    Every case keeps its output size, levels, dtype and layout (what selects the kernel path); cases that
    differ only in K share one reduced size.
    """
    image = (IMAGE[0] // REDUCTION, IMAGE[1] // REDUCTION)
    return Size(image, num_rois, max(case.channels // 32, 1), 224.0 / REDUCTION, (16.0 / REDUCTION, 800.0 / REDUCTION))


def level_shapes(case: Case, size: Size) -> list[tuple[int, int]]:
    return [(math.ceil(size.image[0] / s), math.ceil(size.image[1] / s)) for s in case.strides]


@lru_cache(maxsize=64)
def _boxes(size: Size, seed: int) -> tuple[torch.Tensor, ...]:
    """Per image, ``num_rois / 2`` boxes (x1, y1, x2, y2) in float32: sides log-uniform over
    ``size.box_sides``, aspect ratio log-uniform in [1/2, 2], centres uniform, clipped to the image."""
    g = torch.Generator().manual_seed(seed)
    h, w = size.image
    per_image = size.num_rois // N_IMAGES
    out = []
    for _ in range(N_IMAGES):
        lo, hi = (math.log(s) for s in size.box_sides)
        side = torch.empty(per_image, dtype=torch.float64).uniform_(lo, hi, generator=g).exp()
        aspect = torch.empty(per_image, dtype=torch.float64).uniform_(-math.log(2), math.log(2), generator=g).exp()
        bw, bh = side / aspect.sqrt(), side * aspect.sqrt()
        cx = torch.rand(per_image, dtype=torch.float64, generator=g) * w
        cy = torch.rand(per_image, dtype=torch.float64, generator=g) * h
        box = torch.stack(
            [
                (cx - bw / 2).clamp(0, w),
                (cy - bh / 2).clamp(0, h),
                (cx + bw / 2).clamp(0, w),
                (cy + bh / 2).clamp(0, h),
            ],
            1,
        )
        out.append(box.float())
    return tuple(out)


def mapped_levels(case: Case, size: Size, seed: int = 0) -> torch.Tensor:
    """The level torchvision's LevelMapper (canonical level 4) sends each RoI to, as torchvision_msra does."""
    k_min, k_max = round(math.log2(case.strides[0])), round(math.log2(case.strides[-1]))
    mapper = initLevelMapper(k_min, k_max, canonical_scale=size.canonical_scale, canonical_level=4)
    return mapper(list(_boxes(size, seed)))


def level_counts(case: Case, size: Size, seed: int = 0) -> tuple[int, ...]:
    """RoIs per level under torchvision's LevelMapper (canonical level 4), as torchvision_msra sends them."""
    return tuple(int(n) for n in torch.bincount(mapped_levels(case, size, seed), minlength=case.num_levels))


def problem(case: Case, size: Size | None = None, seed: int = 0) -> cost_model.Problem:
    """The cost model's view of a case (at full size unless ``size`` is given)."""
    size = size or full_size(case)
    return cost_model.Problem(
        n_images=N_IMAGES,
        channels=size.channels,
        level_shapes=tuple(level_shapes(case, size)),
        boxes_per_image=tuple(len(b) for b in _boxes(size, seed)),
        level_counts=level_counts(case, size, seed),
        output_size=case.output_size,
        sampling_ratio=SAMPLING_RATIO,
        dtype=case.dtype,
        channels_last=case.channels_last,
        geometry=_geometry(case.num_levels, size, seed),
    )


@lru_cache(maxsize=64)
def _geometry(num_levels: int, size: Size, seed: int) -> cost_model.Geometry:
    """The sector model's boxes and levels, shared by the cases of one pyramid and size (it caches counts)."""
    case = Case(size.num_rois, size.channels, 7, num_levels, "fp32", "nchw")  # only strides and size matter
    return cost_model.Geometry(
        boxes=torch.cat(_boxes(size, seed)).double().numpy(),
        levels=mapped_levels(case, size, seed).numpy(),
        scales=tuple(case.scales),
    )


@dataclass
class Inputs:
    """Tensors of one case at one size on one device, and the two poolers (built once: they cache scales).

    ``rois``/``boxes`` are float32 (what groie takes); ``rois_tv``/``boxes_tv`` are in the dtype torchvision
    computes in (its kernels require rois in the features' dtype, and it has no bfloat16 kernel, so bf16 runs
    in fp32): cast once here, outside any timed region, as a detector running in that dtype would hold them.
    """

    case: Case
    size: Size
    features: list[torch.Tensor]
    rois: torch.Tensor
    boxes: list[torch.Tensor]
    grad_out: torch.Tensor
    rois_tv: torch.Tensor = field(init=False)
    boxes_tv: list[torch.Tensor] = field(init=False)
    tv_pooler: torchvision.ops.MultiScaleRoIAlign = field(init=False)
    groie_pooler: torchvision.ops.MultiScaleRoIAlign = field(init=False)

    def __post_init__(self):
        dtype = self.features[0].dtype
        tv_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        self.rois_tv = self.rois.to(tv_dtype)
        self.boxes_tv = [b.to(tv_dtype) for b in self.boxes]
        names = list(LEVEL_NAMES[: self.case.num_levels])
        o = self.case.output_size
        self.tv_pooler = torchvision.ops.MultiScaleRoIAlign(
            names, o, SAMPLING_RATIO, canonical_scale=int(self.size.canonical_scale)
        )
        self.groie_pooler = groie_triton.MultiScaleRoIAlign(
            names, o, SAMPLING_RATIO, canonical_scale=int(self.size.canonical_scale)
        )

    @property
    def image_shapes(self) -> list[tuple[int, int]]:
        return [self.size.image] * N_IMAGES

    def named_features(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {
            name: f.to(dtype) if dtype else f
            for name, f in zip(LEVEL_NAMES[: len(self.features)], self.features, strict=True)
        }

    def double(self) -> Inputs:
        """The same values in float64 (fresh leaves that require grad): the parity reference's inputs."""
        return Inputs(
            self.case,
            self.size,
            [f.detach().double().requires_grad_() for f in self.features],
            self.rois.double(),
            [b.double() for b in self.boxes],
            self.grad_out.double(),
        )


def make_inputs(case: Case, size: Size, device: str | torch.device = "cpu", seed: int = 0) -> Inputs:
    """Random features (standard normal, rounded to the case dtype, in its layout, requiring grad), boxes
    and a random output gradient, deterministic in ``seed``."""
    g = torch.Generator(device=device).manual_seed(seed)
    features = []
    for h, w in level_shapes(case, size):
        f = torch.randn(N_IMAGES, size.channels, h, w, generator=g, device=device).to(case.torch_dtype)
        if case.channels_last:
            f = f.contiguous(memory_format=torch.channels_last)
        features.append(f.requires_grad_())
    boxes = [b.to(device) for b in _boxes(size, seed)]
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
    o = case.output_size
    grad_out = torch.randn(size.num_rois, size.channels, o, o, generator=g, device=device).to(case.torch_dtype)
    return Inputs(case, size, features, rois, boxes, grad_out)


# --------------------------------------------------------------------------------------------- providers
def _groie(x: Inputs) -> torch.Tensor:
    return groie_triton.multilevel_roi_align(
        x.features, x.rois, x.case.output_size, x.case.scales, SAMPLING_RATIO, aligned=True, aggregation="sum"
    )


def _loop(x: Inputs) -> torch.Tensor:
    # mmdetection's GenericRoIExtractor(aggregation="sum"): new_zeros, then roi_feats = roi_feats + RoIAlign of
    # each level. bf16, which torchvision lacks, runs in fp32 and is cast back (mmdetection's force_fp32 does so).
    o, dtype = x.case.output_size, x.rois_tv.dtype
    features = [f.to(dtype) for f in x.features]
    out = features[0].new_zeros((x.rois.shape[0], features[0].shape[1], o, o))
    for f, scale in zip(features, x.case.scales, strict=True):
        out = out + torchvision.ops.roi_align(f, x.rois_tv, o, scale, SAMPLING_RATIO, aligned=True)
    return out.to(x.features[0].dtype)


def _torchvision_msra(x: Inputs) -> torch.Tensor:
    dtype = x.features[0].dtype
    features = x.named_features(x.rois_tv.dtype)
    return x.tv_pooler(features, x.boxes_tv, x.image_shapes).to(dtype)


def _groie_single(x: Inputs) -> torch.Tensor:
    return x.groie_pooler(x.named_features(), x.boxes, x.image_shapes)


_RUN: dict[str, Callable[[Inputs], torch.Tensor]] = {
    "groie": _groie,
    "loop": _loop,
    "torchvision_msra": _torchvision_msra,
    "groie_single": _groie_single,
    "groie_deterministic": _groie,
}
assert tuple(_RUN) == PROVIDERS
DETERMINISTIC_BACKWARD = frozenset({"groie_deterministic"})
"""Providers whose backward runs under ``torch.use_deterministic_algorithms(True)`` (forward unchanged)."""


@contextlib.contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms(True) inside (when ``on``), the previous setting restored after."""
    if not on:
        yield
        return
    prev, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn_only)


def _grad(provider: str, out: torch.Tensor, x: Inputs, retain_graph: bool = False) -> tuple[torch.Tensor, ...]:
    """The provider's backward: ``torch.autograd.grad(out, features, grad_out)``, deterministic if it asks."""
    with _deterministic(provider in DETERMINISTIC_BACKWARD):
        return torch.autograd.grad(out, x.features, x.grad_out, retain_graph=retain_graph)


def run_provider(provider: str, x: Inputs) -> torch.Tensor:
    """The provider's pooled ``[K, C, ph, pw]`` output for ``x`` (with autograd history if ``x`` needs it)."""
    return _RUN[provider](x)


def mode_callable(provider: str, x: Inputs, mode: str) -> Callable[[], object]:
    """What a benchmark times for ``mode``.

    forward: the provider on inputs that require grad (a training forward, graph built);
    backward: ``torch.autograd.grad`` through a graph built once here (retained across calls);
    forward_backward: both.
    """
    if mode == "forward":
        return lambda: _RUN[provider](x)
    if mode == "backward":
        out = _RUN[provider](x)
        return lambda: _grad(provider, out, x, retain_graph=True)
    if mode == "forward_backward":
        return lambda: _grad(provider, _RUN[provider](x), x)
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


@dataclass
class Parity:
    """Max abs errors against the float64 reference, forward and backward (max over levels), tolerances."""

    forward: float
    backward: float
    forward_tol: float
    backward_tol: float

    def error(self, mode: str) -> float:
        return {
            "forward": self.forward,
            "backward": self.backward,
            "forward_backward": max(self.forward, self.backward),
        }[mode]

    def ok(self, mode: str) -> bool:
        checks = {
            "forward": [(self.forward, self.forward_tol)],
            "backward": [(self.backward, self.backward_tol)],
        }
        checks["forward_backward"] = checks["forward"] + checks["backward"]
        return all(err <= tol for err, tol in checks[mode])


def _forward_backward(provider: str, x: Inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = _RUN[provider](x)
    return out.detach(), [g.detach() for g in _grad(provider, out, x)]


def parity(provider: str, x: Inputs, references: dict[str, tuple] | None = None) -> Parity:
    """Run ``provider`` forward and backward on ``x`` and compare with its float64 torchvision reference.

    ``references``: a dict reused across providers of the same inputs (the reference runs once).
    """
    references = {} if references is None else references
    ref_name = PARITY_REFERENCE[provider]
    if ref_name not in references:
        references[ref_name] = _forward_backward(ref_name, x.double())
    ref_out, ref_grads = references[ref_name]
    out, grads = _forward_backward(provider, x)
    tol = parity_tolerance(x.case.dtype)
    fwd = (out.double() - ref_out).abs().max().item() if out.numel() else 0.0
    bwd = max(
        ((g.double() - r).abs().max().item() if g.numel() else 0.0) for g, r in zip(grads, ref_grads, strict=True)
    )
    fwd_scale = ref_out.abs().max().item() if ref_out.numel() else 0.0
    bwd_scale = max((r.abs().max().item() if r.numel() else 0.0) for r in ref_grads)
    return Parity(fwd, bwd, tol * max(1.0, fwd_scale), tol * max(1.0, bwd_scale))
