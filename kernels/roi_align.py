"""Multi-level RoIAlign kernels: one forward and one backward launch for 1 to MAX_LEVELS pyramid levels.

One program per (RoI, channel block). The RoI is read once; for each level the program walks the output bins
in tiles of BLOCK_BINS x BLOCK_C, samples the bilinear grid and accumulates in fp32 (fp64 for fp64 input)
registers. MODE says what happens across levels:

    SUM             every level into one accumulator, one write            -> [K, C, ph, pw]
    PER_LEVEL       every level written to its own slice (concat, stack)   -> strided view
    MAP_TORCHVISION one level per RoI, torchvision's LevelMapper, in-kernel -> [K, C, ph, pw]
    MAP_MMDET       one level per RoI, mmdetection's mapping, in-kernel    -> [K, C, ph, pw]

Feature maps are contiguous NCHW or channels_last (CHANNELS_LAST); the launcher makes anything else
contiguous. Every level is its own pointer (a tuple argument), never a copy of the pyramid into one buffer.
Offsets are 64-bit. Out-of-range or NaN batch indices, NaN/Inf boxes and empty levels are masked here so
that nothing is read or written out of bounds and no host check is needed.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

MAX_LEVELS = 8

SUM, PER_LEVEL, MAP_TORCHVISION, MAP_MMDET = 0, 1, 2, 3
NAN = tl.constexpr(tl.PropagateNan.ALL)

# Tiles stay small: a [64 bins x 64 channels] fp32 tile with 2x2 samples was measured at 255 registers and
# spilled; [8-32 bins x 32-64 channels] tiles do not (see `python -m groie_triton.compile_report`).
# (BLOCK_BINS, BLOCK_C, num_warps). Tiles stay small: at most 8 accumulator elements per thread (4 for
# float64, whose values take two registers). maxnreg=255 lets ptxas keep what a tile needs in registers
# instead of spilling to reach an occupancy target of 128 or 168 registers (it did, 16-24 bytes, for 4 of
# these configs). Every config is spill-free on sm_80, sm_90 and gfx942: `python -m groie_triton.compile_report`.
_TILES = [(16, 32, 2), (16, 32, 4), (32, 32, 4), (64, 16, 4), (16, 16, 2), (32, 16, 4), (64, 32, 8)]
FWD_CONFIGS = [triton.Config({"BLOCK_BINS": b, "BLOCK_C": c}, num_warps=w, num_stages=1, maxnreg=255)
               for b, c, w in _TILES]
BWD_CONFIGS = [triton.Config({"BLOCK_BINS": b, "BLOCK_C": c}, num_warps=w, num_stages=1, maxnreg=255)
               for b, c, w in _TILES]


def _elements_per_thread(config) -> int:
    return config.kwargs["BLOCK_BINS"] * config.kwargs["BLOCK_C"] // (32 * config.num_warps)


def configs_for(configs, fp64: bool) -> list:
    """The configs shipped for an accumulation dtype (float64 accumulators need twice the registers)."""
    budget = 4 if fp64 else 8
    return [c for c in configs if _elements_per_thread(c) <= budget]


# What changes the best config; never the number of RoIs, so a new batch does not re-tune.
AUTOTUNE_KEY = ["C", "PH", "PW", "NUM_LEVELS", "MODE", "CHANNELS_LAST", "ADAPTIVE", "sampling_ratio"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _prune(configs, named_args, **kwargs):
    configs = configs_for(configs, kwargs["ACC"] == tl.float64)
    # The interpreter has no benchmarker ("0 active drivers"): keep the largest tile, which also interprets
    # fastest. GPU runs benchmark every config.
    if _interpreting():
        return [max(configs, key=lambda c: (c.kwargs["BLOCK_BINS"] * c.kwargs["BLOCK_C"], c.kwargs["BLOCK_BINS"]))]
    return configs


def _zero_grads(nargs, reset_only=False):
    # reset_to_zero for a tuple argument: the kernel accumulates with atomic_add, and autotune trials run it
    # several times; without the reset the first call would return a multiple of the gradient.
    for grad in nargs["grads"]:
        grad.zero_()


@triton.jit
def _roi_program(rois_ptr, N, C, canonical_scale, canonical_level, finest_scale, K_MIN: tl.constexpr,
                 NUM_LEVELS: tl.constexpr, MODE: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """This program's RoI and channel block: RoI index, channels, batch index and its validity, corners and
    (mapping modes) the one level it is pooled from."""
    k = tl.program_id(0).to(tl.int64)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row = rois_ptr + k * 5
    b = tl.load(row).to(ACC)
    x1 = tl.load(row + 1).to(ACC)
    y1 = tl.load(row + 2).to(ACC)
    x2 = tl.load(row + 3).to(ACC)
    y2 = tl.load(row + 4).to(ACC)
    # NaN fails both comparisons, so a NaN index is invalid too.
    b_valid = (b >= 0) & (b < N)
    b_index = tl.where(b_valid, b, 0).to(tl.int64)
    if MODE >= 2:
        target = _target_level(x1, y1, x2, y2, canonical_scale, canonical_level, finest_scale, K_MIN,
                               NUM_LEVELS, MODE)
    else:
        target = 0
    return k, c_offs, c_offs < C, b_index, b_valid, x1, y1, x2, y2, target


@triton.jit
def _target_level(x1, y1, x2, y2, canonical_scale, canonical_level, finest_scale, K_MIN: tl.constexpr,
                  NUM_LEVELS: tl.constexpr, MODE: tl.constexpr):
    """Index of the one level a RoI is pooled from (mapping modes); -1 when its area is not finite."""
    size = tl.sqrt((x2 - x1) * (y2 - y1))
    if MODE == 2:
        lvl = tl.floor(canonical_level + tl.log2(size / canonical_scale) + 1e-6)
        lvl = tl.maximum(lvl, K_MIN, propagate_nan=NAN)
        lvl = tl.minimum(lvl, K_MIN + NUM_LEVELS - 1, propagate_nan=NAN) - K_MIN
    else:
        lvl = tl.floor(tl.log2(size / finest_scale + 1e-6))
        lvl = tl.minimum(tl.maximum(lvl, 0, propagate_nan=NAN), NUM_LEVELS - 1, propagate_nan=NAN)
    # NaN (negative or NaN area) survives the clamp as NaN; it selects no level.
    return tl.where(lvl == lvl, lvl, -1).to(tl.int32)


@triton.jit
def _level_scale(hi, mid, lo, ACC: tl.constexpr):
    """A level's spatial scale: float32 arguments hi + mid + lo add up to the exact float64 value."""
    scale = tl.cast(hi, ACC)
    if ACC == tl.float64:
        scale = scale + tl.cast(mid, ACC) + tl.cast(lo, ACC)
    return scale


