"""Single-level roi_align and RoIAlign: parity with torchvision and a float64 oracle (kernels interpreted)."""

import warnings

import pytest
import torch
import torchvision

import groie_triton
from groie_triton import RoIAlign, backend_for, roi_align
from groie_triton.testing import TOLERANCES, assert_close_to, edge_rois
from tests.oracle import roi_align_oracle

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_input(n=2, c=5, h=11, w=13, dtype=torch.float32, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # neither NCHW nor channels_last: [N, C, W, H] storage seen through a transpose
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


def make_rois(dtype=torch.float32):
    """Boxes in image coordinates: inside, partly outside, fully outside, tiny, degenerate, every image."""
    return edge_rois(n=2, h=11, w=13, scale=0.5, dtype=dtype)


@pytest.mark.parametrize("output_size", [(7, 7), (3, 4), (14, 14)])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "channels_last"])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_torchvision(dtype, aligned, sampling_ratio, layout, output_size):
    x = make_input(dtype=dtype, layout=layout)
    rois = make_rois(dtype=dtype)
    out = roi_align(x, rois, output_size, 0.5, sampling_ratio, aligned)
    expected = torchvision.ops.roi_align(x, rois, output_size, 0.5, sampling_ratio, aligned)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close_to(out, expected)


@pytest.mark.parametrize("output_size", [(7, 7), (3, 4)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_forward_matches_float64_reference(dtype, aligned, sampling_ratio, layout, output_size):
    x = make_input(dtype=dtype, layout=layout)
    rois = make_rois()
    out = roi_align(x, rois, output_size, 0.5, sampling_ratio, aligned)
    assert out.dtype == dtype
    # The float64 answer on the very same half-precision values, rounded once.
    expected = roi_align_oracle(x.double(), rois.double(), output_size, 0.5, sampling_ratio, aligned)
    assert_close_to(out, expected.to(dtype), dtype)
    if dtype == torch.float16:  # torchvision's CPU op accumulates in half: looser, but it must agree
        tv = torchvision.ops.roi_align(x, rois.half(), output_size, 0.5, sampling_ratio, aligned)
        torch.testing.assert_close(out.double(), tv.double(), atol=1e-2, rtol=1e-2)


def test_float32_matches_float64_oracle():
    x = make_input(dtype=torch.float32)
    rois = make_rois()
    out = roi_align(x, rois, (5, 6), 0.5, 0, True)
    assert_close_to(out, roi_align_oracle(x.double(), rois.double(), (5, 6), 0.5, 0, True))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_backward_matches_torchvision(aligned, sampling_ratio):
    x = make_input(dtype=torch.float64).requires_grad_()
    x_tv = x.detach().clone().requires_grad_()
    rois = make_rois(dtype=torch.float64)
    grad = torch.randn(rois.shape[0], x.shape[1], 7, 7, dtype=torch.float64)
    roi_align(x, rois, 7, 0.5, sampling_ratio, aligned).backward(grad)
    torchvision.ops.roi_align(x_tv, rois, 7, 0.5, sampling_ratio, aligned).backward(grad)
    assert_close_to(x.grad, x_tv.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_of_sum_zero_stride_grad(dtype, layout):
    # y.sum().backward() hands the backward an expanded gradient with zero strides.
    x = make_input(dtype=dtype, layout=layout).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    rois = make_rois()
    roi_align(x, rois, 7, 0.5, 2, True).sum().backward()
    torchvision.ops.roi_align(x64, rois.double(), 7, 0.5, 2, True).sum().backward()
    assert x.grad.dtype == dtype
    # Gradients accumulate in float32 and are rounded once.
    assert_close_to(x.grad, x64.grad.to(dtype), dtype, atol=4 * TOLERANCES[dtype]["atol"])


@pytest.mark.parametrize("seed", range(4))
def test_gradcheck_float64(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, generator=g).requires_grad_()
    boxes = torch.rand(4, 4, generator=g, dtype=torch.float64) * 10
    boxes[:, 2:] += boxes[:, :2]
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0], [0.0]], dtype=torch.float64), boxes], 1)
    sr = [2, 0, -1, 1][seed]
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (3, 2), 0.5, sr, seed % 2 == 0), (x,),
                                    fast_mode=True)


