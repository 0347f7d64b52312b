"""Training, COCO evaluation, checkpoints, DistributedDataParallel and the reference/Triton parity check.

Determinism is what makes resume and DDP checkable: the data are a pure function of the seed, the batch of
iteration ``i`` is a pure function of ``(seed, i)`` (an epoch permutation, then a slice), the learning rate
is a pure function of ``i``, and the only RNG consumer left (torchvision's RPN/RoI samplers, which draw
from the global torch generator) is saved in every checkpoint, one state per rank. A run resumed from a
checkpoint therefore ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from groie_triton.detection.data import ShapesDataset, build_dataset, coco_dict
from groie_triton.detection.models import ModelConfig, build_model, model_config_from_dict

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "DetectionError",
    "PRESETS",
    "TrainConfig",
    "batch_indices",
    "coco_evaluate",
    "collate",
    "evaluate",
    "experiment",
    "load_checkpoint",
    "lr_at",
    "parity",
    "predict",
    "train",
    "train_step",
]

CHECKPOINT_FORMAT = "groie_triton.detection/checkpoint-v1"
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class DetectionError(RuntimeError):
    """A user-facing error of the detection pipeline: the CLI prints it and exits non-zero."""


class CheckpointError(DetectionError):
    """A checkpoint is missing, unreadable, of another format, or does not match the requested model."""


@dataclass
class TrainConfig:
    """The schedule and data of a training run (stored in the checkpoint next to the model config).

    ``batch_size`` is the global batch (split evenly over DDP ranks). The learning rate warms up linearly
    over ``warmup_iters`` and is multiplied by ``lr_gamma`` at each fraction of ``iterations`` in
    ``lr_steps`` (the "1x" schedule's 8/12 and 11/12 by default).
    """

    dataset: str = "shapes"
    train_images: int = 512
    data_seed: int = 0
    iterations: int = 3000
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 200
    lr_steps: tuple[float, ...] = (8 / 12, 11 / 12)
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = 10.0
    hflip: bool = True
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        self.lr_steps = tuple(float(s) for s in self.lr_steps)
        if self.iterations <= 0:
            raise ValueError(f"iterations must be positive, got {self.iterations}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.train_images <= 0:
            raise ValueError(f"empty image list: train_images={self.train_images}")
        if self.batch_size > self.train_images:
            raise ValueError(f"batch_size {self.batch_size} exceeds the {self.train_images} training images")
        if self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be positive, got {self.checkpoint_every}")


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown train config keys: {', '.join(unknown)}")
    return TrainConfig(**data)


# Presets: "quick" fits a CPU smoke run in seconds (baseline; GRoIE's reference path is ~10x slower per
# step); "experiment" is the baseline-vs-GRoIE CPU comparison, estimated from per-iteration timings at
# ~0.5 s (baseline) and ~1 s (GRoIE) per iteration on 2 cores, i.e. roughly 15-35 min per model.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "model": dict(
            image_size=128,
            fpn_channels=32,
            mask_head_channels=32,
            representation_size=256,
            rpn_pre_nms_top_n_train=500,
            rpn_post_nms_top_n_train=200,
            rpn_pre_nms_top_n_test=200,
            rpn_post_nms_top_n_test=50,
            box_batch_size_per_image=64,
            box_detections_per_img=10,
        ),
        "train": dict(train_images=16, iterations=30, batch_size=2, lr=0.02, warmup_iters=5, checkpoint_every=10),
        "eval_images": 2,
    },
    "experiment": {
        "model": dict(
            image_size=256,
            fpn_channels=64,
            mask_head_channels=64,
            representation_size=512,
            rpn_pre_nms_top_n_train=1000,
            rpn_post_nms_top_n_train=500,
            rpn_pre_nms_top_n_test=500,
            rpn_post_nms_top_n_test=300,
            box_batch_size_per_image=128,
            box_detections_per_img=50,
        ),
        "train": dict(train_images=1024, iterations=2000, batch_size=2, lr=0.02, warmup_iters=200),
        "eval_images": 200,
    },
}


# ----------------------------------------------------------------------------------------------- data


def batch_indices(cfg: TrainConfig, num_images: int, iteration: int) -> list[int]:
    """Dataset indices of the global batch of ``iteration``: epoch permutations seeded by (seed, epoch)."""
    per_epoch = num_images // cfg.batch_size
    epoch, step = divmod(iteration, per_epoch)
    perm = np.random.default_rng([cfg.seed, epoch]).permutation(num_images)
    return [int(i) for i in perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]]


def _flip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def collate(
    dataset: ShapesDataset,
    indices: list[int],
    device: torch.device,
    *,
    hflip_seed: tuple[int, ...] | None = None,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Load ``indices`` as (images, targets) on ``device``; with ``hflip_seed``, flip each image with
    probability 1/2 decided by ``(hflip_seed, index)`` (deterministic, independent of rank and order)."""
    images, targets = [], []
    for index in indices:
        image, target = dataset[index]
        if hflip_seed is not None and np.random.default_rng([*hflip_seed, index]).random() < 0.5:
            image, target = _flip(image, target)
        images.append(image.to(device))
        targets.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in target.items()})
    return images, targets


