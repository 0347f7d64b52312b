"""Robustness: deterministic backward, 64-bit offsets, grid limits, bad boxes, property-based fuzzing."""

import gc
import importlib
import math
import os

import pytest
import torch
import torchvision
from groie_triton.kernels import roi_align as roi_align_kernels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groie_triton import mapped_roi_align, multilevel_roi_align, roi_align
from groie_triton.testing import TOLERANCES, assert_close_to, make_pyramid, random_rois
from tests.oracle import roi_align_oracle

# CI runs the "ci" profile (300+ examples per property); HYPOTHESIS_PROFILE=dev runs a larger one locally.
settings.register_profile("ci", max_examples=160, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The module, not the function of the same name that groie_triton.ops exports.
roi_align_op = importlib.import_module("groie_triton.ops.roi_align")

SCALES = [1 / 4, 1 / 8, 1 / 16]


IMAGE = (64, 72)


def pyramid(dtype=torch.float32):
    """Three levels of 3 channels, strides 4, 8 and 16 of a 64 x 72 image, for SCALES."""
    return make_pyramid(n=2, c=3, image=IMAGE, strides=(4, 8, 16), dtype=dtype)


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def grads_of(fn, feats, seed=1):
    feats = [f.detach().clone().requires_grad_() for f in feats]
    out = fn(feats)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(g.to(out.dtype))
    return [torch.zeros_like(f) if f.grad is None else f.grad for f in feats]


CALLS = {
    "sum": lambda fs, r: multilevel_roi_align(fs, r, 7, SCALES, 2, True, "sum"),
    "stack": lambda fs, r: multilevel_roi_align(fs, r, 5, SCALES, 0, True, "stack"),
    "mapped": lambda fs, r: mapped_roi_align(fs, r, 7, SCALES, 2, False, "torchvision", canonical_scale=32),
    "single": lambda fs, r: roi_align(fs[0], r, (3, 4), 0.25, -1, False),
}


@pytest.mark.parametrize("backend", ["triton-interpreter", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("call", list(CALLS))
def test_deterministic_backward_is_bit_identical(deterministic, monkeypatch, backend, dtype, call):
    if backend == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    feats, rois = pyramid(dtype), random_rois(n=2, image=IMAGE, k=10)
    first = grads_of(lambda fs: CALLS[call](fs, rois), feats)
    second = grads_of(lambda fs: CALLS[call](fs, rois), feats)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    torch.use_deterministic_algorithms(False)
    # Same gradient as the float64 computation, within the dtype's rounding.
    exact = grads_of(lambda fs: CALLS[call](fs, rois.double()), [f.double() for f in feats])
    for a, e in zip(first, exact):
        assert_close_to(a, e.to(dtype), dtype, atol=4 * TOLERANCES[dtype]["atol"])


def test_deterministic_backward_matches_torchvision_in_float64(deterministic):
    x = torch.randn(2, 3, 12, 13, dtype=torch.float64, requires_grad=True)
    x_tv = x.detach().clone().requires_grad_()
    rois = random_rois(n=2, image=(12, 13), k=12, min_size=0.5, max_size=10, dtype=torch.float64)
    roi_align(x, rois, 7, 1.0, 2, True).sum().backward()
    torch.use_deterministic_algorithms(False)
    torchvision.ops.roi_align(x_tv, rois, 7, 1.0, 2, True).sum().backward()
    assert_close_to(x.grad, x_tv.grad, atol=1e-9)


def test_deterministic_backward_of_non_finite_gradient_is_nan(deterministic):
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    out = roi_align(x, torch.tensor([[0.0, 1, 1, 6, 6]]), 2, 1.0, 2, True)
    out.backward(torch.full_like(out, float("nan")))
    assert torch.isnan(x.grad).all()


def test_grid_puts_rois_on_the_unbounded_axis():
    # CUDA's grid y and z are limited to 65535; x to 2**31 - 1. RoIs x chunks go on x.
    grid = roi_align_kernels.grid(1_000_000, 256, 49)({"V": 2, "BLOCK": 128})
    assert grid == (1_000_000 * 49,)
    with pytest.raises(ValueError, match="split the RoIs"):
        roi_align_kernels.grid(50_000_000, 256, 49)({"V": 1, "BLOCK": 64})


def test_more_than_65535_rois_reference_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 2, 9, 9)
    k = 70_000
    rois = torch.cat([(torch.arange(k) % 2).float()[:, None], torch.rand(k, 2) * 20,
                      torch.rand(k, 2) * 10 + 20], 1)
    assert_close_to(roi_align(x, rois, 2, 0.25, 2, True), torchvision.ops.roi_align(x, rois, 2, 0.25, 2, True))


NAN, INF = float("nan"), float("inf")
# Each row: a box (batch index, x1, y1, x2, y2) that torchvision's CPU op crashes on, throws for, or reads
# foreign memory with; the library's defined result is the float64 oracle's (zeros where stated).
BAD_ROWS = {
    "batch index == N": ([2.0, 1, 1, 9, 9], "zeros"),
    "negative batch index": ([-1.0, 1, 1, 9, 9], "zeros"),
    "NaN batch index": ([NAN, 1, 1, 9, 9], "zeros"),
    "NaN x1": ([0, NAN, 1, 9, 9], "zeros"),
    "+Inf y2": ([1, 1, 1, 9, INF], "finite"),
    "-Inf x1": ([0, -INF, 1, 9, 9], "finite"),
    "1e30 corners": ([1, 1e30, 1e30, 2e30, 2e30], "finite"),
    "box of 1e30": ([0, -1e30, -1e30, 1e30, 1e30], "finite"),
    "inverted box": ([1, 20.0, 20.0, 4.0, 6.0], "zeros-aligned-adaptive"),
}


@pytest.mark.parametrize("row", list(BAD_ROWS))
@pytest.mark.parametrize("sampling_ratio, aligned", [(2, True), (0, True), (0, False)])
def test_bad_boxes_table(row, sampling_ratio, aligned):
    x = torch.randn(2, 3, 10, 11)
    good = random_rois(n=2, image=(20, 22), k=4, min_size=1, max_size=14)
    box, expected = BAD_ROWS[row]
    rois = torch.cat([good[:2], torch.tensor([box]), good[2:]])
    out = roi_align(x, rois, 3, 0.5, sampling_ratio, aligned)
    others = torch.cat([out[:2], out[3:]])
    assert_close_to(others, torchvision.ops.roi_align(x, good, 3, 0.5, sampling_ratio, aligned))
    bad = out[2]
    assert torch.isfinite(bad).all()
    if expected == "zeros" or (expected == "zeros-aligned-adaptive" and aligned and sampling_ratio <= 0):
        assert not bad.any()
    assert_close_to(bad, roi_align_oracle(x.double(), rois[2:3].double(), 3, 0.5, sampling_ratio, aligned)[0])


def test_zero_rois_and_empty_levels_table():
    feats = pyramid() + [torch.zeros(2, 3, 0, 5)]
    out = multilevel_roi_align(feats, torch.zeros(0, 5), 7, SCALES + [1 / 32], aggregation="stack")
    assert out.shape == (4, 0, 3, 7, 7)
    rois = random_rois(n=2, image=IMAGE, k=3)
    out = multilevel_roi_align(feats, rois, 7, SCALES + [1 / 32], aggregation="stack")
    assert not out[3].any()
    assert_close_to(out[:3].sum(0), multilevel_roi_align(feats[:3], rois, 7, SCALES))


def test_float16_map_of_2_to_31_elements_forward_and_backward():
    # 3 x 26755 x 26755 = 2**31 + 6427 elements: offsets into the last channel overflow 32 bits.
    side = 26755
    x = torch.zeros(1, 3, side, side, dtype=torch.float16)
    patch = torch.arange(1, 65, dtype=torch.float16).reshape(8, 8) / 8
    x[0, 2, -8:, -8:] = patch
    far = float(side - 8)
    rois = torch.tensor([[0, far + 1.5, far + 2.0, far + 7.0, far + 7.5], [0, 0, 0, 4, 4]])
    x.requires_grad_()
    out = roi_align(x, rois, 2, 1.0, 2, True)
    local = rois - torch.tensor([0, far, far, far, far])
    window = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    window[0, 2] = patch.double()
    window.requires_grad_()
    expected = torchvision.ops.roi_align(window, local.double(), 2, 1.0, 2, True)
    assert_close_to(out[:1], expected[:1].to(torch.float16), torch.float16)
    assert not out[1].any()
    grad = torch.ones_like(out)
    out.backward(grad)
    del out
    gc.collect()
    expected.backward(grad.double())
    assert_close_to(x.grad[0, :, -8:, -8:], window.grad[0].to(torch.float16), torch.float16)
    # Nothing lands anywhere but the two RoIs' corners of the map.
    corners = torch.count_nonzero(x.grad[0, :, -8:, -8:]) + torch.count_nonzero(x.grad[0, :, :8, :8])
    assert torch.count_nonzero(x.grad) == corners > 0


# ----------------------------------------------------------------------------------------- properties
@st.composite
def problems(draw):
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 1 / 3]))
    k = draw(st.integers(0, 4))
    coord = st.floats(-8, 40, allow_nan=False, width=32)
    boxes = []
    for _ in range(k):
        x1, y1 = draw(coord), draw(coord)
        kind = draw(st.sampled_from(["normal", "tiny", "degenerate"]))
        if kind == "normal":
            x2, y2 = x1 + draw(st.floats(0.5, 40, width=32)), y1 + draw(st.floats(0.5, 40, width=32))
        elif kind == "tiny":
            x2, y2 = x1 + draw(st.floats(0, 0.5, width=32)), y1 + draw(st.floats(0, 0.5, width=32))
        else:
            x2, y2 = x1, y1 + draw(st.floats(0, 10, width=32))
        boxes.append([draw(st.integers(0, n - 1)), x1, y1, x2, y2])
    return dict(
        n=n, c=c, h=h, w=w, scale=scale, rois=torch.tensor(boxes, dtype=torch.float64).reshape(k, 5),
        output_size=(draw(st.integers(1, 4)), draw(st.integers(1, 4))), sampling_ratio=draw(st.integers(-1, 3)),
        aligned=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.float16,
                                                                 torch.bfloat16])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "transposed"])),
        seed=draw(st.integers(0, 2**16)),
    )