@triton.jit
def _level_setup(lvl: tl.constexpr, height, width, scale_hi, scale_mid, scale_lo, x1, y1, x2, y2, b_valid, target,
                 sampling_ratio, py, px, PH: tl.constexpr, PW: tl.constexpr, MODE: tl.constexpr,
                 ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr, ACC: tl.constexpr):
    """RoI geometry on level lvl, as torchvision's roi_align computes it, plus the library's guards; and, per
    bin of the tile (py, px), the first sample index the loops visit."""
    # tl.cast: a size of 1 arrives as a specialised constexpr, not a tensor.
    H = tl.cast(height, tl.int32)
    W = tl.cast(width, tl.int32)
    enabled = b_valid
    if MODE >= 2:
        enabled = enabled & (target == lvl)
    scale = _level_scale(scale_hi, scale_mid, scale_lo, ACC)
    offset = 0.5 if ALIGNED else 0.0
    start_w = x1 * scale - offset
    start_h = y1 * scale - offset
    roi_w = x2 * scale - offset - start_w
    roi_h = y2 * scale - offset - start_h
    if not ALIGNED:
        # As std::max in torchvision: a NaN size stays NaN (and samples nothing).
        roi_w = tl.maximum(roi_w, 1.0, propagate_nan=NAN)
        roi_h = tl.maximum(roi_h, 1.0, propagate_nan=NAN)
    bin_w = roi_w / PW
    bin_h = roi_h / PH
    # A disabled level (bad batch index, empty map, other level chosen) runs no sample.
    on = enabled & (H > 0) & (W > 0)
    gh, steps_h = _axis_grid(roi_h, H, sampling_ratio, on, PH, ADAPTIVE, ACC)
    gw, steps_w = _axis_grid(roi_w, W, sampling_ratio, on, PW, ADAPTIVE, ACC)
    count = tl.maximum(gh * gw, 1.0)
    first_y = _first_sample(start_h, bin_h, py.to(ACC), gh, ADAPTIVE)
    first_x = _first_sample(start_w, bin_w, px.to(ACC), gw, ADAPTIVE)
    return H, W, start_w, start_h, bin_w, bin_h, gh, gw, steps_h, steps_w, first_y, first_x, count


