"""The fused activation + level-sum op (groie::level_sum_act): kernels interpreted, against PyTorch."""

from __future__ import annotations

import pytest
import torch
from groie_triton.kernels import level_sum as kernels
from torch import nn

import groie_triton
from groie_triton.ops import ACTIVATIONS, level_sum_act
from groie_triton.testing import assert_close_to, count_launches


def _act(y: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(y)
    if activation == "leaky_relu":
        return nn.functional.leaky_relu(y, slope)
    return y


def _levels(dtype, shape=(3, 4, 5, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    y.view(-1)[::7] = 0.0  # the derivative at exactly 0 is torch's convention, checked too
    return y.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_level_sum_forward_and_backward_match_pytorch(activation, dtype):
    y = _levels(dtype).requires_grad_(True)
    out = level_sum_act(y, activation, 0.2)
    y64 = y.detach().double().requires_grad_(True)
    expected = _act(y64, activation, 0.2).sum(0)
    assert out.dtype == dtype and out.shape == y.shape[1:]
    assert_close_to(out, expected, dtype)
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    (grad_y,) = torch.autograd.grad(out, y, grad)
    (expected_grad,) = torch.autograd.grad(expected, y64, grad.double())
    assert_close_to(grad_y, expected_grad, dtype)


def test_level_sum_keeps_channels_last_and_reads_any_strides():
    base = _levels(torch.float32, (3 * 4, 5, 3, 3)).contiguous(memory_format=torch.channels_last)
    y = base.unflatten(0, (3, 4)).requires_grad_(True)
    out = level_sum_act(y, "relu")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to(out, torch.relu(y.detach().double()).sum(0))
    # Levels not outermost in memory: copied once, same values.
    permuted = _levels(torch.float32, (4, 3, 5, 3, 3)).transpose(0, 1)
    assert_close_to(level_sum_act(permuted, "leaky_relu", 0.1),
                    nn.functional.leaky_relu(permuted.double(), 0.1).sum(0))
    # sum().backward() hands a zero-stride gradient.
    out.sum().backward()
    assert_close_to(y.grad, (y.detach() > 0).double())


def test_level_sum_is_one_launch_each_way(monkeypatch):
    launches = count_launches(monkeypatch, kernels, ["_level_sum_act_fwd", "_level_sum_act_bwd"])
    y = _levels(torch.float32).requires_grad_(True)
    level_sum_act(y, "relu").sum().backward()
    assert launches == ["_level_sum_act_fwd", "_level_sum_act_bwd"]


def test_level_sum_reference_backend_gives_the_kernel_results(monkeypatch):
    y = _levels(torch.float32).requires_grad_(True)
    out = level_sum_act(y, "leaky_relu", 0.3)
    (grad_kernel,) = torch.autograd.grad(out, y, torch.ones_like(out))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert groie_triton.backend_for(y) == "reference"
    out_ref = level_sum_act(y, "leaky_relu", 0.3)
    (grad_ref,) = torch.autograd.grad(out_ref, y, torch.ones_like(out_ref))
    assert_close_to(out, out_ref)
    assert_close_to(grad_kernel, grad_ref)


def test_level_sum_compiles_under_torch_compile():
    y = _levels(torch.float32)
    f = torch.compile(lambda t: level_sum_act(t, "relu") * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(y), level_sum_act(y, "relu") * 2, atol=0, rtol=0)


@pytest.mark.parametrize(
    "y, kwargs, error, match",
    [
        (torch.zeros(3, 4), dict(activation="gelu"), ValueError, "activation must be one of"),
        (torch.zeros(4), {}, ValueError, r"\[L, \.\.\.\]"),
        (torch.zeros(0, 4), {}, ValueError, "L >= 1"),
        (torch.zeros(3, 4, dtype=torch.int32), {}, TypeError, "floating point"),
    ],
)
def test_level_sum_bad_input_raises(y, kwargs, error, match):
    with pytest.raises(error, match=match):
        level_sum_act(y, **kwargs)


def test_level_sum_compile_specs_name_real_arguments():
    specs = kernels.compile_specs()
    assert {s["kernel"] for s in specs} == {"level_sum_act_fwd", "level_sum_act_bwd"}
    assert {s["dtype"] for s in specs} == {"fp16", "bf16", "fp32", "fp64"}
    for spec in specs:
        params = set(spec["fn"].arg_names)
        assert set(spec["signature"]) | set(spec["constexprs"]) | set(spec["config"].kwargs) == params