def feature(p, h=None, w=None):
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["n"], p["c"], h or p["h"], w or p["w"], generator=g, dtype=torch.float64).to(p["dtype"])
    if p["layout"] == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if p["layout"] == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


@given(problems())
def test_property_roi_align_matches_float64_oracle(p):
    x = feature(p)
    rois = p["rois"].float()
    out = roi_align(x, rois, p["output_size"], p["scale"], p["sampling_ratio"], p["aligned"])
    assert out.dtype == p["dtype"] and out.shape == (rois.shape[0], p["c"], *p["output_size"])
    expected = roi_align_oracle(x.double(), rois.double(), p["output_size"], p["scale"], p["sampling_ratio"],
                                p["aligned"])
    assert_close_to(out, expected.to(p["dtype"]), p["dtype"])
    if p["dtype"] in (torch.float32, torch.float64) and rois.shape[0] and p["h"] and p["w"]:
        inverted = ((rois[:, 3] < rois[:, 1]) | (rois[:, 4] < rois[:, 2])).any()
        if not inverted:
            tv = torchvision.ops.roi_align(x, rois.to(p["dtype"]), p["output_size"], p["scale"],
                                           p["sampling_ratio"], p["aligned"])
            assert_close_to(out, tv)


@given(problems(), st.sampled_from(["sum", "concat", "stack"]), st.integers(1, 3))
def test_property_multilevel_matches_per_level_oracle(p, aggregation, levels):
    feats = [feature(p, max(p["h"] >> i, 1), max(p["w"] >> i, 1)) for i in range(levels)]
    scales = [p["scale"] / 2**i for i in range(levels)]
    rois = p["rois"].float()
    out = multilevel_roi_align(feats, rois, p["output_size"], scales, p["sampling_ratio"], p["aligned"],
                               aggregation)
    per_level = [roi_align_oracle(f.double(), rois.double(), p["output_size"], s, p["sampling_ratio"],
                                  p["aligned"]) for f, s in zip(feats, scales)]
    expected = {"sum": lambda: sum(per_level), "concat": lambda: torch.cat(per_level, 1),
                "stack": lambda: torch.stack(per_level)}[aggregation]()
    # Summing L rounded levels in float32 then rounding once: allow one more rounding per level.
    tol = TOLERANCES[p["dtype"]]
    assert_close_to(out, expected.to(p["dtype"]), p["dtype"], atol=tol["atol"] * levels,
                    rtol=tol["rtol"] * max(1, math.sqrt(levels)))