@triton.jit
def _axis_grid(roi_size, size, sampling_ratio, on, POOLED: tl.constexpr, ADAPTIVE: tl.constexpr,
               ACC: tl.constexpr):
    """Samples per bin along an axis (a float, as torchvision's grid) and how many of them the loop visits.

    Adaptive: ceil(roi / pooled) samples, 0 for a NaN or negative size. Only samples within [-1, size] add
    anything, and consecutive samples are at least half a pixel apart once there is more than one, so at
    most 2 * size + 6 of them per bin are visited (see _first_sample): a huge or infinite box costs a
    bounded loop, and the result is still torchvision's sum over all samples divided by their full count.
    """
    if ADAPTIVE:
        g = tl.ceil(roi_size / POOLED)
        g = tl.where(g > 0, g, 0.0)
        steps = tl.minimum(g, tl.cast(2 * size + 6, ACC))
    else:
        g = tl.cast(sampling_ratio, ACC)
        steps = g
    return g, tl.where(on, steps, 0.0).to(tl.int32)


@triton.jit
def _first_sample(start, bin_size, p_f, g, ADAPTIVE: tl.constexpr):
    """Per bin, the index of the first sample that may lie at or after -1 (one early, for rounding)."""
    if ADAPTIVE:
        step = bin_size / g
        first = tl.ceil((-1.0 - start - p_f * bin_size) / step - 0.5) - 1.0
        # NaN (empty grid, NaN box) -> 0.
        return tl.minimum(tl.maximum(first, 0.0), g)
    else:
        return 0.0


@triton.jit
def _axis_sample(start, bin_size, p_f, i_f, g, size, ACC: tl.constexpr):
    """Sample i_f of each bin along an axis: low/high neighbours, weight of the high one, validity."""
    i_f = tl.cast(i_f, ACC)
    t = start + p_f * bin_size + ((i_f + 0.5) * bin_size) / g
    inside = tl.where(i_f < g, (t >= -1.0) & (t <= tl.cast(size, ACC)), False)
    t = tl.where(inside, tl.maximum(t, 0.0), 0.0)
    low = t.to(tl.int32)
    at_edge = low >= size - 1
    low = tl.where(at_edge, size - 1, low)
    high = tl.where(at_edge, low, low + 1)
    t = tl.where(at_edge, low.to(ACC), t)
    frac = t - low.to(ACC)
    return low, high, frac, inside


