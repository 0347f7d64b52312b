"""Autotuning on the GPU: every shipped config of every autotuned kernel launches and gives correct results,
and the tuning key leaves the number of RoIs out (a new batch size does not re-tune) but not the channels.

Generic on purpose: the autotuners are found by type in groie_triton.kernels.roi_align and their configs are
used as opaque objects (no kwarg names), so the tests follow the kernels through rewrites.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from _gpu_helpers import (
    DEVICE,
    SCALES,
    assert_matches,
    autotuners,
    clear_autotune_caches,
    forward_backward,
    is_backward,
    pyramid,
    rois,
    tv_mapped,
    tv_multilevel,
    upcast,
)

import groie_triton


@pytest.fixture(autouse=True)
def _one_config():
    """Overrides tests/gpu/conftest.py's: real autotuning here, from empty caches."""
    clear_autotune_caches()
    yield
    clear_autotune_caches()


def _cases():
    """(tuner name, config index) for every config of every autotuner (collected without a GPU too)."""
    try:
        tuners = autotuners()
    except Exception:  # noqa: BLE001 - collection must not fail where the kernels cannot be imported
        return [pytest.param("none", 0, marks=pytest.mark.skip(reason="kernels not importable"))]
    return [pytest.param(name, i, id=f"{name}-config{i}") for name, t in tuners.items() for i in range(len(t.configs))]


def _check_case(dtype, layout):
    feats = pyramid(dtype, layout, c=40)
    boxes = rois(k=20)
    out, grads, g = forward_backward(
        lambda fs: groie_triton.multilevel_roi_align(fs, boxes, 7, SCALES, 2, True, "sum"), feats)
    ref, ref_grads, _ = forward_backward(lambda fs: tv_multilevel(fs, boxes.double(), 7, SCALES, 2, True, "sum"),
                                         upcast(feats), g.double())
    assert_matches(out, ref, dtype)
    for a, r in zip(grads, ref_grads):
        assert_matches(a, r, dtype)


def _check_other_paths(dtype, layout):
    image = (512, 640)
    feats = pyramid(dtype, layout, c=40, image=image)
    boxes = rois(image=image, k=32, min_size=8.0, max_size=600.0)
    levels = torchvision.ops.poolers.LevelMapper(2, 5)([boxes[:, 1:]])
    for ours, theirs in (
        (lambda fs: groie_triton.mapped_roi_align(fs, boxes, 7, SCALES, 2, False),
         lambda fs: tv_mapped(fs, boxes.double(), levels, 7, SCALES, 2, False)),
        (lambda fs: groie_triton.roi_align(fs[0], boxes, 7, SCALES[0], -1, False),
         lambda fs: torchvision.ops.roi_align(fs[0], boxes.to(fs[0].dtype), 7, SCALES[0], -1, False)),
    ):
        out, grads, g = forward_backward(ours, feats)
        ref, ref_grads, _ = forward_backward(theirs, upcast(feats), g.double())
        assert_matches(out, ref, dtype)
        for a, r in zip(grads, ref_grads):
            assert_matches(a, r, dtype)


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "nchw"), (torch.float16, "channels_last")],
                         ids=["fp32-nchw", "fp16-channels_last"])
@pytest.mark.parametrize("name,index", _cases())
def test_every_config_launches_and_is_correct(name, index, dtype, layout):
    """Pin one autotuner to one config (a single config is launched without pruning or benchmarking), run a
    forward and backward through the public op and compare with torchvision."""
    tuners = autotuners()
    tuner = tuners[name]
    config = tuner.configs[index]
    saved = {n: t.configs for n, t in tuners.items()}
    # The tuner under test runs `config`; the others their first config (no benchmarking of theirs here).
    for n, t in tuners.items():
        t.configs = [config] if n == name else list(t.configs[:1])
    tuner.best_config = None
    try:
        _check_case(dtype, layout)
        if tuner.best_config is None:  # not on the per-level path: the mapped and single-level ones
            _check_other_paths(dtype, layout)
        assert tuner.best_config is config, f"{name} was not launched by roi_align forward/backward"
    finally:
        for n, t in tuners.items():
            t.configs = saved[n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_full_autotune_is_correct(dtype):
    """All configs the kernels' own pruning keeps are benchmarked (so launched), and the winner is correct."""
    _check_case(dtype, "nchw")
    tuned = {name: t for name, t in autotuners().items() if t.cache}
    assert any(not is_backward(n) for n in tuned) and any(is_backward(n) for n in tuned), sorted(tuned)


def test_new_k_does_not_retune_but_new_c_does():
    feats = pyramid(torch.float32, "nchw", c=40)
    g_seed = torch.Generator(device=DEVICE).manual_seed(0)
    for k in (20, 333):
        boxes = rois(k=k, seed=k)
        out = groie_triton.multilevel_roi_align([f.requires_grad_() for f in feats], boxes, 7, SCALES, 2, True)
        out.backward(torch.randn(out.shape, generator=g_seed, device=DEVICE))
        feats = [f.detach() for f in feats]
    tuners = autotuners()
    used = {name: t for name, t in tuners.items() if t.cache}
    assert any(not is_backward(n) for n in used) and any(is_backward(n) for n in used), sorted(used)
    for name, t in used.items():
        assert len(t.cache) == 1, f"{name} re-tuned for a new number of RoIs: keys {list(t.cache)}"
    # Another channel count is another tuning key.
    other = pyramid(torch.float32, "nchw", c=72)
    groie_triton.multilevel_roi_align(other, rois(k=20), 7, SCALES, 2, True)
    forward = [t for n, t in used.items() if not is_backward(n)]
    assert any(len(t.cache) == 2 for t in forward), "the channel count is not part of the forward tuning key"