@pytest.mark.parametrize("aggregation", ["sum", "concat", "stack", "mapped"])
def test_invalid_batch_index_gives_zeros_whatever_the_aggregation(aggregation, monkeypatch):
    # Every output element must be written: fill fresh outputs with NaN so that a skipped store shows.
    empty = roi_align_op._empty_output
    monkeypatch.setattr(roi_align_op, "_empty_output", lambda *a, **kw: empty(*a, **kw).fill_(NAN))
    feats = [f.requires_grad_() for f in pyramid()]
    good = random_rois(n=2, image=IMAGE, k=3)
    rois = torch.cat([good[:1], torch.tensor([[2.0, 1, 1, 30, 30], [NAN, 1, 1, 30, 30]]), good[1:]])

    def pool(r):
        if aggregation == "mapped":
            return mapped_roi_align(feats, r, 3, SCALES, mapping="mmdet", finest_scale=8)
        return multilevel_roi_align(feats, r, 3, SCALES, aggregation=aggregation)

    out, expected = pool(rois), pool(good)
    roi_dim = 1 if aggregation == "stack" else 0
    bad = out.narrow(roi_dim, 1, 2)
    assert torch.equal(bad, torch.zeros_like(bad))
    assert_close_to(torch.cat([out.narrow(roi_dim, 0, 1), out.narrow(roi_dim, 3, 2)], roi_dim), expected)
    grads = torch.autograd.grad(out.sum(), feats)
    for g, e in zip(grads, torch.autograd.grad(expected.sum(), feats)):
        assert_close_to(g, e)
