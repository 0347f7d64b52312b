"""DRAM bytes, kernel launches and host syncs of each provider, op by op: the numbers a GPU run is judged by.

Every provider is written out as the ops PyTorch dispatches for it (``aten::add_``,
``torchvision::roi_align``, ``groie::roi_align`` ...), each with the kernels it launches on a GPU and the
bytes they move. The op list is checked against what the provider really dispatches (:func:`dispatched_ops`,
tests/bench/test_bench_suite.py); what happens inside an op (torchvision's zero-filled output, our zero-filled
gradients) is read from the sources.

Byte model (DRAM traffic, no L2 reuse across kernels, every element counted at its storage size):

- A bilinear sample reads 4 corners per channel, so a RoI on a level with ``sampling_ratio**2`` samples per
  bin gathers ``bins * sampling_ratio**2 * 4 * C`` elements. Gathered bytes of a level are that, times the
  RoIs pooled from it, bounded by the level's size (a level read many times over is served by the cache;
  it is never read from DRAM more than once per kernel):
      gathered(level, k) = min(k * ph * pw * sampling_ratio**2 * 4 * C * itemsize, N * C * H * W * itemsize)
- A backward scatter with atomic adds is a read-modify-write of the same bytes: it reads and writes
  ``gathered(level, k)`` at the gradient buffer's itemsize.
- Elementwise kernels read their inputs and write their output once; a zero fill only writes.
- RoIs are ``K x 5`` values; index tensors are int64; masks are 1 byte per RoI.
- Ops on zero elements launch nothing (torchvision returns early for a level without RoIs).
- ``aten::nonzero`` (``torch.where(mask)``) is counted as one launch and one host sync; on CUDA it is a few
  CUB kernels and a device-to-host copy, so the baseline's count is a lower bound.

Deterministic backward (provider ``groie_deterministic``, ``torch.use_deterministic_algorithms(True)``): the
same op, written out once (:func:`_deterministic_steps`) as the ATen ops its implementation dispatches
(:func:`deterministic_backward_inner`, checked in tests/bench/test_bench_suite.py) around one scatter of int64
fixed-point atomics (8 bytes read and written per atomic). Deterministic mode also fills memory it allocates
uninitialised (``torch.utils.deterministic.fill_uninitialized_memory``): the buffers of ``zeros_like``, the copies of
``_to_copy`` and the output of ``linalg_vector_norm`` get one more fill kernel each, counted here (read from a
CPU profile: the fills run inside the dispatched ops, below what ``TorchDispatchMode`` sees).

Sector model (``Cost.sector_bytes``, the records' ``modeled_sector_bytes``): DRAM moves 32-byte sectors, so a
warp's gather costs the distinct sectors its 32 lanes touch, not the bytes they use. The bilinear gathers and
scatters are counted per warp load (:func:`warp_load_sectors`), from the kernels' lane layouts:

- groie's kernels (one program per RoI; lanes over the RoI's flattened (channel group, bin), ``vector``
  contiguous channels per lane). NCHW: lanes are bin-fast, so a warp covers 32 consecutive bins of one
  channel group (two groups where it straddles their boundary); each corner load touches, per channel, the
  distinct (row, x // (32 / itemsize)) of its valid lanes. channels_last: lanes are channel-fast, a warp
  loads ``32 * vector`` consecutive channels of one pixel: ``ceil(C * itemsize / 32)`` sectors per pixel.
- torchvision's kernel (one thread per output element, index ((k * C + c) * ph + y) * pw + x): a warp covers
  32 consecutive bins of one channel, which is the NCHW pattern above with one channel per lane; it always
  reads NCHW (a channels_last input is copied first).

NCHW counts are exact enumerations of the sample coordinates (torchvision's bilinear rules: samples outside
[-1, size] load nothing, corners clamped at the border) for an evenly spaced sample of at most
:data:`SECTOR_SAMPLE_ROIS` RoIs per level (those the level mapper sends there, for the one-level
providers), scaled to all of them. Only valid samples load, in both layouts. The total is bounded by the
level's size as in the byte model; where that bound binds (every level of the GRoIE default case), bytes and
sectors agree, and the unbounded figures (``bounded=False``; :func:`bench.report.gather_efficiency`) show
what the layouts request. The model assumes one program covers all channels of a RoI (a channel split
restarts the warp pattern at each chunk: a small change) and ``Problem.vector`` channels per lane (default
1: in NCHW the count barely depends on it). Every other kernel (fills, elementwise, the output, whose writes
are coalesced) moves whole sectors: sector bytes = bytes. A :class:`Problem` without :class:`Geometry`
falls back to the byte model.

What is not modelled: L1 hits between the corner loads of one warp, L2 hits between kernels, and the CPU cost
of launching (which the launch count stands for).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "H100_SXM_BYTES_PER_S",
    "ITEMSIZE",
    "PROVIDERS",
    "MODES",
    "Kernel",
    "Op",
    "Cost",
    "Problem",
    "Geometry",
    "SECTOR",
    "SECTOR_SAMPLE_ROIS",
    "warp_load_sectors",
    "cost",
    "dispatched_ops",
    "deterministic_backward_inner",
]

H100_SXM_BYTES_PER_S = 3.35e12
"""Peak HBM3 bandwidth of an H100 SXM, the roofline the model's times are quoted at."""

ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
PROVIDERS = ("groie", "loop", "torchvision_msra", "groie_single", "groie_deterministic")
MODES = ("forward", "backward", "forward_backward")
_INDEX = 8  # int64 index tensors
_MASK = 1  # bool
_STORAGE = {**ITEMSIZE, "int64": 8}  # sizes of buffers, which may also be int64 fixed-point accumulators