# ------------------------------------------------------------------------------------------- training


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """Learning rate of ``iteration``: linear warmup from lr/1000, then step decay."""
    lr = cfg.lr * cfg.lr_gamma ** sum(iteration >= int(f * cfg.iterations) for f in cfg.lr_steps)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        lr *= 1e-3 * (1 - alpha) + alpha
    return lr


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: list[torch.Tensor],
    targets: list[dict[str, Any]],
    *,
    clip_grad_norm: float | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
) -> dict[str, float]:
    """One SGD step on a batch; returns the loss components and their sum (``"loss"``) as floats.

    ``before_step(model)`` runs after backward (and the DDP all-reduce) and before the optimizer step.
    Raises DetectionError if the loss is not finite.
    """
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise DetectionError(f"training diverged: loss is {loss.item()} ({ {k: v.item() for k, v in losses.items()} })")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step(model)
    if clip_grad_norm:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optimizer.step()
    out = {k: v.item() for k, v in losses.items()}
    out["loss"] = loss.item()
    return out


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _init_distributed(device: torch.device) -> _Dist:
    """Join the process group torchrun (or a test) describes in RANK / WORLD_SIZE / MASTER_ADDR / PORT."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    info = _Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """Parse a device name; raises DetectionError for unknown names or an absent CUDA device."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DetectionError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DetectionError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise DetectionError(f"unsupported device {name!r}; use cpu or cuda[:N]")
    return device


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so an interruption never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, *, extractor: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`train`.

    ``extractor`` / ``model``, when given, must match what the checkpoint was trained with. Raises
    CheckpointError (with the path and the reason) for a missing, unreadable or foreign file, or a mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file; all mean the same here
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a groie_triton detection checkpoint (format {CHECKPOINT_FORMAT})")
    missing = {"model_config", "train_config", "model", "iteration"} - set(ckpt)
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(sorted(missing))}")
    stored = ckpt["model_config"]
    for key, wanted in (("extractor", extractor), ("model", model)):
        if wanted is not None and stored.get(key) != wanted:
            raise CheckpointError(
                f"checkpoint {path} holds a {stored.get('model')} with {key} {stored.get(key)!r}, "
                f"but {key} {wanted!r} was requested; train a {wanted!r} checkpoint or drop the option"
            )
    return ckpt


