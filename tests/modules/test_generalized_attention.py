"""GeneralizedAttention: against a float64 reference written from the paper's formula, against mmcv, and
against what mmcv's own test (tests/test_cnn/test_generalized_attention.py) expects of the module."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groie_triton.attention import GeneralizedAttention
from groie_triton.testing import tolerance

ALL_TYPES = ["".join(bits) for bits in itertools.product("01", repeat=4)]
# (kv_stride, q_stride, spatial_range)
STRIDES = [(1, 1, -1), (2, 1, -1), (2, 2, -1), (3, 2, -1), (2, 1, 1), (2, 2, 0)]

try:
    from mmcv.cnn.bricks import GeneralizedAttention as MmcvGeneralizedAttention
except ImportError:  # pragma: no cover - depends on the environment
    MmcvGeneralizedAttention = None
needs_mmcv = pytest.mark.skipif(
    MmcvGeneralizedAttention is None,
    reason="mmcv is not importable (pip install mmcv-lite, the test extra, to compare against mmcv's module)",
)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every float entry (gamma included, so the attention term is visible)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def _window(i: int, j: int, spatial_range: int, kv_stride: int) -> bool:
    """Key index j is inside the window of query index i (mmcv's local-constraint rule)."""
    return (i - spatial_range) // kv_stride <= j <= (i + spatial_range + 1) // kv_stride


def reference_attention(m: GeneralizedAttention, x: torch.Tensor) -> torch.Tensor:
    """The module's maths spelled out in float64, pixel by pixel, from its parameters only.

    energy(q, k) = [b0] Q(q).K(k) + [b2] u.K(k) + [b1] Q(q).R(q, k) + [b3] v.R(q, k), softmax over k,
    R(q, k) = (Fx(e(dx)) + Fy(e(dy))) / sqrt(2). mmcv's branch for bit 1 without bit 3 uses the query at the
    transposed pixel in the row term; this reference does the same on purpose (see attention.py).
    """
    x = x.double()
    p = {k: v.double() for k, v in m.state_dict().items() if v.is_floating_point()}
    b0, b1, b2, b3 = m.attention_type
    heads, d = m.num_heads, m.qk_embed_dim
    qs, ks = m.q_stride, m.kv_stride
    n, c, height, width = x.shape
    xq = x[:, :, ::qs, ::qs]
    xk = x[:, :, ::ks, ::ks]
    h, w = xq.shape[2:]
    hk, wk = xk.shape[2:]
    saliency_only = b2 and not (b0 or b1 or b3)
    if saliency_only:
        h = w = 1

    def conv1x1(name, t):
        return torch.einsum("oc,nchw->nohw", p[name + ".weight"][:, :, 0, 0], t)

    query = conv1x1("query_conv", xq) if (b0 or b1) else None
    key = conv1x1("key_conv", xk) if (b0 or b2) else None
    value = conv1x1("value_conv", xk)
    dim = m.position_embedding_dim

    def embed(delta: float) -> torch.Tensor:
        freqs = [1000.0 ** (4.0 * i / dim) for i in range(dim // 4)]
        scaled = [delta * m.position_magnitude / f for f in freqs]
        values = [math.sin(s) for s in scaled] + [math.cos(s) for s in scaled]
        return torch.tensor(values, dtype=torch.float64)

    if b1 or b3:
        # rel_x[x, k] / rel_y[y, j]: relative-position features of query column x and key column k (row y, j).
        emb_x = torch.stack([torch.stack([embed(xx * qs - k * ks) for k in range(wk)]) for xx in range(w)])
        emb_y = torch.stack([torch.stack([embed(y * qs - j * ks) for j in range(hk)]) for y in range(h)])
        rel_x = emb_x @ p["appr_geom_fc_x.weight"].T / math.sqrt(2)
        rel_y = emb_y @ p["appr_geom_fc_y.weight"].T / math.sqrt(2)

    out = torch.zeros(n, heads * m.v_dim, h, w, dtype=torch.float64)
    for b, head, y, xx in itertools.product(range(n), range(heads), range(h), range(w)):
        sl = slice(head * d, (head + 1) * d)
        energy = torch.zeros(hk, wk, dtype=torch.float64)  # [key row j, key column k]
        if b0 or b2:
            content = torch.zeros(d, dtype=torch.float64)
            if b0:
                content = content + query[b, sl, y, xx]
            if b2:
                content = content + p["appr_bias"][sl]
            energy = energy + torch.einsum("d,djk->jk", content, key[b, sl])
        if b1 or b3:
            if b1 and b3:
                col_q = row_q = query[b, sl, y, xx] + p["geom_bias"][sl]
            elif b1:
                col_q, row_q = query[b, sl, y, xx], query[b, sl, xx, y]
            else:
                col_q = row_q = p["geom_bias"][sl]
            energy = energy + (rel_x[xx, :, sl] @ col_q)[None, :] + (rel_y[y, :, sl] @ row_q)[:, None]
        if m.spatial_range >= 0:
            for j, k in itertools.product(range(hk), range(wk)):
                if not (_window(y, j, m.spatial_range, ks) and _window(xx, k, m.spatial_range, ks)):
                    energy[j, k] = float("-inf")
        attn = torch.softmax(energy.flatten(), 0)
        vs = slice(head * m.v_dim, (head + 1) * m.v_dim)
        out[b, vs, y, xx] = value[b, vs].flatten(1) @ attn
    out = conv1x1("proj_conv", out) + p["proj_conv.bias"][None, :, None, None]
    if qs > 1 and not saliency_only:
        out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
    return p["gamma"] * out + x


def _input_shape(attention_type: str) -> tuple[int, int]:
    # Bit 1 without bit 3 needs a square query grid (as in mmcv); the others also run on a non-square map.
    return (5, 5) if attention_type[1] == "1" and attention_type[3] == "0" else (5, 6)


@pytest.mark.parametrize("kv_stride,q_stride,spatial_range", STRIDES)
@pytest.mark.parametrize("attention_type", ALL_TYPES)
def test_matches_float64_reference(attention_type, kv_stride, q_stride, spatial_range):
    torch.manual_seed(0)
    m = GeneralizedAttention(8, spatial_range=spatial_range, num_heads=2, kv_stride=kv_stride,
                             q_stride=q_stride, attention_type=attention_type).double()
    _randomize(m)
    x = torch.randn(2, 8, *_input_shape(attention_type), dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_attention(m, x), **tolerance(torch.float64))


@pytest.mark.parametrize("attention_type", ["0100", "1111", "0010"])
def test_float32_and_channels_last_match_reference(attention_type):
    torch.manual_seed(1)
    m = GeneralizedAttention(8, num_heads=2, attention_type=attention_type, position_magnitude=2)
    _randomize(m)
    x = torch.randn(2, 8, 5, 5)
    expected = reference_attention(m, x)
    torch.testing.assert_close(m(x).double(), expected, **tolerance(torch.float32))
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)).double(), expected,
                               **tolerance(torch.float32))