@dataclass(frozen=True)
class Kernel:
    """One GPU kernel (or none, when it works on zero elements): what it does and the bytes it moves.

    ``sector_read`` / ``sector_written``: the same traffic in whole 32-byte sectors where that differs (the
    gathers and scatters); None: coalesced, the bytes.
    """

    what: str
    read: int
    written: int
    launches: int = 1
    sector_read: int | None = None
    sector_written: int | None = None

    @property
    def sector_bytes(self) -> int:
        read = self.read if self.sector_read is None else self.sector_read
        return read + (self.written if self.sector_written is None else self.sector_written)


@dataclass(frozen=True)
class Op:
    """One dispatched op (as ``TorchDispatchMode`` names it, e.g. ``aten::add_``) and the kernels it runs."""

    name: str
    kernels: tuple[Kernel, ...]
    host_syncs: int = 0


@dataclass(frozen=True)
class Cost:
    """The ops of one provider and mode, with totals."""

    ops: tuple[Op, ...]

    @property
    def bytes(self) -> int:
        return sum(k.read + k.written for op in self.ops for k in op.kernels)

    @property
    def sector_bytes(self) -> int:
        """:attr:`bytes` counted in whole 32-byte sectors per warp load (see the module's sector model)."""
        return sum(k.sector_bytes for op in self.ops for k in op.kernels)

    @property
    def launches(self) -> int:
        return sum(k.launches for op in self.ops for k in op.kernels)

    @property
    def host_syncs(self) -> int:
        return sum(op.host_syncs for op in self.ops)

    def roofline_ms(self, bytes_per_s: float = H100_SXM_BYTES_PER_S) -> float:
        """Time to move :attr:`bytes` at ``bytes_per_s`` (default: H100 SXM), in milliseconds."""
        return self.bytes / bytes_per_s * 1e3

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.ops + other.ops)


SECTOR = 32
"""Bytes of a DRAM sector, the unit a warp's loads and atomics move."""
SECTOR_SAMPLE_ROIS = 16
"""RoIs per level whose sample coordinates the NCHW sector count enumerates (evenly spaced; scaled to all)."""


def _bilinear_axis(start: np.ndarray, bin_size: np.ndarray, bins: int, sampling_ratio: int, size: int):
    """(valid, low, high) of every sample along one axis, ``[R, bins, sampling_ratio]``, as torchvision's
    bilinear_interpolate: outside [-1, size] nothing loads; below 0 clamps to 0; at the border low = high."""
    p = np.arange(bins)[None, :, None]
    i = np.arange(sampling_ratio)[None, None, :]
    step = bin_size[:, None, None]
    c = start[:, None, None] + p * step + (i + 0.5) * step / sampling_ratio
    valid = (c >= -1.0) & (c <= size)
    low = np.floor(np.maximum(c, 0.0)).astype(np.int64)
    edge = low >= size - 1
    low = np.where(edge, size - 1, low)
    return valid, low, np.where(edge, size - 1, low + 1)