def _canonical(config: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(config))


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [
        f"{k}: checkpoint {a.get(k)!r} vs requested {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


# Inference-only settings an evaluation may change without touching the trained weights.
TEST_TIME_KEYS = (
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test",
    "box_detections_per_img",
    "box_score_thresh",
)


def _model_from_checkpoint(
    ckpt: dict[str, Any], device: torch.device, test_overrides: dict[str, Any] | None = None
) -> nn.Module:
    overrides = {k: v for k, v in (test_overrides or {}).items() if v is not None}
    bad = sorted(set(overrides) - set(TEST_TIME_KEYS))
    if bad:
        raise ValueError(f"only test-time settings can be overridden at evaluation, not {', '.join(bad)}")
    try:
        cfg = model_config_from_dict({**ckpt["model_config"], **overrides})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint has an invalid model config: {exc}") from None
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit its model config: {exc}") from None
    return model.to(device)


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    before_step: Callable[[int, nn.Module], None] | None = None,
    log_every: int = 10,
) -> dict[str, Any]:
    """Train ``model_cfg`` on ``train_cfg`` and write ``out_dir/last.pt``; returns a summary dict.

    Checkpoints every ``train_cfg.checkpoint_every`` iterations and at the end. ``resume=True`` continues
    from ``out_dir/last.pt`` (which must hold the same model and train configs). ``stop_after=N`` stops
    after iteration N without a final checkpoint, as an interrupted run would (for testing resume).
    Under torchrun (``WORLD_SIZE`` > 1) each rank trains on its share of every global batch under
    DistributedDataParallel (gloo on CPU, nccl on CUDA); rank 0 writes the checkpoints.
    ``before_step(iteration, model)`` runs after each backward (testing hook).
    """
    device_t = resolve_device(device)
    dist_info = _init_distributed(device_t)
    if device_t.type == "cuda" and dist_info.enabled:
        device_t = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device_t)
    if train_cfg.batch_size % dist_info.world_size:
        raise DetectionError(
            f"global batch_size {train_cfg.batch_size} is not divisible by world size {dist_info.world_size}"
        )
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "last.pt"
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path, extractor=model_cfg.extractor, model=model_cfg.model)
        diff = _config_diff(_canonical(ckpt["model_config"]), _canonical(model_cfg.to_dict()))
        diff += _config_diff(_canonical(ckpt["train_config"]), _canonical(asdict(train_cfg)))
        if diff:
            raise CheckpointError(f"cannot resume from {ckpt_path}: configuration differs ({'; '.join(diff)})")
        if ckpt.get("world_size", 1) != dist_info.world_size:
            raise CheckpointError(
                f"cannot resume {ckpt_path}: saved with world size {ckpt.get('world_size', 1)}, "
                f"running with {dist_info.world_size}"
            )

    dataset = build_dataset(
        train_cfg.dataset,
        num_images=train_cfg.train_images,
        image_size=model_cfg.image_size,
        seed=train_cfg.data_seed,
        split="train",
    )
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg).to(device_t)
    optimizer = _make_optimizer(model, train_cfg)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["iteration"])
        _set_rng_state(ckpt["rng"][dist_info.rank], device_t)
    else:
        # Each rank draws its own RoI/anchor samples; rank 0 of a 1-process run uses the seed itself.
        torch.manual_seed(train_cfg.seed + dist_info.rank)
    history: list[dict[str, Any]] = list(ckpt.get("history", [])) if ckpt is not None else []

    net: nn.Module = model
    if dist_info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device_t.index] if device_t.type == "cuda" else None
        )

    def save(iteration: int) -> None:
        states = [_rng_state(device_t)]
        if dist_info.enabled:
            import torch.distributed as dist

            states = [None] * dist_info.world_size
            dist.all_gather_object(states, {k: v.cpu() for k, v in _rng_state(device_t).items()})
        if dist_info.rank == 0:
            save_checkpoint(
                ckpt_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "model_config": _canonical(model_cfg.to_dict()),
                    "train_config": _canonical(asdict(train_cfg)),
                    "iteration": iteration,
                    "world_size": dist_info.world_size,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": states,
                    "history": history,
                },
            )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=train_cfg.iterations,
        initial=start,
        desc=f"train {model_cfg.model}/{model_cfg.extractor}",
        disable=not progress or dist_info.rank != 0,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    interrupted = False
    for it in range(start, train_cfg.iterations):
        indices = batch_indices(train_cfg, len(dataset), it)[dist_info.rank :: dist_info.world_size]
        images, targets = collate(
            dataset, indices, device_t, hflip_seed=(train_cfg.seed, it) if train_cfg.hflip else None
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(train_cfg, it)
        hook = (lambda m, it=it: before_step(it, m)) if before_step is not None else None
        last = train_step(net, optimizer, images, targets, clip_grad_norm=train_cfg.clip_grad_norm, before_step=hook)
        if dist_info.enabled:
            import torch.distributed as dist

            values = torch.tensor(list(last.values()), dtype=torch.float64)
            dist.all_reduce(values)
            last = dict(zip(last, (values / dist_info.world_size).tolist(), strict=True))
        if (it + 1) % log_every == 0 or it + 1 == train_cfg.iterations:
            history.append({"iteration": it + 1, "lr": lr_at(train_cfg, it), **last})
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr_at(train_cfg, it):.2g}")
        if stop_after is not None and it + 1 >= stop_after and it + 1 < train_cfg.iterations:
            interrupted = True
            break
        if (it + 1) % train_cfg.checkpoint_every == 0 or it + 1 == train_cfg.iterations:
            save(it + 1)
    bar.close()
    return {
        "checkpoint": str(ckpt_path),
        "model_config": model_cfg.to_dict(),
        "train_config": asdict(train_cfg),
        "start_iteration": start,
        "iterations": train_cfg.iterations,
        "interrupted": interrupted,
        "seconds": time.perf_counter() - t0,
        "final_losses": last,
        "history": history,
        "world_size": dist_info.world_size,
    }


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: ShapesDataset,
    device: torch.device,
    *,
    batch_size: int = 2,
    progress: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Run ``model`` in eval mode on every image of ``dataset``; returns CPU outputs in dataset order."""
    from tqdm.auto import tqdm

    model.eval()
    outputs: list[dict[str, torch.Tensor]] = []
    indices = list(range(len(dataset)))
    for start in tqdm(range(0, len(indices), batch_size), desc="evaluate", disable=not progress, dynamic_ncols=True):
        images, _ = collate(dataset, indices[start : start + batch_size], device)
        for out in model(images):
            outputs.append({k: v.cpu() for k, v in out.items()})
    return outputs


def _coco_results(outputs: list[dict[str, torch.Tensor]], iou_type: str) -> list[dict[str, Any]]:
    from pycocotools import mask as mask_utils

    results = []
    for image_id, out in enumerate(outputs, start=1):
        boxes = out["boxes"].tolist()
        scores = out["scores"].tolist()
        labels = out["labels"].tolist()
        if iou_type == "segm":
            masks = (out["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        for k, (box, score, label) in enumerate(zip(boxes, scores, labels, strict=True)):
            entry = {"image_id": image_id, "category_id": int(label), "score": float(score)}
            if iou_type == "bbox":
                entry["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            else:
                rle = mask_utils.encode(np.asfortranarray(masks[k]))
                rle["counts"] = rle["counts"].decode("ascii")
                entry["segmentation"] = rle
            results.append(entry)
    return results


def coco_evaluate(dataset: ShapesDataset, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float | None]:
    """COCO metrics with pycocotools, in points (0-100): ``{iou_type}_{AP,AP50,AP75,APs,APm,APl}`` for
    ``bbox`` and, when the outputs carry masks, ``segm``. None where COCO has no value (e.g. no object of
    that size). ``outputs`` are in dataset order (image id = index + 1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(outputs) != len(dataset):
        raise ValueError(f"{len(outputs)} outputs for {len(dataset)} images")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = coco_dict(dataset)
        gt.createIndex()
    metrics: dict[str, float | None] = {}
    iou_types = ["bbox"] + (["segm"] if outputs and "masks" in outputs[0] else [])
    for iou_type in iou_types:
        results = _coco_results(outputs, iou_type)
        if not results:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in METRIC_NAMES})
            continue
        with contextlib.redirect_stdout(quiet):
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for name, value in zip(METRIC_NAMES, ev.stats[: len(METRIC_NAMES)], strict=True):
            metrics[f"{iou_type}_{name}"] = None if value < 0 else round(float(value) * 100, 4)
    return metrics