def test_position_embedding_dim_and_magnitude_match_reference():
    torch.manual_seed(2)
    m = GeneralizedAttention(12, num_heads=3, position_embedding_dim=8, position_magnitude=3,
                             attention_type="0101").double()
    _randomize(m)
    x = torch.randn(1, 12, 4, 6, dtype=torch.float64)
    assert m.appr_geom_fc_x.weight.shape == (12, 4)
    torch.testing.assert_close(m(x), reference_attention(m, x), **tolerance(torch.float64))


def test_gamma_starts_at_zero_so_a_new_block_is_the_identity():
    m = GeneralizedAttention(16, num_heads=4, attention_type="1111")
    assert torch.equal(m.gamma, torch.zeros(1))
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)


def test_gradients_flow_to_input_and_every_parameter():
    torch.manual_seed(3)
    m = GeneralizedAttention(4, num_heads=2, attention_type="1111", kv_stride=1).double()
    _randomize(m)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_state_dict_keys_are_mmcvs():
    paper = GeneralizedAttention(256, spatial_range=-1, num_heads=6, attention_type="0100", kv_stride=2)
    assert set(paper.state_dict()) == {
        "gamma", "query_conv.weight", "value_conv.weight", "appr_geom_fc_x.weight", "appr_geom_fc_y.weight",
        "proj_conv.weight", "proj_conv.bias",
    }
    assert paper.query_conv.weight.shape == (252, 256, 1, 1)
    assert paper.appr_geom_fc_x.weight.shape == (252, 128)
    full = GeneralizedAttention(256, spatial_range=2, num_heads=8, attention_type="1111")
    assert set(full.state_dict()) == {
        "gamma", "appr_bias", "geom_bias", "local_constraint_map", "query_conv.weight", "key_conv.weight",
        "value_conv.weight", "appr_geom_fc_x.weight", "appr_geom_fc_y.weight", "proj_conv.weight",
        "proj_conv.bias",
    }
    assert full.local_constraint_map.shape == (84, 84, 42, 42)
    assert full.local_constraint_map.dtype == torch.uint8


