"""Multi-level RoIAlign kernels: one forward and one backward launch for 1 to MAX_LEVELS pyramid levels.

Layout of the work: a program per (RoI, chunk of BLOCK lanes); the lanes cover that RoI's flattened
(channel group, output bin) space, V consecutive channels per lane. A lane computes its bin's sample positions
and bilinear weights once and applies them to its V channels, so geometry costs 1/V per output. NCHW maps are
walked bin-fast (the lanes of a warp sample neighbouring bins of the same channels); channels_last maps
channel-fast (a warp reads 32*V consecutive channels of one pixel: coalesced, V-wide vector loads).

The level loop is a runtime loop (ptxas keeps it rolled; the AMD backend unrolls it in the all-level modes):
each pass selects the level's pointer, size and scale from scalar arguments, so code size and live registers
do not grow with the number of levels. With a fixed
sampling ratio (SAMPLING > 0, constexpr) the sample loops have constant trip counts and unroll; adaptive
sampling (SAMPLING == 0) runs bounded runtime loops. MODE says what happens across levels:

    SUM             every level into one accumulator, one write            -> [K, C, ph, pw]
    PER_LEVEL       every level written to its own slice (concat, stack)   -> strided view
    MAP_TORCHVISION one level per RoI, torchvision's LevelMapper, in-kernel -> [K, C, ph, pw]
    MAP_MMDET       one level per RoI, mmdetection's mapping, in-kernel    -> [K, C, ph, pw]

Feature maps are contiguous NCHW or channels_last (CHANNELS_LAST); the launcher makes anything else
contiguous. Every level is its own pointer (a tuple argument), never a copy of the pyramid into one buffer.
Offsets inside an image are 32-bit unless an image holds 2**31 elements (INDEX64). Out-of-range or NaN batch
indices, NaN/Inf boxes and empty levels are masked here, so nothing is read or written out of bounds and no
host check is needed.
"""

from __future__ import annotations

import triton
import triton.language as tl
from groie_triton.kernels import interpreting

MAX_LEVELS = 8

SUM, PER_LEVEL, MAP_TORCHVISION, MAP_MMDET = 0, 1, 2, 3
# The same modes as the kernels see them (a @triton.jit function reads only constexpr globals).
_SUM, _PER_LEVEL, _MAP_TORCHVISION, _MAP_MMDET = (tl.constexpr(m) for m in (SUM, PER_LEVEL, MAP_TORCHVISION, MAP_MMDET))
NAN = tl.constexpr(tl.PropagateNan.ALL)


def _config(v: int, warps: int, maxnreg: int | None = None) -> triton.Config:
    return triton.Config({"V": v, "BLOCK": 32 * warps}, num_warps=warps, num_stages=1, maxnreg=maxnreg)


# (V channels per lane, warps) and a register ceiling per V. A lane holds V accumulators; geometry costs 1/V
# per output, registers grow with V (the 4 bilinear corners x V values of every sample are loaded ahead).
# maxnreg is a ceiling, not a target: without one ptxas may cap registers for occupancy and spill (8 bytes at
# 48 registers, adaptive V=2 forward, 8 warps); with a loose one it spends registers on scheduling (the V=1
# backward went from 32 to 52). float64 values take two registers: ceilings double, V <= 2. Every config is
# spill-free on sm_80, sm_90 and gfx942 in every dtype: `python -m groie_triton.compile_report`.
_WARPS = (2, 4, 8)
FWD_CONFIGS = [_config(v, w, r) for v, r in ((1, 64), (2, 96), (4, 128)) for w in _WARPS]
BWD_CONFIGS = [_config(v, w, r) for v, r in ((1, 48), (2, 96), (4, 128)) for w in _WARPS]

# What changes the best config; never the number of RoIs, so a new batch does not re-tune.
AUTOTUNE_KEY = ["C", "PH", "PW", "NUM_LEVELS", "MODE", "CHANNELS_LAST", "SAMPLING", "INDEX64"]


