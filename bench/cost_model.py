"""DRAM bytes, kernel launches and host syncs of each provider, op by op: the numbers a GPU run is judged by.

Every provider is written out as the ops PyTorch dispatches for it (``aten::add_``,
``torchvision::roi_align``, ``groie::roi_align`` ...), each with the kernels it launches on a GPU and the
bytes they move. The op list is checked against what the provider really dispatches (:func:`dispatched_ops`,
tests/test_bench.py); what happens inside an op (torchvision's zero-filled output, our zero-filled
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
same op, written out as the ATen ops its implementation dispatches (:func:`deterministic_backward_inner`,
checked in tests/test_bench.py) around one scatter of int64 fixed-point atomics (8 bytes read and written per
atomic). Deterministic mode also fills memory it allocates uninitialised
(``torch.utils.deterministic.fill_uninitialized_memory``): the buffers of ``zeros_like``, the copies of
``_to_copy`` and the output of ``linalg_vector_norm`` get one more fill kernel each, counted here (read from a
CPU profile: the fills run inside the dispatched ops, below what ``TorchDispatchMode`` sees).

What is not modelled: sector granularity (an NCHW gather wastes part of each 32-byte sector, channels_last
does not), L2 hits between kernels, and the CPU cost of launching (which the launch count stands for).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "H100_SXM_BYTES_PER_S",
    "ITEMSIZE",
    "PROVIDERS",
    "MODES",
    "Kernel",
    "Op",
    "Cost",
    "Problem",
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
    """One GPU kernel (or none, when it works on zero elements): what it does and the bytes it moves."""

    what: str
    read: int
    written: int
    launches: int = 1


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


@dataclass(frozen=True)
class Problem:
    """What the cost depends on: pyramid, RoIs, output, dtype and layout.

    ``level_counts``: RoIs that torchvision's LevelMapper sends to each level (the one-level providers pool
    only those). ``boxes_per_image``: RoIs of each image (the box-list providers concatenate them).
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

    def gathered(self, lvl: int, k: int, dtype: str) -> int:
        corners = k * self.output_size**2 * self.sampling_ratio**2 * 4 * self.channels * _STORAGE[dtype]
        return min(corners, self.level(lvl, dtype))


def _kernel(what: str, read: int, written: int, elements: int = 1) -> Kernel:
    return Kernel(what, read, written, launches=1 if elements > 0 else 0)


def _op(name: str, *kernels: Kernel, host_syncs: int = 0) -> Op:
    return Op(name, tuple(kernels), host_syncs)


def _cast(what: str, src: int, dst: int, elements: int = 1) -> Op:
    return _op("aten::_to_copy", _kernel(what, src, dst, elements))


# ------------------------------------------------------------------------------------------------- groie
def _groie_forward(p: Problem) -> list[Op]:
    k, d = p.num_rois, p.dtype
    gathered = sum(p.gathered(lvl, k, d) for lvl in range(p.num_levels))
    return [
        _op(
            "groie::roi_align",
            _kernel(
                f"fused RoIAlign: every RoI on all {p.num_levels} levels, summed in registers, written once",
                p.rois(k, "fp32") + gathered,
                p.out(k, d),
            ),
        )
    ]


def _fused_backward(p: Problem, counts: list[int], what: str) -> list[Op]:
    """groie::roi_align_backward: zeroed accumulation buffers, one scatter kernel, casts for half types."""
    d, acc = p.dtype, p.acc
    kernels = [_kernel(f"zero-fill level {lvl} gradient ({acc})", 0, p.level(lvl, acc)) for lvl in range(p.num_levels)]
    scattered = sum(p.gathered(lvl, counts[lvl], acc) for lvl in range(p.num_levels))
    kernels.append(_kernel(what, p.rois(p.num_rois, "fp32") + p.out(p.num_rois, d) + scattered, scattered))
    if d != acc:
        kernels += [
            _kernel(f"cast level {lvl} gradient {acc}->{d}", p.level(lvl, acc), p.level(lvl, d))
            for lvl in range(p.num_levels)
        ]
    return [_op("groie::roi_align_backward", *kernels)]


def _groie_backward(p: Problem) -> list[Op]:
    counts = [p.num_rois] * p.num_levels
    return _fused_backward(p, counts, "fused scatter: grad read once, atomic adds into every level")


# -------------------------------------------------------------------------------------------------- loop
def _tv_roi_align(p: Problem, lvl: int, k: int, index_read: int = 0) -> Op:
    """torchvision::roi_align on k RoIs: zeroed output, NCHW copy of a channels_last level, the kernel."""
    c = p.tv
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
        _kernel(f"torchvision RoIAlign on level {lvl}", p.rois(k, c) + p.gathered(lvl, k, c), p.out(k, c), k)
    )
    return _op("torchvision::roi_align", *kernels)