def test_spatial_range_works_for_any_channel_count_and_size():
    m = GeneralizedAttention(8, spatial_range=1, num_heads=2, attention_type="1000").double()
    _randomize(m)
    x = torch.randn(1, 8, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_attention(m, x), **tolerance(torch.float64))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(attention_type="012"), "attention_type"),
        (dict(attention_type="0120"), "attention_type"),
        (dict(num_heads=0), "num_heads"),
        (dict(num_heads=9), "num_heads"),
        (dict(kv_stride=0), "stride"),
        (dict(position_embedding_dim=6, attention_type="0100"), "position_embedding_dim"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GeneralizedAttention(8, **{"num_heads": 2, **kwargs})


def test_non_square_query_grid_for_position_only_query_type_raises():
    m = GeneralizedAttention(8, num_heads=2, attention_type="0100")
    with pytest.raises(ValueError, match="square"):
        m(torch.randn(1, 8, 5, 6))


def test_wrong_input_channels_raise():
    m = GeneralizedAttention(8, num_heads=2)
    with pytest.raises(ValueError, match=r"\[N, 8, H, W\]"):
        m(torch.randn(1, 6, 5, 5))


def _mmcv_cases():
    # Every type with both strides at 1 and both above 1; mmcv builds its stored local mask (256 or 512
    # channels only) with a Python loop, seconds per module, so spatial range on two types only.
    for attention_type in ALL_TYPES:
        for strides in STRIDES:
            with_range = strides[2] >= 0 and attention_type in ("1111", "0100")
            if strides in ((1, 1, -1), (3, 2, -1)) or with_range:
                yield attention_type, *strides


@needs_mmcv
@pytest.mark.parametrize("attention_type,kv_stride,q_stride,spatial_range", list(_mmcv_cases()))
def test_matches_mmcv_with_the_same_state_dict(attention_type, kv_stride, q_stride, spatial_range):
    channels, heads = (256, 8) if spatial_range >= 0 else (24, 4)
    kwargs = dict(spatial_range=spatial_range, num_heads=heads, kv_stride=kv_stride, q_stride=q_stride,
                  attention_type=attention_type)
    torch.manual_seed(0)
    theirs = MmcvGeneralizedAttention(channels, **kwargs).double()
    _randomize(theirs)
    ours = GeneralizedAttention(channels, **kwargs).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)

    shape = _input_shape(attention_type)
    x_ours = torch.randn(2, channels, shape[0] + 2, shape[1] + 2, dtype=torch.float64, requires_grad=True)
    x_theirs = x_ours.detach().clone().requires_grad_(True)
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, **tolerance(torch.float64))
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **tolerance(torch.float64))
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, **tolerance(torch.float64), msg=name)