def configs_for(configs, fp64: bool) -> list:
    """The configs shipped for an accumulation dtype (float64 values take two registers)."""
    if not fp64:
        return configs
    return [_config(c.kwargs["V"], c.num_warps, min(2 * c.maxnreg, 255)) for c in configs if c.kwargs["V"] <= 2]


def _prune(configs, named_args, **kwargs):
    configs = configs_for(configs, kwargs["ACC"] == tl.float64)
    # The interpreter has no benchmarker ("0 active drivers"): keep the widest program, which also interprets
    # fastest. GPU runs benchmark every config.
    if interpreting():
        return [max(configs, key=lambda c: (c.kwargs["BLOCK"] * c.kwargs["V"], c.kwargs["V"]))]
    return configs


def _zero_grads(nargs, reset_only=False):
    # reset_to_zero for a tuple argument: the kernel accumulates with atomic_add, and autotune trials run it
    # several times; without the reset the first call would return a multiple of the gradient.
    for grad in nargs["grads"]:
        grad.zero_()


@triton.jit
def _program(C, PH: tl.constexpr, PW: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
             CHANNELS_LAST: tl.constexpr):
    """This program's RoI (64-bit) and lanes: their bins ([BLOCK]), V channels each ([BLOCK, V]) and which are
    real. The grid is one axis of RoIs x chunks (2**31 - 1 programs), chunks of one RoI next to each other."""
    NB: tl.constexpr = PH * PW
    groups = tl.cdiv(C, V)
    chunks = tl.cdiv(groups * NB, BLOCK)
    pid = tl.program_id(0)
    k = (pid // chunks).to(tl.int64)
    lane = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    if CHANNELS_LAST:
        group = lane % groups
        bins = lane // groups
    else:
        group = lane // NB
        bins = lane % NB
    chan = group[:, None] * V + tl.arange(0, V)[None, :]
    return k, bins, chan, (bins < NB)[:, None] & (chan < C)


@triton.jit
def _level_range(x1, y1, x2, y2, b_valid, canonical_scale, canonical_level, finest_scale, K_MIN: tl.constexpr,
                 NUM_LEVELS: tl.constexpr, MODE: tl.constexpr):
    """The levels [lo, hi) a RoI is pooled from: all of them, or (mapping modes) the one its size maps to; none
    for an invalid batch index (but PER_LEVEL, which must write every slice) or (mapping modes) an area that is
    not finite. The bounds are runtime values:
    ptxas keeps the level loop rolled (the AMD backend still unrolls it fully in the all-level modes)."""
    if MODE == _MAP_TORCHVISION or MODE == _MAP_MMDET:
        size = tl.sqrt((x2 - x1) * (y2 - y1))
        if MODE == _MAP_TORCHVISION:
            lvl = tl.floor(canonical_level + tl.log2(size / canonical_scale) + 1e-6)
            lvl = tl.maximum(lvl, K_MIN, propagate_nan=NAN)
            lvl = tl.minimum(lvl, K_MIN + NUM_LEVELS - 1, propagate_nan=NAN) - K_MIN
        else:
            lvl = tl.floor(tl.log2(size / finest_scale + 1e-6))
            lvl = tl.minimum(tl.maximum(lvl, 0, propagate_nan=NAN), NUM_LEVELS - 1, propagate_nan=NAN)
        # NaN (negative or NaN area) survives the clamps as NaN and selects no level.
        lo = tl.where(lvl == lvl, lvl, 0).to(tl.int32)
        return lo, tl.where(b_valid & (lvl == lvl), lo + 1, lo)
    elif MODE == _PER_LEVEL:
        # Every level's slice is written, zeros for an invalid batch index (the loads are masked).
        return 0, NUM_LEVELS
    else:
        return 0, tl.where(b_valid, NUM_LEVELS, 0)


@triton.jit
def _level(lvl, ptrs, heights, widths, scales_hi, scales_mid, scales_lo, NUM_LEVELS: tl.constexpr,
           ACC: tl.constexpr):
    """Pointer, height, width and spatial scale of level lvl (a runtime index), selected from the scalar
    arguments. A scale arrives as three float32 parts whose sum is its exact float64 value."""
    ptr = ptrs[0]
    height = tl.cast(heights[0], tl.int32)
    width = tl.cast(widths[0], tl.int32)
    hi = tl.cast(scales_hi[0], tl.float32)
    mid = tl.cast(scales_mid[0], tl.float32)
    lo = tl.cast(scales_lo[0], tl.float32)
    for j in tl.static_range(1, NUM_LEVELS):
        this = lvl == j
        ptr = tl.where(this, ptrs[j], ptr)
        height = tl.where(this, heights[j], height)
        width = tl.where(this, widths[j], width)
        hi = tl.where(this, scales_hi[j], hi)
        mid = tl.where(this, scales_mid[j], mid)
        lo = tl.where(this, scales_lo[j], lo)
    scale = hi.to(ACC)
    if ACC == tl.float64:
        scale = scale + mid.to(ACC) + lo.to(ACC)
    return ptr, height, width, scale


@triton.jit
def _axis(lo, hi, scale, p, size, on, POOLED: tl.constexpr, ALIGNED: tl.constexpr, SAMPLING: tl.constexpr,
          ACC: tl.constexpr):
    """One axis of the RoI on a level, as torchvision's roi_align computes it: start, bin size, samples per bin
    (a float, like torchvision's grid) and, per lane's bin p, the first sample index; plus how many samples the
    loop visits (0 when the level is off).

    Adaptive sampling (SAMPLING == 0): ceil(roi / pooled) samples, 0 for a NaN or negative size. Only samples
    within [-1, size] add anything and consecutive samples are at least half a pixel apart once there is more
    than one, so at most 2 * size + 6 of them per bin are visited, starting at the first that may lie at or
    after -1: a huge or infinite box costs a bounded loop, and the result is still torchvision's sum over all
    samples divided by their full count.
    """
    offset = 0.5 if ALIGNED else 0.0
    start = lo * scale - offset
    roi = hi * scale - offset - start
    if not ALIGNED:
        # As std::max in torchvision: a NaN size stays NaN (and samples nothing).
        roi = tl.maximum(roi, 1.0, propagate_nan=NAN)
    bin_size = roi / POOLED
    if SAMPLING == 0:
        g = tl.ceil(roi / POOLED)
        g = tl.where(g > 0, g, 0.0)
        steps = tl.where(on, tl.minimum(g, tl.cast(2 * size + 6, ACC)), 0.0).to(tl.int32)
        first = tl.ceil((-1.0 - start - p * bin_size) / (bin_size / g) - 0.5) - 1.0
        # NaN (empty grid, NaN box) -> 0.
        first = tl.minimum(tl.maximum(first, 0.0), g)
    else:
        g = tl.cast(SAMPLING, ACC)
        steps = SAMPLING
        first = 0.0
    return start, bin_size, g, steps, first


@triton.jit
def _sample(start, bin_size, p, i, g, size, SAMPLING: tl.constexpr, ACC: tl.constexpr):
    """Sample i of each lane's bin p along an axis: low and high neighbours, weight of the high one, validity."""
    i = tl.cast(i, ACC)
    t = start + p * bin_size + ((i + 0.5) * bin_size) / g
    inside = (t >= -1.0) & (t <= tl.cast(size, ACC))
    if SAMPLING == 0:
        inside = inside & (i < g)
    t = tl.where(inside, tl.maximum(t, 0.0), 0.0)
    low = t.to(tl.int32)
    at_edge = low >= size - 1
    low = tl.where(at_edge, size - 1, low)
    high = tl.where(at_edge, low, low + 1)
    t = tl.where(at_edge, low.to(ACC), t)
    return low, high, t - low.to(ACC), inside


@triton.jit
def _image(feat, b, chan, C, H, W, CHANNELS_LAST: tl.constexpr, IDX: tl.constexpr):
    """Pointer to image b of a level plus each lane's channel offsets, and the stride of one pixel.

    Offsets inside one image have type IDX: int32 unless an image holds 2**31 elements or more; the image's
    own offset is always 64-bit.
    """
    HW = H.to(IDX) * W
    img = feat + b * C * HW.to(tl.int64)
    if CHANNELS_LAST:
        return img + chan.to(IDX), tl.cast(C, IDX)
    return img + chan.to(IDX) * HW, tl.cast(1, IDX)


@triton.jit
def _bin_offsets(chan, bins, stride_c, stride_ph, stride_pw, PW: tl.constexpr):
    """64-bit offsets of the lanes' outputs within one RoI's output (or incoming gradient, of any strides)."""
    return (chan.to(tl.int64) * stride_c
            + ((bins // PW).to(tl.int64) * stride_ph + (bins % PW).to(tl.int64) * stride_pw)[:, None])


@triton.jit
def _load_roi(rois_ptr, k, N, ACC: tl.constexpr):
    """Batch index (0 when invalid), its validity, and the corners of RoI k."""
    row = rois_ptr + k * 5
    b = tl.load(row).to(ACC)
    # NaN fails both comparisons, so a NaN index is invalid too.
    valid = (b >= 0) & (b < N)
    return (tl.where(valid, b, 0).to(tl.int64), valid, tl.load(row + 1).to(ACC), tl.load(row + 2).to(ACC),
            tl.load(row + 3).to(ACC), tl.load(row + 4).to(ACC))


@triton.autotune(configs=FWD_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _roi_align_fwd_kernel(
    out_ptr, rois_ptr, feats, heights, widths, scales, scales_mid, scales_lo,
    N, C, canonical_scale, canonical_level, finest_scale,
    o_stride_l, o_stride_k, o_stride_c, o_stride_ph, o_stride_pw,
    PH: tl.constexpr, PW: tl.constexpr, NUM_LEVELS: tl.constexpr, MODE: tl.constexpr, K_MIN: tl.constexpr,
    ALIGNED: tl.constexpr, SAMPLING: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
    ACC: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
):
    IDX: tl.constexpr = tl.int64 if INDEX64 else tl.int32
    k, bins, chan, lane_mask = _program(C, PH, PW, V, BLOCK, CHANNELS_LAST)
    py = (bins // PW).to(ACC)
    px = (bins % PW).to(ACC)
    b, b_valid, x1, y1, x2, y2 = _load_roi(rois_ptr, k, N, ACC)
    lvl_lo, lvl_hi = _level_range(x1, y1, x2, y2, b_valid, canonical_scale, canonical_level, finest_scale,
                                  K_MIN, NUM_LEVELS, MODE)
    out = out_ptr + k * o_stride_k + _bin_offsets(chan, bins, o_stride_c, o_stride_ph, o_stride_pw, PW)
    acc = tl.zeros([BLOCK, V], ACC)
    for lvl in range(lvl_lo, lvl_hi):
        feat, H, W, scale = _level(lvl, feats, heights, widths, scales, scales_mid, scales_lo, NUM_LEVELS, ACC)
        on = b_valid & (H > 0) & (W > 0)
        # tl.where, not &: the interpreter cannot & a scalar from a load with a block.
        level_mask = tl.where(on, lane_mask, False)
        img, pix_stride = _image(feat, b, chan, C, H, W, CHANNELS_LAST, IDX)
        start_h, bin_h, gh, steps_h, first_y = _axis(y1, y2, scale, py, H, on, PH, ALIGNED, SAMPLING, ACC)
        start_w, bin_w, gw, steps_w, first_x = _axis(x1, x2, scale, px, W, on, PW, ALIGNED, SAMPLING, ACC)
        level_acc = tl.zeros([BLOCK, V], ACC)
        for iy in range(0, steps_h):
            y_lo, y_hi, ly, y_in = _sample(start_h, bin_h, py, first_y + iy, gh, H, SAMPLING, ACC)
            row_lo = y_lo.to(IDX) * W
            row_hi = y_hi.to(IDX) * W
            hy = 1.0 - ly
            for ix in range(0, steps_w):
                x_lo, x_hi, lx, x_in = _sample(start_w, bin_w, px, first_x + ix, gw, W, SAMPLING, ACC)
                m = (y_in & x_in)[:, None] & level_mask
                v1 = tl.load(img + ((row_lo + x_lo) * pix_stride)[:, None], mask=m, other=0.0).to(ACC)
                v2 = tl.load(img + ((row_lo + x_hi) * pix_stride)[:, None], mask=m, other=0.0).to(ACC)
                v3 = tl.load(img + ((row_hi + x_lo) * pix_stride)[:, None], mask=m, other=0.0).to(ACC)
                v4 = tl.load(img + ((row_hi + x_hi) * pix_stride)[:, None], mask=m, other=0.0).to(ACC)
                hx = 1.0 - lx
                level_acc += ((hy * hx)[:, None] * v1 + (hy * lx)[:, None] * v2
                              + (ly * hx)[:, None] * v3 + (ly * lx)[:, None] * v4)
        count = tl.maximum(gh * gw, 1.0)
        if MODE == _PER_LEVEL:
            tl.store(out + tl.cast(o_stride_l, tl.int64) * lvl, (level_acc / count).to(out_ptr.dtype.element_ty),
                     mask=lane_mask)
        else:
            acc += level_acc / count
    if MODE != _PER_LEVEL:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=lane_mask)


@triton.jit
def _scatter(ptrs, value, mask, fixed_scale, FIXED_POINT: tl.constexpr):
    """Add value into the gradient: a float atomic, or (FIXED_POINT) an int64 atomic of value * fixed_scale.

    Integer addition is associative, so the fixed-point sum does not depend on the order in which the
    atomics land: the deterministic backward. Non-finite values are dropped here (the launcher turns the
    whole gradient into NaN when the incoming gradient is not finite).
    """
    if FIXED_POINT:
        q = tl.floor(value * fixed_scale + 0.5)
        ok = mask & (tl.abs(q) < 4.0e18)
        tl.atomic_add(ptrs, tl.where(ok, q, 0.0).to(tl.int64), mask=ok, sem="relaxed")
    else:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")


@triton.autotune(configs=BWD_CONFIGS, key=AUTOTUNE_KEY + ["FIXED_POINT"],
                 prune_configs_by={"early_config_prune": _prune}, pre_hook=_zero_grads)
@triton.jit
def _roi_align_bwd_kernel(
    grad_out_ptr, rois_ptr, grads, fixed_scale_ptr, heights, widths, scales, scales_mid, scales_lo,
    N, C, canonical_scale, canonical_level, finest_scale,
    g_stride_l, g_stride_k, g_stride_c, g_stride_ph, g_stride_pw,
    PH: tl.constexpr, PW: tl.constexpr, NUM_LEVELS: tl.constexpr, MODE: tl.constexpr, K_MIN: tl.constexpr,
    ALIGNED: tl.constexpr, SAMPLING: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
    FIXED_POINT: tl.constexpr, ACC: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
):
    IDX: tl.constexpr = tl.int64 if INDEX64 else tl.int32
    k, bins, chan, lane_mask = _program(C, PH, PW, V, BLOCK, CHANNELS_LAST)
    py = (bins // PW).to(ACC)
    px = (bins % PW).to(ACC)
    b, b_valid, x1, y1, x2, y2 = _load_roi(rois_ptr, k, N, ACC)
    lvl_lo, lvl_hi = _level_range(x1, y1, x2, y2, b_valid, canonical_scale, canonical_level, finest_scale,
                                  K_MIN, NUM_LEVELS, MODE)
    fixed_scale = tl.load(fixed_scale_ptr).to(ACC) if FIXED_POINT else 1.0
    grad_out = grad_out_ptr + k * g_stride_k + _bin_offsets(chan, bins, g_stride_c, g_stride_ph, g_stride_pw, PW)
    if MODE != _PER_LEVEL:
        # One incoming gradient for every level: read it once.
        g_all = tl.load(grad_out, mask=tl.where(b_valid, lane_mask, False), other=0.0).to(ACC)
    for lvl in range(lvl_lo, lvl_hi):
        grad, H, W, scale = _level(lvl, grads, heights, widths, scales, scales_mid, scales_lo, NUM_LEVELS, ACC)
        on = b_valid & (H > 0) & (W > 0)
        level_mask = tl.where(on, lane_mask, False)
        img, pix_stride = _image(grad, b, chan, C, H, W, CHANNELS_LAST, IDX)
        start_h, bin_h, gh, steps_h, first_y = _axis(y1, y2, scale, py, H, on, PH, ALIGNED, SAMPLING, ACC)
        start_w, bin_w, gw, steps_w, first_x = _axis(x1, x2, scale, px, W, on, PW, ALIGNED, SAMPLING, ACC)
        if MODE == _PER_LEVEL:
            g = tl.load(grad_out + tl.cast(g_stride_l, tl.int64) * lvl, mask=level_mask, other=0.0).to(ACC)
        else:
            g = g_all
        g_level = g / tl.maximum(gh * gw, 1.0)
        for iy in range(0, steps_h):
            y_lo, y_hi, ly, y_in = _sample(start_h, bin_h, py, first_y + iy, gh, H, SAMPLING, ACC)
            row_lo = y_lo.to(IDX) * W
            row_hi = y_hi.to(IDX) * W
            hy = 1.0 - ly
            for ix in range(0, steps_w):
                x_lo, x_hi, lx, x_in = _sample(start_w, bin_w, px, first_x + ix, gw, W, SAMPLING, ACC)
                m = (y_in & x_in)[:, None] & level_mask
                hx = 1.0 - lx
                _scatter(img + ((row_lo + x_lo) * pix_stride)[:, None], (hy * hx)[:, None] * g_level, m,
                         fixed_scale, FIXED_POINT)
                _scatter(img + ((row_lo + x_hi) * pix_stride)[:, None], (hy * lx)[:, None] * g_level, m,
                         fixed_scale, FIXED_POINT)
                _scatter(img + ((row_hi + x_lo) * pix_stride)[:, None], (ly * hx)[:, None] * g_level, m,
                         fixed_scale, FIXED_POINT)
                _scatter(img + ((row_hi + x_hi) * pix_stride)[:, None], (ly * lx)[:, None] * g_level, m,
                         fixed_scale, FIXED_POINT)


_TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}

# Variants the compile report builds: (name, kernel, constexpr overrides). The GRoIE default case (4 levels,
# 7x7, sampling_ratio 2, aligned) in both layouts, plus the per-level, level-mapped and adaptive paths.
_VARIANTS = [
    ("roi_align_fwd[sum]", "fwd", {}),
    ("roi_align_fwd[sum,channels_last]", "fwd", {"CHANNELS_LAST": True}),
    ("roi_align_fwd[stack]", "fwd", {"MODE": PER_LEVEL}),
    ("roi_align_fwd[map_torchvision]", "fwd", {"MODE": MAP_TORCHVISION}),
    ("roi_align_fwd[single,adaptive]", "fwd", {"NUM_LEVELS": 1, "SAMPLING": 0, "ALIGNED": False}),
    ("roi_align_fwd[sum,index64]", "fwd", {"INDEX64": True}),
    ("roi_align_bwd[sum]", "bwd", {}),
    ("roi_align_bwd[sum,channels_last]", "bwd", {"CHANNELS_LAST": True}),
    ("roi_align_bwd[stack]", "bwd", {"MODE": PER_LEVEL}),
    ("roi_align_bwd[map_torchvision]", "bwd", {"MODE": MAP_TORCHVISION}),
    ("roi_align_bwd[single,adaptive]", "bwd", {"NUM_LEVELS": 1, "SAMPLING": 0, "ALIGNED": False}),
    ("roi_align_bwd[sum,deterministic]", "bwd", {"FIXED_POINT": True}),
]


def compile_specs(dtypes=("float32", "float16", "bfloat16", "float64")) -> list[dict]:
    """Every (variant, shipped config, dtype) to compile for real GPU targets, for the compile report.

    ``outputs_per_program``: output elements one program writes per pass over a level (BLOCK lanes x V
    channels), the denominator of the report's instructions per output (the level loop is not unrolled on
    NVIDIA: its body is in the code once, whatever the number of levels).
    """
    specs = []
    for name, which, overrides in _VARIANTS:
        tuner = _roi_align_fwd_kernel if which == "fwd" else _roi_align_bwd_kernel
        for dtype in dtypes:
            t = _TRITON_DTYPES[dtype]
            fp64 = dtype == "float64"
            constexprs = {"PH": 7, "PW": 7, "NUM_LEVELS": 4, "MODE": SUM, "K_MIN": 2, "ALIGNED": True,
                          "SAMPLING": 2, "CHANNELS_LAST": False, "INDEX64": False,
                          "ACC": tl.float64 if fp64 else tl.float32, **overrides}
            if which == "bwd":
                constexprs.setdefault("FIXED_POINT", False)
            levels = constexprs["NUM_LEVELS"]
            grad_t = "i64" if constexprs.get("FIXED_POINT") else ("fp64" if fp64 else "fp32")
            types = {"out_ptr": f"*{t}", "grad_out_ptr": f"*{t}", "rois_ptr": "*fp32", "feats": (f"*{t}",) * levels,
                     "grads": (f"*{grad_t}",) * levels, "fixed_scale_ptr": "*fp64", "heights": ("i32",) * levels,
                     "widths": ("i32",) * levels, "scales": ("fp32",) * levels,
                     "scales_mid": ("fp32",) * levels, "scales_lo": ("fp32",) * levels, "canonical_scale": "fp32",
                     "canonical_level": "fp32", "finest_scale": "fp32"}
            for config in configs_for(tuner.configs, fp64):
                values = {**constexprs, **config.kwargs}
                specs.append({
                    "kernel": name, "fn": tuner.fn, "config": config,
                    "config_name": f"v{config.kwargs['V']}_w{config.num_warps}"
                    + (f"_r{config.maxnreg}" if config.maxnreg else ""),
                    "dtype": dtype,
                    "signature": {arg: "constexpr" if arg in values else types.get(arg, "i32")
                                  for arg in tuner.fn.arg_names},
                    "constexprs": values,
                    "outputs_per_program": config.kwargs["V"] * config.kwargs["BLOCK"],
                })
    return specs


def grid(num_rois: int, channels: int, pooled: int):
    """Launch grid of both kernels: one program per (RoI, chunk of BLOCK lanes), all on grid axis x."""

    def size(meta):
        lanes = triton.cdiv(channels, meta["V"]) * pooled
        if lanes >= 2**31:
            raise ValueError(f"{channels} channels x {pooled} bins per RoI: the kernels index at most 2**31 - 1 "
                             "lanes per RoI")
        programs = num_rois * triton.cdiv(lanes, meta["BLOCK"])
        if programs >= 2**31:
            raise ValueError(f"{num_rois} RoIs x {channels} channels x {pooled} bins need {programs} programs; "
                             "one launch holds at most 2**31 - 1: split the RoIs")
        return (programs,)

    return size