def test_boxes_as_list_of_tensors():
    x = make_input()
    rois = make_rois()
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    expected = torchvision.ops.roi_align(x, boxes, 7, 0.5, 2, True)
    assert_close_to(roi_align(x, boxes, 7, 0.5, 2, True), expected)


def test_empty_rois_and_empty_batch():
    x = make_input().requires_grad_()
    out = roi_align(x, torch.zeros(0, 5), 7, 0.5)
    assert out.shape == (0, 5, 7, 7)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    empty_batch = torch.zeros(0, 5, 11, 13)
    out = roi_align(empty_batch, make_rois(), 7, 0.5)  # every batch index is out of range: zeros
    assert out.shape == (8, 5, 7, 7) and not out.any()


def test_out_of_range_batch_index_and_non_finite_boxes_leave_other_rois_exact():
    x = make_input()
    rois = make_rois()
    bad = torch.tensor([[2.0, 1, 1, 5, 5], [-1.0, 1, 1, 5, 5], [float("nan"), 1, 1, 5, 5],
                        [0, float("nan"), 1, 5, 5], [1, 0, float("inf"), 5, 5], [0, -float("inf"), 0, 1e30, 1e30],
                        [1, 1e30, 1e30, 2e30, 2e30]])
    mixed = torch.cat([rois, bad])
    before = mixed.clone()
    for sampling_ratio in (2, 0):
        out = roi_align(x, mixed, 7, 0.5, sampling_ratio, True)
        torch.testing.assert_close(mixed, before, equal_nan=True, atol=0, rtol=0)
        assert_close_to(out[: len(rois)], torchvision.ops.roi_align(x, rois, 7, 0.5, sampling_ratio, True))
        tail = out[len(rois):]
        assert not tail[:3].any(), "out-of-range or NaN batch index must give zeros"
        assert torch.isfinite(tail).all()
        expected = roi_align_oracle(x.double(), bad.double(), 7, 0.5, sampling_ratio, True)
        assert_close_to(tail, expected)


def test_input_is_not_modified_and_output_follows_layout():
    x = make_input(layout="channels_last")
    copy = x.clone()
    out = roi_align(x, make_rois(), 7, 0.5, 2, True)
    assert torch.equal(x, copy)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_rois_of_another_float_dtype():
    x = make_input(dtype=torch.float64)
    rois = make_rois(dtype=torch.float32)
    expected = torchvision.ops.roi_align(x, rois.double(), 7, 0.5, 2, False)
    assert_close_to(roi_align(x, rois, 7, 0.5, 2, False), expected)