def warp_load_sectors(
    boxes: np.ndarray,
    scale: float,
    height: int,
    width: int,
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
    itemsize: int,
    channels: int,
    channels_last: bool,
    vector: int = 1,
) -> int:
    """32-byte sectors touched by the bilinear corner loads of RoIs ``boxes`` on one level, summed over warp
    loads (sector bytes = 32 x this).

    ``boxes``: ``[R, 4]`` (x1, y1, x2, y2) in image pixels; ``scale``: the level's spatial scale; ``vector``:
    channels per lane (groie's kernels; 1 for torchvision's). NCHW: lanes over the RoI's flattened (channel
    group, bin), bin fast, 32 to a warp; each warp load touches, per channel, the distinct
    (row, x // (32 / itemsize)) of its valid lanes. channels_last: ``ceil(C * itemsize / 32)`` sectors per
    valid sample corner (a warp loads 32 x ``vector`` consecutive channels of one pixel).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return 0
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i] * scale - offset for i in range(4))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = np.maximum(roi_w, 1.0), np.maximum(roi_h, 1.0)
    o, sr = output_size, sampling_ratio
    vy, ylo, yhi = _bilinear_axis(y1, roi_h / o, o, sr, height)
    vx, xlo, xhi = _bilinear_axis(x1, roi_w / o, o, sr, width)
    if channels_last:
        valid = vy.sum(axis=(1, 2)) * vx.sum(axis=(1, 2))  # valid samples per RoI
        return int(valid.sum()) * 4 * -(-channels * itemsize // SECTOR)
    per_sector = max(SECTOR // itemsize, 1)
    row_sectors = -(-width // per_sector)
    rows = np.stack([ylo, yhi], -1)[:, :, None, :, None, :, None]  # [R, ph, 1, sr, 1, 2, 1]
    cols = np.stack([xlo, xhi], -1)[:, None, :, None, :, None, :] // per_sector  # [R, 1, pw, 1, sr, 1, 2]
    valid = vy[:, :, None, :, None, None, None] & vx[:, None, :, None, :, None, None]
    keys = np.where(valid, rows * row_sectors + cols, -1)
    bins = o * o
    keys = keys.reshape(len(boxes), bins, -1)  # [R, bin, load]: a load = (sample y, sample x, corner)
    span = height * row_sectors  # keys of one channel group are below this
    lanes = -(-channels // vector) * bins
    starts = np.arange(0, lanes, 32)
    total = 0
    for length in sorted({min(32, lanes - s) for s in starts}):
        chosen = starts[np.minimum(32, lanes - starts) == length]
        residues, warps = np.unique(chosen % bins, return_counts=True)
        flat = residues[:, None] + np.arange(length)[None, :]  # [residue, lane]
        k = keys[:, flat % bins, :]  # [R, residue, lane, load]
        k = np.where(k >= 0, k + (flat // bins)[None, :, :, None] * span, -1)
        k = np.sort(k, axis=2)
        distinct = (k[:, :, 0] >= 0) + ((k[:, :, 1:] != k[:, :, :-1]) & (k[:, :, 1:] >= 0)).sum(axis=2)
        total += int((distinct.sum(axis=(0, 2)) * warps).sum())
    return vector * total


@dataclass(eq=False)
class Geometry:
    """Where the RoIs sample: what the sector model enumerates.

    ``boxes``: ``[K, 4]`` in image pixels (all images, in RoI order); ``levels``: the level torchvision's
    LevelMapper sends each RoI to; ``scales``: each level's spatial scale.
    """

    boxes: np.ndarray
    levels: np.ndarray
    scales: tuple[float, ...]
    _cache: dict = field(default_factory=dict, repr=False)

    def sample(self, lvl: int | None) -> tuple[np.ndarray, int]:
        """At most :data:`SECTOR_SAMPLE_ROIS` evenly spaced boxes (of level ``lvl``; all RoIs for None), and
        how many RoIs they stand for."""
        boxes = self.boxes if lvl is None else self.boxes[self.levels == lvl]
        n = len(boxes)
        if n <= SECTOR_SAMPLE_ROIS:
            return boxes, n
        return boxes[np.linspace(0, n - 1, SECTOR_SAMPLE_ROIS).round().astype(np.int64)], n


@dataclass(frozen=True)
class Problem:
    """What the cost depends on: pyramid, RoIs, output, dtype and layout.

    ``level_counts``: RoIs that torchvision's LevelMapper sends to each level (the one-level providers pool
    only those). ``boxes_per_image``: RoIs of each image (the box-list providers concatenate them).
    ``geometry``: the boxes, for the sector model (None: sector bytes are the byte model's); ``vector``: the
    channels per lane the sector model assumes for groie's kernels.
    """

    n_images: int
    channels: int
    level_shapes: tuple[tuple[int, int], ...]
    boxes_per_image: tuple[int, ...]
    level_counts: tuple[int, ...]
    output_size: int
    sampling_ratio: int
    dtype: str
    channels_last: bool
    geometry: Geometry | None = field(default=None, compare=False, repr=False)
    vector: int = 1

    def __post_init__(self):
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"dtype must be one of {list(ITEMSIZE)}, got {self.dtype!r}")
        if len(self.level_counts) != len(self.level_shapes) or sum(self.level_counts) != self.num_rois:
            raise ValueError("level_counts must give one count per level and sum to the number of RoIs")
        if self.sampling_ratio <= 0:
            raise ValueError("the model needs a fixed sampling_ratio (> 0)")

    @property
    def num_rois(self) -> int:
        return sum(self.boxes_per_image)

    @property
    def num_levels(self) -> int:
        return len(self.level_shapes)

    @property
    def acc(self) -> str:
        """Dtype of the fused backward's gradient buffers (fp32 atomics for half types)."""
        return "fp64" if self.dtype == "fp64" else "fp32"

    @property
    def tv(self) -> str:
        """Dtype torchvision computes in: it has no bfloat16 kernel, so bf16 runs in fp32."""
        return "fp32" if self.dtype == "bf16" else self.dtype

    # Sizes in bytes.
    def level(self, lvl: int, dtype: str) -> int:
        h, w = self.level_shapes[lvl]
        return self.n_images * self.channels * h * w * _STORAGE[dtype]

    def out(self, k: int, dtype: str) -> int:
        return k * self.channels * self.output_size**2 * _STORAGE[dtype]

    def rois(self, k: int, dtype: str) -> int:
        return k * 5 * _STORAGE[dtype]

    def gathered(self, lvl: int, k: int, dtype: str, bounded: bool = True) -> int:
        """Bytes of the bilinear corners of ``k`` RoIs on level ``lvl``, at most the level's size (``bounded``)."""
        corners = k * self.output_size**2 * self.sampling_ratio**2 * 4 * self.channels * _STORAGE[dtype]
        return min(corners, self.level(lvl, dtype)) if bounded else corners

    def gathered_sectors(
        self, lvl: int, k: int, dtype: str, mapped: bool, torchvision: bool = False, bounded: bool = True
    ) -> int:
        """:meth:`gathered` in whole sectors per warp load, bounded by the level's size likewise (``bounded``).

        ``mapped``: the RoIs the level mapper sends to ``lvl`` (aligned=False, as torchvision's pooler) rather
        than every RoI (aligned=True); ``torchvision``: its kernel's layout (NCHW, one channel per thread).
        """
        if self.geometry is None or k == 0:
            return self.gathered(lvl, k, dtype, bounded)
        itemsize = _STORAGE[dtype]
        channels_last = self.channels_last and not torchvision
        vector = 1 if torchvision else self.vector
        key = (
            lvl,
            mapped,
            itemsize,
            channels_last,
            vector,
            self.channels,
            self.output_size,
            self.sampling_ratio,
            self.level_shapes[lvl],
        )
        g = self.geometry
        if key not in g._cache:
            boxes, n = g.sample(lvl if mapped else None)
            h, w = self.level_shapes[lvl]
            sectors = warp_load_sectors(
                boxes,
                g.scales[lvl],
                h,
                w,
                self.output_size,
                self.sampling_ratio,
                not mapped,
                itemsize,
                self.channels,
                channels_last,
                vector,
            )
            g._cache[key] = sectors * SECTOR / max(len(boxes), 1)  # per RoI
        sectors = round(g._cache[key] * k)
        return min(sectors, self.level(lvl, dtype)) if bounded else sectors


def _kernel(
    what: str,
    read: int,
    written: int,
    elements: int = 1,
    sector_read: int | None = None,
    sector_written: int | None = None,
) -> Kernel:
    return Kernel(what, read, written, 1 if elements > 0 else 0, sector_read, sector_written)


def _op(name: str, *kernels: Kernel, host_syncs: int = 0) -> Op:
    return Op(name, tuple(kernels), host_syncs)


def _cast(what: str, src: int, dst: int, elements: int = 1) -> Op:
    return _op("aten::_to_copy", _kernel(what, src, dst, elements))


# ------------------------------------------------------------------------------------------------- groie
def _groie_forward(p: Problem) -> list[Op]:
    k, d = p.num_rois, p.dtype
    gathered = sum(p.gathered(lvl, k, d) for lvl in range(p.num_levels))
    sectors = sum(p.gathered_sectors(lvl, k, d, mapped=False) for lvl in range(p.num_levels))
    return [
        _op(
            "groie::roi_align",
            _kernel(
                f"fused RoIAlign: every RoI on all {p.num_levels} levels, summed in registers, written once",
                p.rois(k, "fp32") + gathered,
                p.out(k, d),
                sector_read=p.rois(k, "fp32") + sectors,
            ),
        )
    ]


def _scattered(p: Problem, counts: list[int], dtype: str, mapped: bool) -> tuple[int, int]:
    """Bytes and sector bytes of a fused scatter into every level (``counts[lvl]`` RoIs each)."""
    levels = range(p.num_levels)
    return (
        sum(p.gathered(lvl, counts[lvl], dtype) for lvl in levels),
        sum(p.gathered_sectors(lvl, counts[lvl], dtype, mapped) for lvl in levels),
    )


def _fused_backward(p: Problem, counts: list[int], what: str, mapped: bool) -> list[Op]:
    """groie::roi_align_backward: zeroed accumulation buffers, one scatter kernel, casts for half types."""
    d, acc = p.dtype, p.acc
    kernels = [_kernel(f"zero-fill level {lvl} gradient ({acc})", 0, p.level(lvl, acc)) for lvl in range(p.num_levels)]
    scattered, sectors = _scattered(p, counts, acc, mapped)
    head = p.rois(p.num_rois, "fp32") + p.out(p.num_rois, d)
    kernels.append(_kernel(what, head + scattered, scattered, sector_read=head + sectors, sector_written=sectors))
    if d != acc:
        kernels += [
            _kernel(f"cast level {lvl} gradient {acc}->{d}", p.level(lvl, acc), p.level(lvl, d))
            for lvl in range(p.num_levels)
        ]
    return [_op("groie::roi_align_backward", *kernels)]


def _groie_backward(p: Problem) -> list[Op]:
    counts = [p.num_rois] * p.num_levels
    return _fused_backward(p, counts, "fused scatter: grad read once, atomic adds into every level", mapped=False)


# -------------------------------------------------------------------------------------------------- loop
def _tv_roi_align(p: Problem, lvl: int, k: int, mapped: bool) -> Op:
    """torchvision::roi_align on k RoIs: zeroed output, NCHW copy of a channels_last level, the kernel."""
    c = p.tv
    sectors = p.gathered_sectors(lvl, k, c, mapped, torchvision=True)
    kernels = [_kernel("torchvision zero-fills its output", 0, p.out(k, c), k)]
    if p.channels_last:
        kernels.append(
            _kernel(
                f"torchvision copies level {lvl} to NCHW (input.contiguous())",
                p.level(lvl, c),
                p.level(lvl, c),
                k,
            )
        )
    kernels.append(
        _kernel(
            f"torchvision RoIAlign on level {lvl}",
            p.rois(k, c) + p.gathered(lvl, k, c),
            p.out(k, c),
            k,
            sector_read=p.rois(k, c) + sectors,
        )
    )
    return _op("torchvision::roi_align", *kernels)


def _tv_roi_align_backward(p: Problem, lvl: int, k: int, mapped: bool) -> Op:
    """torchvision::_roi_align_backward: zero-filled level gradient (even for k == 0), scatter kernel."""
    c = p.tv
    scattered = p.gathered(lvl, k, c)
    sectors = p.gathered_sectors(lvl, k, c, mapped, torchvision=True)
    return _op(
        "torchvision::_roi_align_backward",
        _kernel(f"torchvision zero-fills the level {lvl} gradient", 0, p.level(lvl, c)),
        _kernel(
            f"torchvision scatter into level {lvl}: reads the whole grad, atomic adds",
            p.rois(k, c) + p.out(k, c) + scattered,
            scattered,
            k,
            sector_read=p.rois(k, c) + p.out(k, c) + sectors,
            sector_written=sectors,
        ),
    )


def _loop_forward(p: Problem) -> list[Op]:
    """mmdetection's sum: new_zeros, then out = out + level output, L times (in torchvision's dtype)."""
    k, d, c = p.num_rois, p.dtype, p.tv
    ops = []
    if d != c:
        ops += [
            _cast(f"cast level {lvl} {d}->{c} for torchvision", p.level(lvl, d), p.level(lvl, c))
            for lvl in range(p.num_levels)
        ]
    ops.append(_op("aten::new_zeros", _kernel("zero-fill the output", 0, p.out(k, c))))
    for lvl in range(p.num_levels):
        ops.append(_tv_roi_align(p, lvl, k, mapped=False))
        ops.append(_op("aten::add", _kernel(f"out = out + level {lvl} output", 2 * p.out(k, c), p.out(k, c))))
    if d != c:
        ops.append(_cast(f"sum {c}->{d}", p.out(k, c), p.out(k, d)))
    return ops


def _loop_backward(p: Problem) -> list[Op]:
    """The add passes the grad through; each level's torchvision backward reads all of it."""
    k, d, c = p.num_rois, p.dtype, p.tv
    ops = []
    if d != c:
        ops.append(_cast(f"grad {d}->{c}", p.out(k, d), p.out(k, c)))
    ops += [_tv_roi_align_backward(p, lvl, k, mapped=False) for lvl in reversed(range(p.num_levels))]
    if d != c:
        ops += [
            _cast(f"level {lvl} gradient {c}->{d}", p.level(lvl, c), p.level(lvl, d)) for lvl in range(p.num_levels)
        ]
    return ops


# ------------------------------------------------------------------------------ box lists (one level each)
def _boxes_to_rois(p: Problem, b: str) -> list[Op]:
    """torch.cat of the boxes, a batch-index column per image, two more cats: torchvision's and ours alike."""
    k = p.num_rois
    ops = [_op("aten::cat", _kernel("concatenate the boxes", k * 4 * ITEMSIZE[b], k * 4 * ITEMSIZE[b]))]
    ops += [
        _op("aten::full_like", _kernel(f"batch index column of image {i}", 0, n * ITEMSIZE[b], n))
        for i, n in enumerate(p.boxes_per_image)
    ]
    ops.append(_op("aten::cat", _kernel("concatenate the index columns", k * ITEMSIZE[b], k * ITEMSIZE[b])))
    ops.append(_op("aten::cat", _kernel("rois = [index, boxes]", p.rois(k, b), p.rois(k, b))))
    return ops


def _level_mapper(p: Problem, b: str) -> list[Op]:
    """torchvision's LevelMapper: box areas per image, then floor(4 + log2(sqrt(area) / 224) + eps), clamp."""
    k = p.num_rois
    a = b if b in ("fp32", "fp64") else "fp32"  # box_area upcasts half boxes
    s = ITEMSIZE[a]
    ops = []
    for i, n in enumerate(p.boxes_per_image):
        if a != b:
            ops.append(_cast(f"upcast the boxes of image {i} to {a}", n * 4 * ITEMSIZE[b], n * 4 * s, n))
        ops += [
            _op("aten::sub", _kernel(f"box width, image {i}", 2 * n * s, n * s, n)),
            _op("aten::sub", _kernel(f"box height, image {i}", 2 * n * s, n * s, n)),
            _op("aten::mul", _kernel(f"box area, image {i}", 2 * n * s, n * s, n)),
        ]
    ops.append(_op("aten::cat", _kernel("concatenate the areas", k * s, k * s)))
    for name in (
        "aten::sqrt",
        "aten::div",
        "aten::log2",
        "aten::add",
        "aten::add",
        "aten::floor",
        "aten::clamp",
    ):
        ops.append(_op(name, _kernel(f"level formula ({name.split('::')[1]})", k * s, k * s)))
    ops.append(_cast("levels to int64", k * s, k * _INDEX))
    ops.append(_op("aten::sub", _kernel("levels - k_min", k * _INDEX, k * _INDEX)))
    return ops


def _msra_forward(p: Problem) -> list[Op]:
    k, d, c = p.num_rois, p.dtype, p.tv
    ops = []
    if d != c:
        ops += [
            _cast(f"cast level {lvl} {d}->{c} for torchvision", p.level(lvl, d), p.level(lvl, c))
            for lvl in range(p.num_levels)
        ]
    ops += _boxes_to_rois(p, c) + _level_mapper(p, c)
    ops.append(_op("aten::zeros", _kernel("zero-fill the result", 0, p.out(k, c))))
    for lvl, n in enumerate(p.level_counts):
        ops += [
            _op("aten::eq", _kernel(f"levels == {lvl}", k * _INDEX, k * _MASK)),
            _op("aten::nonzero", _kernel(f"torch.where(levels == {lvl})", k * _MASK, n * _INDEX), host_syncs=1),
            _op("aten::index", _kernel(f"rois of level {lvl}", n * _INDEX + p.rois(n, c), p.rois(n, c), n)),
            _tv_roi_align(p, lvl, n, mapped=True),
            _op(
                "aten::index_put_",
                _kernel(f"result[idx] = level {lvl} output", n * _INDEX + p.out(n, c), p.out(n, c), n),
            ),
        ]
    if d != c:
        ops.append(_cast(f"result {c}->{d}", p.out(k, c), p.out(k, d)))
    return ops


def _msra_backward(p: Problem) -> list[Op]:
    k, d, c = p.num_rois, p.dtype, p.tv
    ops = []
    if d != c:
        ops.append(_cast(f"grad {d}->{c}", p.out(k, d), p.out(k, c)))
    for lvl in reversed(range(p.num_levels)):
        n = p.level_counts[lvl]
        if lvl > 0:
            # result[idx] = v on a result that needs grad: grad_self = grad.index_put(idx, zeros_like(v)).
            ops += [
                _op("aten::zeros", _kernel("zeros_like(level output)", 0, p.out(n, c), n)),
                _op(
                    "aten::index_put",
                    _kernel("clone the running grad", p.out(k, c), p.out(k, c)),
                    _kernel(f"zero the rows of level {lvl}", n * _INDEX + p.out(n, c), p.out(n, c), n),
                ),
            ]
        ops.append(_op("aten::index", _kernel(f"grad rows of level {lvl}", n * _INDEX + p.out(n, c), p.out(n, c), n)))
        if n == 1:
            # autograd's sum_to over the broadcastable dim of a one-row value: a copy.
            ops.append(_op("aten::sum", _kernel("sum_to of a one-RoI level", p.out(n, c), p.out(n, c))))
        ops.append(_tv_roi_align_backward(p, lvl, n, mapped=True))
    if d != c:
        ops += [
            _cast(f"level {lvl} gradient {c}->{d}", p.level(lvl, c), p.level(lvl, d)) for lvl in range(p.num_levels)
        ]
    return ops


def _single_forward(p: Problem) -> list[Op]:
    k, d = p.num_rois, p.dtype
    gathered = sum(p.gathered(lvl, n, d) for lvl, n in enumerate(p.level_counts))
    sectors = sum(p.gathered_sectors(lvl, n, d, mapped=True) for lvl, n in enumerate(p.level_counts))
    return _boxes_to_rois(p, "fp32") + [
        _op(
            "groie::roi_align",
            _kernel(
                "fused RoIAlign: level chosen in-kernel, one level per RoI, written once",
                p.rois(k, "fp32") + gathered,
                p.out(k, d),
                sector_read=p.rois(k, "fp32") + sectors,
            ),
        )
    ]


def _single_backward(p: Problem) -> list[Op]:
    return _fused_backward(
        p, list(p.level_counts), "fused scatter: grad read once, atomic adds into its level", mapped=True
    )


# ---------------------------------------------------------------------------------- groie_deterministic
def _det_fill(what: str, written: int) -> Kernel:
    return _kernel(f"deterministic mode fills the uninitialised {what}", 0, written)


_SCATTER = None
"""Marks, in :func:`_deterministic_steps`, where the fixed-point scatter kernel runs."""


def _deterministic_steps(p: Problem) -> list[Op | None]:
    """The deterministic backward, in order: the ATen ops it dispatches and :data:`_SCATTER`, its kernel.

    The one description both :func:`deterministic_backward_inner` (the op list, checked against what the
    real op dispatches) and :func:`_deterministic_backward` (its cost) are read from.

    ops/roi_align.py ``_backward_triton``: max |grad| in float64 (one reduction) and a fixed-point scale
    (scalars), one zeroed int64 buffer per level, the scatter of int64 atomics, an unscale factor (NaN when the
    gradient is not finite), then per level ``g.to(acc).mul_(unscale).to(dtype)`` (acc: float64 for float64,
    else float32). Deterministic mode also fills what it allocates uninitialised (the norm's output, each copy,
    each buffer).
    """
    k, d, f64, i64 = p.num_rois, p.dtype, "fp64", "int64"
    acc = f64 if d == f64 else "fp32"
    f, a = ITEMSIZE[f64], ITEMSIZE[acc]
    steps: list[Op | None] = [
        _op(
            "aten::linalg_vector_norm",
            _det_fill("float64 max|grad|", f),
            _kernel("max |grad| in float64 (a reduction to one scalar)", p.out(k, d), f),
        ),
        _op("aten::clamp_min", _kernel("scale: amax.clamp_min(2**-1000)", f, f)),
        _op("aten::reciprocal", _kernel("scale: 1 / amax", f, f)),
        _op("aten::mul", _kernel("scale: 2**(62 - headroom) / amax", f, f)),
        _op("aten::clamp_max", _kernel("scale: clamp_max(2**120)", f, f)),
    ]
    steps += [
        _op(
            "aten::zeros_like",
            _det_fill(f"level {lvl} int64 buffer (empty_like)", p.level(lvl, i64)),
            _kernel(f"zero-fill level {lvl} gradient (int64)", 0, p.level(lvl, i64)),
        )
        for lvl in range(p.num_levels)
    ]
    steps.append(_SCATTER)
    steps += [
        _op("aten::reciprocal", _kernel("unscale: 1 / scale", f, f)),
        _op("aten::sub", _kernel("amax - amax: 0, or NaN when the gradient is not finite", 2 * f, f)),
        _op("aten::add", _kernel("unscale + (amax - amax)", 2 * f, f)),
        _op("aten::_to_copy", _det_fill(f"{acc} unscale", a), _kernel(f"unscale to {acc}", f, a)),
    ]
    for lvl in range(p.num_levels):
        steps += [
            _op(
                "aten::_to_copy",
                _det_fill(f"level {lvl} {acc} copy", p.level(lvl, acc)),
                _kernel(f"level {lvl} int64 -> {acc}", p.level(lvl, i64), p.level(lvl, acc)),
            ),
            _op("aten::mul_", _kernel(f"level {lvl} * unscale", p.level(lvl, acc) + a, p.level(lvl, acc))),
        ]
        if d != acc:
            steps.append(
                _op(
                    "aten::_to_copy",
                    _det_fill(f"level {lvl} {d} gradient", p.level(lvl, d)),
                    _kernel(f"level {lvl} gradient {acc} -> {d}", p.level(lvl, acc), p.level(lvl, d)),
                )
            )
    return steps


def deterministic_backward_inner(p: Problem) -> list[Op]:
    """The ATen ops inside groie::roi_align_backward under torch.use_deterministic_algorithms(True), in order
    (:func:`_deterministic_steps` less the scatter kernel, which dispatches no ATen op)."""
    return [op for op in _deterministic_steps(p) if op is not _SCATTER]


def _deterministic_backward(p: Problem) -> list[Op]:
    """groie::roi_align_backward under torch.use_deterministic_algorithms(True): one dispatched op, whose
    kernels are those of :func:`_deterministic_steps`, the fixed-point scatter where it marks."""
    scattered, sectors = _scattered(p, [p.num_rois] * p.num_levels, "int64", mapped=False)
    head = p.rois(p.num_rois, "fp32") + p.out(p.num_rois, p.dtype) + ITEMSIZE["fp64"]
    scatter = _kernel(
        "fused scatter: grad read once, int64 fixed-point atomic adds into every level",
        head + scattered,
        scattered,
        sector_read=head + sectors,
        sector_written=sectors,
    )
    kernels = [kn for step in _deterministic_steps(p) for kn in ((scatter,) if step is _SCATTER else step.kernels)]
    return [_op("groie::roi_align_backward", *kernels)]


_FORWARD: dict[str, Callable[[Problem], list[Op]]] = {
    "groie": _groie_forward,
    "loop": _loop_forward,
    "torchvision_msra": _msra_forward,
    "groie_single": _single_forward,
    "groie_deterministic": _groie_forward,
}
_BACKWARD: dict[str, Callable[[Problem], list[Op]]] = {
    "groie": _groie_backward,
    "loop": _loop_backward,
    "torchvision_msra": _msra_backward,
    "groie_single": _single_backward,
    "groie_deterministic": _deterministic_backward,
}


def cost(problem: Problem, provider: str, mode: str) -> Cost:
    """The modelled ops of ``provider`` in ``mode`` ("forward", "backward" or "forward_backward").

    Backward is what ``torch.autograd.grad(out, features, grad_out)`` runs once the forward graph exists.
    Raises ValueError for an unknown provider or mode.
    """
    if provider not in _FORWARD:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    ops: list[Op] = []
    if mode in ("forward", "forward_backward"):
        ops += _FORWARD[provider](problem)
    if mode in ("backward", "forward_backward"):
        ops += _BACKWARD[provider](problem)
    return Cost(tuple(ops))


def dispatched_ops(fn: Callable[[], object]) -> Counter:
    """Count the ops ``fn`` dispatches (views and metadata-only ops left out), by name, e.g. ``aten::add_``.

    This is the device-independent part of the model: a CPU run of a provider dispatches the same ops as a
    CUDA run, so the op names of :func:`cost` can be checked here without a GPU.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: Counter = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                seen[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return seen