def _tv_roi_align_backward(p: Problem, lvl: int, k: int) -> Op:
    """torchvision::_roi_align_backward: zero-filled level gradient (even for k == 0), scatter kernel."""
    c = p.tv
    scattered = p.gathered(lvl, k, c)
    return _op(
        "torchvision::_roi_align_backward",
        _kernel(f"torchvision zero-fills the level {lvl} gradient", 0, p.level(lvl, c)),
        _kernel(
            f"torchvision scatter into level {lvl}: reads the whole grad, atomic adds",
            p.rois(k, c) + p.out(k, c) + scattered,
            scattered,
            k,
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
        ops.append(_tv_roi_align(p, lvl, k))
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
    ops += [_tv_roi_align_backward(p, lvl, k) for lvl in reversed(range(p.num_levels))]
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
            _tv_roi_align(p, lvl, n),
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
        ops.append(_tv_roi_align_backward(p, lvl, n))
    if d != c:
        ops += [
            _cast(f"level {lvl} gradient {c}->{d}", p.level(lvl, c), p.level(lvl, d)) for lvl in range(p.num_levels)
        ]
    return ops


def _single_forward(p: Problem) -> list[Op]:
    k, d = p.num_rois, p.dtype
    gathered = sum(p.gathered(lvl, n, d) for lvl, n in enumerate(p.level_counts))
    return _boxes_to_rois(p, "fp32") + [
        _op(
            "groie::roi_align",
            _kernel(
                "fused RoIAlign: level chosen in-kernel, one level per RoI, written once",
                p.rois(k, "fp32") + gathered,
                p.out(k, d),
            ),
        )
    ]


def _single_backward(p: Problem) -> list[Op]:
    return _fused_backward(p, list(p.level_counts), "fused scatter: grad read once, atomic adds into its level")


# ---------------------------------------------------------------------------------- groie_deterministic
def _det_fill(what: str, written: int) -> Kernel:
    return _kernel(f"deterministic mode fills the uninitialised {what}", 0, written)


def deterministic_backward_inner(p: Problem) -> list[Op]:
    """The ATen ops inside groie::roi_align_backward under torch.use_deterministic_algorithms(True), in order.

    ops.py ``_backward_triton``: max |grad| in float64 (one reduction) and a fixed-point scale (scalars), one
    zeroed int64 buffer per level, the scatter of int64 atomics, an unscale factor (NaN when the gradient is not
    finite), then per level ``g.to(acc).mul_(unscale).to(dtype)`` (acc: float64 for float64, else float32).
    Deterministic mode also fills what it allocates uninitialised (the norm's output, each copy, each buffer).
    """
    k, d, f64, i64 = p.num_rois, p.dtype, "fp64", "int64"
    acc = f64 if d == f64 else "fp32"
    f, a = ITEMSIZE[f64], ITEMSIZE[acc]
    ops = [
        _op("aten::linalg_vector_norm", _det_fill("float64 max|grad|", f),
            _kernel("max |grad| in float64 (a reduction to one scalar)", p.out(k, d), f)),
        _op("aten::clamp_min", _kernel("scale: amax.clamp_min(2**-1000)", f, f)),
        _op("aten::reciprocal", _kernel("scale: 1 / amax", f, f)),
        _op("aten::mul", _kernel("scale: 2**(62 - headroom) / amax", f, f)),
        _op("aten::clamp_max", _kernel("scale: clamp_max(2**120)", f, f)),
    ]
    ops += [
        _op(
            "aten::zeros_like",
            _det_fill(f"level {lvl} int64 buffer (empty_like)", p.level(lvl, i64)),
            _kernel(f"zero-fill level {lvl} gradient (int64)", 0, p.level(lvl, i64)),
        )
        for lvl in range(p.num_levels)
    ]
    ops += [
        _op("aten::reciprocal", _kernel("unscale: 1 / scale", f, f)),
        _op("aten::sub", _kernel("amax - amax: 0, or NaN when the gradient is not finite", 2 * f, f)),
        _op("aten::add", _kernel("unscale + (amax - amax)", 2 * f, f)),
        _op("aten::_to_copy", _det_fill(f"{acc} unscale", a), _kernel(f"unscale to {acc}", f, a)),
    ]
    for lvl in range(p.num_levels):
        ops += [
            _op(
                "aten::_to_copy",
                _det_fill(f"level {lvl} {acc} copy", p.level(lvl, acc)),
                _kernel(f"level {lvl} int64 -> {acc}", p.level(lvl, i64), p.level(lvl, acc)),
            ),
            _op("aten::mul_", _kernel(f"level {lvl} * unscale", p.level(lvl, acc) + a, p.level(lvl, acc))),
        ]
        if d != acc:
            ops.append(
                _op(
                    "aten::_to_copy",
                    _det_fill(f"level {lvl} {d} gradient", p.level(lvl, d)),
                    _kernel(f"level {lvl} gradient {acc} -> {d}", p.level(lvl, acc), p.level(lvl, d)),
                )
            )
    return ops


def _deterministic_backward(p: Problem) -> list[Op]:
    """groie::roi_align_backward under torch.use_deterministic_algorithms(True): one dispatched op, whose
    kernels are those of :func:`deterministic_backward_inner` plus the fixed-point scatter."""
    inner = deterministic_backward_inner(p)
    at = next(i for i, op in enumerate(inner) if op.name == "aten::reciprocal" and i > 2)  # the scatter runs here
    scattered = sum(p.gathered(lvl, p.num_rois, "int64") for lvl in range(p.num_levels))
    scatter = _kernel(
        "fused scatter: grad read once, int64 fixed-point atomic adds into every level",
        p.rois(p.num_rois, "fp32") + p.out(p.num_rois, p.dtype) + ITEMSIZE["fp64"] + scattered,
        scattered,
    )
    before, after = ([kn for op in ops for kn in op.kernels] for ops in (inner[:at], inner[at:]))
    kernels = [*before, scatter, *after]
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