def _eval_dataset(ckpt: dict[str, Any], images: int, dataset: str | None) -> ShapesDataset:
    tcfg = ckpt["train_config"]
    return build_dataset(
        dataset or tcfg["dataset"],
        num_images=images,
        image_size=ckpt["model_config"]["image_size"],
        seed=tcfg["data_seed"],
        split="val",
    )


@contextlib.contextmanager
def _full_fp32():
    """No TF32 in CUDA convs/matmuls: parity compares a CUDA run with a CPU fp32 run to 1e-3 pixels."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def evaluate(
    checkpoint: str | Path,
    *,
    images: int = 50,
    dataset: str | None = None,
    device: str = "cpu",
    extractor: str | None = None,
    model: str | None = None,
    progress: bool = False,
    detections_path: str | Path | None = None,
    test_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on the first ``images`` images of the validation split with pycocotools.

    Returns ``{"metrics": {...}, "backend": ..., "images": ..., ...}``; ``detections_path`` also saves the raw
    per-image outputs (``torch.save``). ``test_overrides`` may change the inference-only settings in
    ``TEST_TIME_KEYS`` (e.g. fewer proposals). Raises CheckpointError / ValueError for bad inputs
    (including an empty image list).
    """
    from groie_triton.backend import backend_for

    device_t = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, extractor=extractor, model=model)
    ds = _eval_dataset(ckpt, images, dataset)
    net = _model_from_checkpoint(ckpt, device_t, test_overrides)
    t0 = time.perf_counter()
    with _full_fp32():
        outputs = predict(net, ds, device_t, progress=progress)
    seconds = time.perf_counter() - t0
    if detections_path is not None:
        torch.save(outputs, detections_path)
    return {
        "checkpoint": str(checkpoint),
        "iteration": int(ckpt["iteration"]),
        "model_config": ckpt["model_config"],
        "test_overrides": {k: v for k, v in (test_overrides or {}).items() if v is not None},
        "images": len(ds),
        "device": str(device_t),
        "backend": backend_for(torch.empty(0, device=device_t)),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "seconds": seconds,
        "num_detections": [len(o["boxes"]) for o in outputs],
        "metrics": coco_evaluate(ds, outputs),
    }