@needs_mmcv
def test_paper_config_matches_mmcv_in_float32():
    torch.manual_seed(4)
    theirs = MmcvGeneralizedAttention(256, spatial_range=-1, num_heads=6, attention_type="0100", kv_stride=2)
    with torch.no_grad():
        theirs.gamma.fill_(0.5)
    ours = GeneralizedAttention(256, spatial_range=-1, num_heads=6, attention_type="0100", kv_stride=2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 256, 7, 7)
    torch.testing.assert_close(ours(x), theirs(x), **tolerance(torch.float32))


# ------------------------------------------------- what mmcv's tests/test_cnn/test_generalized_attention.py checks
@pytest.mark.parametrize(
    "channels, kwargs, expected",
    [
        (16, dict(attention_type="1000"), dict(query_conv=16, key_conv=16)),
        (16, dict(attention_type="0100"), dict(query_conv=16, appr_geom_fc_x=8, appr_geom_fc_y=8)),
        (16, dict(attention_type="0010"), dict(key_conv=16, appr_bias=None)),
        (16, dict(attention_type="0001"), dict(appr_geom_fc_x=8, appr_geom_fc_y=8, geom_bias=None)),
        (256, dict(spatial_range=10), dict(local_constraint_map=None)),
        (16, dict(q_stride=2), dict(q_downsample=None)),
        (16, dict(kv_stride=2), dict(kv_downsample=None)),
    ],
)
def test_generalized_attention_matches_mmcv_test_expectations(channels, kwargs, expected):
    # mmcv's defaults otherwise: 9 heads, attention_type '1111', kv_stride 2, on [2, C, 20, 20].
    m = GeneralizedAttention(channels, **kwargs)
    for name, in_size in expected.items():
        assert getattr(m, name, None) is not None, name
        layer = getattr(m, name)
        if isinstance(layer, nn.Conv2d):
            assert layer.in_channels == in_size, name
        elif isinstance(layer, nn.Linear):
            assert layer.in_features == in_size, name
    x = torch.randn(2, channels, 20, 20)
    assert m(x).shape == x.shape


def test_half_precision_full_attention_keeps_the_shape():
    # mmcv's test runs this in float16 on CUDA only; the module runs it on any device.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = GeneralizedAttention(16, spatial_range=-1, num_heads=8, attention_type="1111", kv_stride=2)
    m = m.to(device).half()
    x = torch.randn(2, 16, 20, 20, device=device).half()
    out = m(x)
    assert out.shape == x.shape and out.dtype == torch.float16


@pytest.mark.parametrize("q_stride, kv_stride", [(1, 1), (2, 1), (1, 2), (2, 3)])
def test_downsample_modules_are_mmcvs_and_hold_no_state(q_stride, kv_stride):
    m = GeneralizedAttention(8, num_heads=2, q_stride=q_stride, kv_stride=kv_stride)
    for layer, stride in ((m.q_downsample, q_stride), (m.kv_downsample, kv_stride)):
        if stride == 1:
            assert layer is None
        else:
            assert isinstance(layer, nn.AvgPool2d) and (layer.kernel_size, layer.stride) == (1, stride)
    assert not any("downsample" in key for key in m.state_dict())
    if MmcvGeneralizedAttention is not None:
        theirs = MmcvGeneralizedAttention(8, num_heads=2, q_stride=q_stride, kv_stride=kv_stride)
        assert repr(m.q_downsample) == repr(theirs.q_downsample)
        assert repr(m.kv_downsample) == repr(theirs.kv_downsample)


def test_downsample_modules_pick_the_key_grid():
    # As in mmcv, forward subsamples through the module: without it the keys come from every pixel.
    torch.manual_seed(5)
    strided = GeneralizedAttention(8, num_heads=2, attention_type="1000", kv_stride=2).double()
    _randomize(strided)
    dense = GeneralizedAttention(8, num_heads=2, attention_type="1000", kv_stride=1).double()
    dense.load_state_dict(strided.state_dict(), strict=True)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(strided(x), reference_attention(strided, x), **tolerance(torch.float64))
    strided.kv_downsample = None
    torch.testing.assert_close(strided(x), dense(x), rtol=0, atol=0)
