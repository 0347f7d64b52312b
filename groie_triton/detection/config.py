"""The configuration of a run: the training schedule, the presets, the device, and the pipeline's errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CheckpointError", "DetectionError", "PRESETS", "TrainConfig", "resolve_device"]


class DetectionError(RuntimeError):
    """A user-facing error of the detection pipeline: the CLI prints it and exits non-zero."""


class CheckpointError(DetectionError):
    """A checkpoint is missing, unreadable, of another format, or does not match the requested model."""


@dataclass
class TrainConfig:
    """The schedule and data of a training run (stored in the checkpoint next to the model config).

    ``batch_size`` is the global batch (split evenly over DDP ranks). The learning rate warms up linearly
    over ``warmup_iters`` and is multiplied by ``lr_gamma`` at each fraction of ``iterations`` in
    ``lr_steps`` (the "1x" schedule's 8/12 and 11/12 by default). Raises ValueError for a non-positive
    ``iterations``, ``batch_size`` or ``checkpoint_every``, an empty image list, or a batch larger than it.
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


# Presets: "quick" fits a CPU smoke run in seconds (baseline; GRoIE's reference path is ~10x slower per
# step); "experiment" is the baseline-vs-GRoIE CPU comparison of every system (experiments.SYSTEMS), the same
# for all of them. Its 1800 iterations are sized so the heaviest pair (Grid R-CNN) stays within about an hour
# on 2 idle cores: estimated steady-state seconds per iteration, baseline + GRoIE, are Faster 0.33 + 0.56,
# Mask 0.44 + 0.96, GC-Net 0.46 + 0.98, Grid 0.60 + 1.14 (from 1-thread CPU times of each model plus the
# per-positive-RoI cost of its heads, calibrated on the measured 0.95 s/it of an earlier GRoIE Mask R-CNN
# run), i.e. about 27, 42, 43 and 52 min of training per pair, plus 2-3 min of evaluation.
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
        "train": dict(train_images=1024, iterations=1800, batch_size=2, lr=0.02, warmup_iters=200),
        "eval_images": 200,
    },
}


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