@triton.jit
def _image_level(feat, b, c_offs, C, H, W, CHANNELS_LAST: tl.constexpr, IDX: tl.constexpr):
    """Pointer to image b of a level, the channel part of element offsets, and the stride of one pixel.

    Offsets inside one image have type IDX: int32 unless an image holds 2**31 elements or more; the image's
    own offset is always 64-bit.
    """
    HW = H.to(IDX) * W
    img = feat + b * C * HW.to(tl.int64)
    if CHANNELS_LAST:
        return img, c_offs.to(IDX), tl.cast(C, IDX)
    return img, c_offs.to(IDX) * HW, tl.cast(1, IDX)


@triton.autotune(
    configs=FWD_CONFIGS,
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _roi_align_fwd_kernel(
    out_ptr, rois_ptr, feats, heights, widths, scales, scales_mid, scales_lo,
    N, C, sampling_ratio, canonical_scale, canonical_level, finest_scale,
    o_stride_l, o_stride_k, o_stride_c, o_stride_ph, o_stride_pw,
    PH: tl.constexpr, PW: tl.constexpr, NUM_LEVELS: tl.constexpr, MODE: tl.constexpr, K_MIN: tl.constexpr,
    ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
    ACC: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    IDX: tl.constexpr = tl.int64 if INDEX64 else tl.int32
    k, c_offs, c_mask, b, b_valid, x1, y1, x2, y2, target = _roi_program(
        rois_ptr, N, C, canonical_scale, canonical_level, finest_scale, K_MIN, NUM_LEVELS, MODE, BLOCK_C, ACC)
    for bin0 in range(0, PH * PW, BLOCK_BINS):
        bins = bin0 + tl.arange(0, BLOCK_BINS)
        bin_mask = bins < PH * PW
        py = bins // PW
        px = bins % PW
        acc = tl.zeros([BLOCK_BINS, BLOCK_C], ACC)
        for lvl in tl.static_range(NUM_LEVELS):
            H, W, start_w, start_h, bin_w, bin_h, gh, gw, steps_h, steps_w, first_y, first_x, count = _level_setup(
                lvl, heights[lvl], widths[lvl], scales[lvl], scales_mid[lvl], scales_lo[lvl], x1, y1, x2, y2,
                b_valid, target, sampling_ratio, py, px, PH, PW, MODE, ALIGNED, ADAPTIVE, ACC)
            img, chan, pix_stride = _image_level(feats[lvl], b, c_offs, C, H, W, CHANNELS_LAST, IDX)
            chan = chan[None, :]
            lvl_acc = tl.zeros([BLOCK_BINS, BLOCK_C], ACC)
            for iy in range(0, steps_h):
                y_lo, y_hi, ly, y_in = _axis_sample(start_h, bin_h, py.to(ACC), first_y + iy, gh, H, ACC)
                hy = 1.0 - ly
                row_lo = y_lo.to(IDX) * W
                row_hi = y_hi.to(IDX) * W
                for ix in range(0, steps_w):
                    x_lo, x_hi, lx, x_in = _axis_sample(start_w, bin_w, px.to(ACC), first_x + ix, gw, W, ACC)
                    hx = 1.0 - lx
                    m = (y_in & x_in & bin_mask)[:, None] & c_mask[None, :]
                    v1 = tl.load(img + chan + ((row_lo + x_lo) * pix_stride)[:, None], mask=m, other=0.0).to(ACC)
                    v2 = tl.load(img + chan + ((row_lo + x_hi) * pix_stride)[:, None], mask=m, other=0.0).to(ACC)
                    v3 = tl.load(img + chan + ((row_hi + x_lo) * pix_stride)[:, None], mask=m, other=0.0).to(ACC)
                    v4 = tl.load(img + chan + ((row_hi + x_hi) * pix_stride)[:, None], mask=m, other=0.0).to(ACC)
                    lvl_acc += ((hy * hx)[:, None] * v1 + (hy * lx)[:, None] * v2
                                + (ly * hx)[:, None] * v3 + (ly * lx)[:, None] * v4)
            if MODE == 1:
                o = (out_ptr + tl.cast(o_stride_l, tl.int64) * lvl + k * o_stride_k
                     + c_offs[None, :].to(tl.int64) * o_stride_c + (py * o_stride_ph + px * o_stride_pw)[:, None])
                tl.store(o, (lvl_acc / count).to(out_ptr.dtype.element_ty),
                         mask=bin_mask[:, None] & c_mask[None, :])
            else:
                acc += lvl_acc / count
        if MODE != 1:
            o = (out_ptr + k * o_stride_k + c_offs[None, :].to(tl.int64) * o_stride_c
                 + (py * o_stride_ph + px * o_stride_pw)[:, None])
            tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=bin_mask[:, None] & c_mask[None, :])


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


@triton.autotune(
    configs=BWD_CONFIGS,
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
    pre_hook=_zero_grads,
)
@triton.jit
def _roi_align_bwd_kernel(
    grad_out_ptr, rois_ptr, grads, fixed_scale_ptr, heights, widths, scales, scales_mid, scales_lo,
    N, C, sampling_ratio, canonical_scale, canonical_level, finest_scale,
    g_stride_l, g_stride_k, g_stride_c, g_stride_ph, g_stride_pw,
    PH: tl.constexpr, PW: tl.constexpr, NUM_LEVELS: tl.constexpr, MODE: tl.constexpr, K_MIN: tl.constexpr,
    ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX64: tl.constexpr,
    FIXED_POINT: tl.constexpr, ACC: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    IDX: tl.constexpr = tl.int64 if INDEX64 else tl.int32
    k, c_offs, c_mask, b, b_valid, x1, y1, x2, y2, target = _roi_program(
        rois_ptr, N, C, canonical_scale, canonical_level, finest_scale, K_MIN, NUM_LEVELS, MODE, BLOCK_C, ACC)
    fixed_scale = tl.load(fixed_scale_ptr).to(ACC) if FIXED_POINT else 1.0
    for bin0 in range(0, PH * PW, BLOCK_BINS):
        bins = bin0 + tl.arange(0, BLOCK_BINS)
        bin_mask = bins < PH * PW
        py = bins // PW
        px = bins % PW
        tile_mask = bin_mask[:, None] & c_mask[None, :]
        for lvl in tl.static_range(NUM_LEVELS):
            H, W, start_w, start_h, bin_w, bin_h, gh, gw, steps_h, steps_w, first_y, first_x, count = _level_setup(
                lvl, heights[lvl], widths[lvl], scales[lvl], scales_mid[lvl], scales_lo[lvl], x1, y1, x2, y2,
                b_valid, target, sampling_ratio, py, px, PH, PW, MODE, ALIGNED, ADAPTIVE, ACC)
            img, chan, pix_stride = _image_level(grads[lvl], b, c_offs, C, H, W, CHANNELS_LAST, IDX)
            chan = chan[None, :]
            g_level = tl.cast(g_stride_l, tl.int64) * lvl if MODE == 1 else 0
            g = tl.load(grad_out_ptr + g_level + k * g_stride_k + c_offs[None, :].to(tl.int64) * g_stride_c
                        + (py * g_stride_ph + px * g_stride_pw)[:, None],
                        mask=tile_mask & (steps_h > 0), other=0.0).to(ACC) / count
            for iy in range(0, steps_h):
                y_lo, y_hi, ly, y_in = _axis_sample(start_h, bin_h, py.to(ACC), first_y + iy, gh, H, ACC)
                hy = 1.0 - ly
                row_lo = y_lo.to(IDX) * W
                row_hi = y_hi.to(IDX) * W
                for ix in range(0, steps_w):
                    x_lo, x_hi, lx, x_in = _axis_sample(start_w, bin_w, px.to(ACC), first_x + ix, gw, W, ACC)
                    hx = 1.0 - lx
                    m = (y_in & x_in)[:, None] & tile_mask
                    _scatter(img + chan + ((row_lo + x_lo) * pix_stride)[:, None], (hy * hx)[:, None] * g, m,
                             fixed_scale, FIXED_POINT)
                    _scatter(img + chan + ((row_lo + x_hi) * pix_stride)[:, None], (hy * lx)[:, None] * g, m,
                             fixed_scale, FIXED_POINT)
                    _scatter(img + chan + ((row_hi + x_lo) * pix_stride)[:, None], (ly * hx)[:, None] * g, m,
                             fixed_scale, FIXED_POINT)
                    _scatter(img + chan + ((row_hi + x_hi) * pix_stride)[:, None], (ly * lx)[:, None] * g, m,
                             fixed_scale, FIXED_POINT)


_TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}

# Variants the compile report builds: (name, kernel, constexpr overrides). The GRoIE default case (4 levels,
# 7x7, sampling_ratio 2, aligned) in both layouts, plus the per-level, level-mapped and adaptive paths.
_VARIANTS = [
    ("roi_align_fwd[sum]", "fwd", {}),
    ("roi_align_fwd[sum,channels_last]", "fwd", {"CHANNELS_LAST": True}),
    ("roi_align_fwd[stack]", "fwd", {"MODE": PER_LEVEL}),
    ("roi_align_fwd[map_torchvision]", "fwd", {"MODE": MAP_TORCHVISION}),
    ("roi_align_fwd[single,adaptive]", "fwd", {"NUM_LEVELS": 1, "ADAPTIVE": True, "ALIGNED": False}),
    ("roi_align_bwd[sum]", "bwd", {}),
    ("roi_align_bwd[sum,channels_last]", "bwd", {"CHANNELS_LAST": True}),
    ("roi_align_bwd[sum,deterministic]", "bwd", {"FIXED_POINT": True}),
]


def compile_specs(dtypes=("float32", "float16", "bfloat16", "float64")) -> list[dict]:
    """Every (variant, shipped config, dtype) to compile for real GPU targets, for the compile report."""
    import triton.language as tl

    specs = []
    for name, which, overrides in _VARIANTS:
        tuner = _roi_align_fwd_kernel if which == "fwd" else _roi_align_bwd_kernel
        for dtype in dtypes:
            t = _TRITON_DTYPES[dtype]
            constexprs = {"PH": 7, "PW": 7, "NUM_LEVELS": 4, "MODE": SUM, "K_MIN": 2, "ALIGNED": True,
                          "ADAPTIVE": False, "CHANNELS_LAST": False, "INDEX64": False,
                          "ACC": tl.float64 if dtype == "float64" else tl.float32, **overrides}
            if which == "bwd":
                constexprs.setdefault("FIXED_POINT", False)
            levels = constexprs["NUM_LEVELS"]
            grad_t = "i64" if constexprs.get("FIXED_POINT") else ("fp64" if dtype == "float64" else "fp32")
            types = {"out_ptr": f"*{t}", "grad_out_ptr": f"*{t}", "rois_ptr": "*fp32", "feats": (f"*{t}",) * levels,
                     "grads": (f"*{grad_t}",) * levels, "fixed_scale_ptr": "*fp64", "heights": ("i32",) * levels,
                     "widths": ("i32",) * levels, "scales": ("fp32",) * levels,
                     "scales_mid": ("fp32",) * levels, "scales_lo": ("fp32",) * levels, "canonical_scale": "fp32",
                     "canonical_level": "fp32", "finest_scale": "fp32"}
            for config in configs_for(tuner.configs, dtype == "float64"):
                values = {**constexprs, **config.kwargs}
                specs.append({
                    "kernel": name, "fn": tuner.fn, "config": config,
                    "config_name": "bins{BLOCK_BINS}_c{BLOCK_C}".format(**config.kwargs)
                    + f"_w{config.num_warps}_s{config.num_stages}",
                    "dtype": dtype,
                    "signature": {arg: "constexpr" if arg in values else types.get(arg, "i32")
                                  for arg in tuner.fn.arg_names},
                    "constexprs": values,
                })
    return specs