# --------------------------------------------------------------------------------------------- parity


def _run_cli(args: list[str], env_overrides: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_overrides}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "groie_triton.detection", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise DetectionError(
            f"`python -m groie_triton.detection {' '.join(args)}` failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc


def compare_detections(
    reference: list[dict[str, torch.Tensor]], candidate: list[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """Per-image comparison: same number, labels and order of detections; max box / score / mask diffs."""
    same_count = len(reference) == len(candidate)
    same_labels = same_count
    box = score = mask = 0.0
    for ref, cand in zip(reference, candidate, strict=False):
        if len(ref["labels"]) != len(cand["labels"]) or not torch.equal(ref["labels"], cand["labels"]):
            same_labels = False
            box = score = math.inf
            continue
        if len(ref["labels"]):
            box = max(box, (ref["boxes"] - cand["boxes"]).abs().max().item())
            score = max(score, (ref["scores"] - cand["scores"]).abs().max().item())
            if "masks" in ref:
                mask = max(mask, (ref["masks"] - cand["masks"]).abs().max().item())
    return {
        "same_labels_and_order": same_labels,
        "max_box_abs_diff": box,
        "max_score_abs_diff": score,
        "max_mask_prob_abs_diff": mask if reference and "masks" in reference[0] else None,
    }


def parity(
    checkpoint: str | Path | None = None,
    *,
    images: int = 2,
    device: str = "cpu",
    quick: bool = False,
    proposals: int | None = None,
    max_detections: int | None = None,
    score_thresh: float | None = None,
    work_dir: str | Path | None = None,
    box_tol: float = 1e-3,
    ap_tol: float = 0.1,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Evaluate one GRoIE checkpoint through the reference implementation and through the Triton kernels.

    The two evaluations run in two subprocesses (the interpreter switch is read when triton is imported):
    reference = CPU with ``TRITON_INTERPRET=0``; Triton = ``device`` (CUDA: compiled kernels; CPU:
    ``TRITON_INTERPRET=1``, the interpreter). Without ``checkpoint`` (``quick``) a tiny GRoIE Mask R-CNN is
    trained first. ``proposals`` / ``max_detections`` / ``score_thresh`` override the checkpoint's test-time
    settings in both runs (``quick`` defaults: 10 / 5 / 0.0, which keeps the interpreter run short and
    still sends detections through the mask branch). Returns ``{"passed", "ap_reference", "ap_triton",
    "ap_max_abs_diff", "max_box_abs_diff", "same_labels_and_order", "images", ...}``; passed means boxes
    within ``box_tol``, same labels and order, every AP within ``ap_tol`` points.
    """
    if quick:
        proposals = 10 if proposals is None else proposals
        max_detections = 5 if max_detections is None else max_detections
        score_thresh = 0.0 if score_thresh is None else score_thresh
    images = int(images)
    if images <= 0:
        raise ValueError(f"empty image list: images={images}")
    with tempfile.TemporaryDirectory(prefix="groie_parity_", dir=work_dir) as tmp:
        tmp_path = Path(tmp)
        trained_here = checkpoint is None
        if trained_here:
            if not quick:
                raise DetectionError("parity needs --checkpoint (or --quick to train a tiny one first)")
            t0 = time.perf_counter()
            # Few iterations: parity needs a trained-looking checkpoint, not a good one.
            args = [
                "train",
                "--quick",
                "--extractor",
                "groie",
                "--iterations",
                "10",
                "--checkpoint-every",
                "10",
            ]
            _run_cli(args + ["--out", str(tmp_path / "train"), "--no-progress"], {"TRITON_INTERPRET": "0"}, timeout)
            train_seconds = time.perf_counter() - t0
            checkpoint = tmp_path / "train" / "last.pt"
        else:
            train_seconds = 0.0
        ckpt = load_checkpoint(checkpoint)
        if ckpt["model_config"]["extractor"] != "groie":
            raise CheckpointError(
                f"checkpoint {checkpoint} uses extractor {ckpt['model_config']['extractor']!r}: its RoI "
                "extraction does not run through groie_triton, so parity needs a GRoIE checkpoint "
                "(train --extractor groie)"
            )
        runs = {}
        for name, run_device, interpret in (
            ("reference", "cpu", "0"),
            ("triton", device, "0" if device != "cpu" else "1"),
        ):
            out_json, out_dets = tmp_path / f"{name}.json", tmp_path / f"{name}.pt"
            t0 = time.perf_counter()
            args = [
                "evaluate",
                "--checkpoint",
                str(checkpoint),
                "--images",
                str(images),
                "--device",
                run_device,
            ]
            args += ["--json", str(out_json), "--detections", str(out_dets), "--no-progress"]
            for flag, value in (
                ("--proposals", proposals),
                ("--max-detections", max_detections),
                ("--score-thresh", score_thresh),
            ):
                if value is not None:
                    args += [flag, str(value)]
            _run_cli(args, {"TRITON_INTERPRET": interpret}, timeout)
            result = json.loads(out_json.read_text())
            result["wall_seconds"] = time.perf_counter() - t0
            result["detections"] = torch.load(out_dets, weights_only=True)
            runs[name] = result
    ref, tri = runs["reference"], runs["triton"]
    if ref["backend"] != "reference" or not tri["backend"].startswith("triton"):
        raise DetectionError(
            f"parity ran backends {ref['backend']!r} and {tri['backend']!r}; expected 'reference' and a Triton one"
        )
    comparison = compare_detections(ref["detections"], tri["detections"])
    ap_diff = max((abs((ref["metrics"][k] or 0.0) - (tri["metrics"][k] or 0.0)) for k in ref["metrics"]), default=0.0)
    passed = comparison["same_labels_and_order"] and comparison["max_box_abs_diff"] <= box_tol and ap_diff <= ap_tol
    return {
        "passed": bool(passed),
        "checkpoint": None if trained_here else str(checkpoint),
        "trained_quick_checkpoint": trained_here,
        "model_config": ckpt["model_config"],
        "images": images,
        "ap_reference": ref["metrics"],
        "ap_triton": tri["metrics"],
        "ap_max_abs_diff": ap_diff,
        **comparison,
        "num_detections": ref["num_detections"],
        "test_overrides": ref["test_overrides"],
        "backend_reference": ref["backend"],
        "backend_triton": tri["backend"],
        "seconds_train": train_seconds,
        "seconds_reference": ref["seconds"],
        "seconds_triton": tri["seconds"],
        "box_tol": box_tol,
        "ap_tol": ap_tol,
    }


# ----------------------------------------------------------------------------------------- experiment


def experiment(
    out_dir: str | Path,
    *,
    model: str = "mask_rcnn",
    gcnet: bool = False,
    preset: str = "experiment",
    iterations: int | None = None,
    eval_images: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate the baseline and GRoIE with the same seed, data and schedule.

    Writes ``out_dir/{baseline,groie}/last.pt``, ``out_dir/results.json`` and ``out_dir/results.md`` (a
    markdown table of box and mask AP); returns the results dict.
    """
    out_dir = Path(out_dir)
    spec = PRESETS[preset]
    tcfg = TrainConfig(**{**spec["train"], "seed": seed, **({"iterations": iterations} if iterations else {})})
    n_eval = eval_images or spec["eval_images"]
    rows = []
    for extractor in ("baseline", "groie"):
        mcfg = ModelConfig(**{**spec["model"], "model": model, "extractor": extractor, "gcnet": gcnet})
        run_dir = out_dir / extractor
        summary = train(
            mcfg,
            tcfg,
            run_dir,
            device=device,
            resume=resume and (run_dir / "last.pt").is_file(),
            progress=progress,
        )
        result = evaluate(run_dir / "last.pt", images=n_eval, device=device, progress=progress)
        rows.append(
            {
                "extractor": extractor,
                "train_seconds": summary["seconds"],
                "eval_seconds": result["seconds"],
                "final_loss": summary["final_losses"].get("loss"),
                "metrics": result["metrics"],
            }
        )
    results = {
        "model": model,
        "gcnet": gcnet,
        "preset": preset,
        "model_config": {k: v for k, v in spec["model"].items()},
        "train_config": asdict(tcfg),
        "eval_images": n_eval,
        "device": device,
        "torch": torch.__version__,
        "runs": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(results_table(results))
    return results


def results_table(results: dict[str, Any]) -> str:
    """Markdown table of an :func:`experiment` result."""

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    header = "| RoI extractor | box AP | box AP50 | box AP75 | mask AP | mask AP50 | mask AP75 | train time |\n"
    header += "|---|---|---|---|---|---|---|---|\n"
    lines = []
    for row in results["runs"]:
        m = row["metrics"]
        lines.append(
            f"| {row['extractor']} | {fmt(m.get('bbox_AP'))} | {fmt(m.get('bbox_AP50'))} "
            f"| {fmt(m.get('bbox_AP75'))} "
            f"| {fmt(m.get('segm_AP'))} | {fmt(m.get('segm_AP50'))} | {fmt(m.get('segm_AP75'))} "
            f"| {row['train_seconds'] / 60:.1f} min |"
        )
    tc = results["train_config"]
    caption = (
        f"{results['model']}{' + GC-Net' if results['gcnet'] else ''}, resnet18-FPN from scratch, shapes "
        f"{tc['train_images']} train / {results['eval_images']} val images, {tc['iterations']} iterations x "
        f"batch {tc['batch_size']}, seed {tc['seed']}, {results['device']}.\n\n"
    )
    return caption + header + "\n".join(lines) + "\n"