def test_module_matches_torchvision_module_and_repr():
    ours = RoIAlign((7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    theirs = torchvision.ops.RoIAlign((7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    assert repr(ours) == repr(theirs)
    x, rois = make_input(), make_rois()
    assert_close_to(ours(x, rois), theirs(x, rois))


def test_torch_compile_fullgraph_equals_eager():
    x, rois = make_input(), make_rois()

    def f(x, rois):
        return roi_align(x, rois, 7, 0.5, 2, True) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, rois), f(x, rois), atol=0, rtol=0)
    graph = torch.fx.symbolic_trace(RoIAlign(7, 0.5, 2, True)).graph
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [roi_align]


def test_torch_compile_dynamic_module_equals_eager():
    # Under dynamic=True the module's spatial_scale is traced as a symbolic float: the argument checks must
    # compile (no math.isfinite on it) and the result must be eager's.
    x, rois = torch.rand(2, 24, 10, 10), torch.tensor([[0.0, 0, 0, 9, 9]])
    module = RoIAlign((2, 2), 0.25, 2)
    compiled = torch.compile(module, dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(x, rois), module(x, rois), atol=0, rtol=0)
    f = torch.compile(lambda x, r, s: roi_align(x, r, 3, s, 2, True), dynamic=True, fullgraph=True)
    x, rois = make_input(), make_rois()
    for scale in (0.5, 0.25):
        torch.testing.assert_close(f(x, rois, scale), roi_align(x, rois, 3, scale, 2, True), atol=0, rtol=0)


@pytest.fixture(scope="module")
def scripted_roi_align():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        return torch.jit.script(roi_align)


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, True), (0, False), (-1, True)])
def test_scripted_roi_align_equals_eager(scripted_roi_align, sampling_ratio, aligned):
    x, rois = make_input(), make_rois()
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    expected = roi_align(x, rois, (3, 4), 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(scripted_roi_align(x, rois, (3, 4), 0.5, sampling_ratio, aligned), expected,
                               atol=0, rtol=0)
    # An int output_size broadcasts, a list of boxes is converted, defaults are torchvision's.
    torch.testing.assert_close(scripted_roi_align(x, boxes, 7, 0.5, sampling_ratio, aligned),
                               roi_align(x, boxes, 7, 0.5, sampling_ratio, aligned), atol=0, rtol=0)
    torch.testing.assert_close(scripted_roi_align(x, rois, 2), roi_align(x, rois, 2), atol=0, rtol=0)


def test_scripted_roi_align_matches_scripted_torchvision_forward_and_backward(scripted_roi_align):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = torch.jit.script(torchvision.ops.roi_align)
    x = make_input(dtype=torch.float64).requires_grad_()
    x_tv = x.detach().clone().requires_grad_()
    rois = make_rois(dtype=torch.float64)
    out = scripted_roi_align(x, rois, [7, 7], 0.5, 2, True)
    expected = theirs(x_tv, rois, [7, 7], 0.5, 2, True)
    assert_close_to(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert_close_to(x.grad, x_tv.grad)


def test_torchvision_feature_extraction_sees_roialign_as_leaf():
    from torchvision.models.feature_extraction import get_graph_node_names

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = RoIAlign(7, 0.5, 2, True)

        def forward(self, x, rois):
            return self.pool(x, rois).flatten(1)

    train_nodes, _ = get_graph_node_names(Head())
    assert "pool" in train_nodes


def test_backend_dispatch_is_visible(monkeypatch):
    x, rois = make_input(), make_rois()
    assert backend_for(x) == "triton-interpreter"
    expected = torchvision.ops.roi_align(x, rois, 7, 0.5, 0, True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend_for(x) == "reference"
    assert_close_to(roi_align(x, rois, 7, 0.5, 0, True), expected)
    xb = x.bfloat16()  # torchvision's CPU op has no bfloat16; the reference does
    assert roi_align(xb, rois, 7, 0.5, 0, True).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="torch.Tensor"):
        backend_for([x])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, r: roi_align(x, r[:, :4], 7), ValueError, r"boxes must have shape \[K, 5\]"),
        (lambda x, r: roi_align(x, [r[:, :3]], 7), ValueError, r"boxes\[0\] must be a Tensor\[L, 4\]"),
        (lambda x, r: roi_align(x[0], r, 7), ValueError, "4-D"),
        (lambda x, r: roi_align(x.long(), r, 7), TypeError, "float16, bfloat16, float32 or float64"),
        (lambda x, r: roi_align(x, r.long(), 7), TypeError, "boxes must be a floating point"),
        (lambda x, r: roi_align(x, r.to("meta"), 7), ValueError, "boxes is on meta"),
        (lambda x, r: roi_align(x, r, 0), ValueError, "output_size must be positive"),
        (lambda x, r: roi_align(x, r, (7, -1)), ValueError, "output_size must be positive"),
        (lambda x, r: roi_align(x, r, (7, 7, 7)), ValueError, "output_size must be an int or a pair"),
        (lambda x, r: roi_align(x, r, 7, spatial_scale=-0.5), ValueError, "spatial_scales must be finite"),
        (lambda x, r: roi_align(x, r, 7, sampling_ratio=2.0), TypeError, "sampling_ratio must be an int"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(make_input(), make_rois())


def test_version_and_public_api():
    for name in ("roi_align", "RoIAlign", "multilevel_roi_align", "MultiScaleRoIAlign", "backend_for"):
        assert hasattr(groie_triton, name)


def test_the_op_checks_rois_even_when_called_without_the_public_function():
    # TorchScript and direct torch.ops calls skip the public checks; the op itself refuses what would make
    # the kernels read out of bounds.
    x = torch.randn(1, 2, 8, 8)
    args = ([1.0], 2, 2, 2, True, "sum", None, 0, 224.0, 4.0, 56.0)
    with pytest.raises(ValueError, match=r"rois must have shape \[K, 5\]"):
        torch.ops.groie.roi_align([x], torch.zeros(3, 4), *args)
    scripted = torch.jit.script(roi_align)
    with pytest.raises(Exception, match=r"shape \[K, 5\]"):
        scripted(x, torch.zeros(3, 4), [2, 2], 1.0, 2, True)
