"""Training: the deterministic schedule, one SGD step, and the checkpointed (optionally DDP) training loop.

Determinism is what makes resume and DDP checkable: the data are a pure function of the seed, the batch of
iteration ``i`` is a pure function of ``(seed, i)`` (an epoch permutation, then a slice), the learning rate
is a pure function of ``i``, and the only RNG consumer left (torchvision's RPN/RoI samplers, which draw
from the global torch generator) is saved in every checkpoint, one state per rank. A run resumed from a
checkpoint therefore ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from groie_triton.detection.checkpoint import (
    CHECKPOINT_FORMAT,
    canonical,
    config_diff,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from groie_triton.detection.config import CheckpointError, DetectionError, TrainConfig, resolve_device
from groie_triton.detection.data import build_dataset, collate
from groie_triton.detection.models import ModelConfig, build_model, model_config_from_dict

__all__ = ["batch_indices", "lr_at", "train", "train_step"]


def batch_indices(cfg: TrainConfig, num_images: int, iteration: int) -> list[int]:
    """Dataset indices of the global batch of ``iteration``: epoch permutations seeded by (seed, epoch)."""
    per_epoch = num_images // cfg.batch_size
    epoch, step = divmod(iteration, per_epoch)
    perm = np.random.default_rng([cfg.seed, epoch]).permutation(num_images)
    return [int(i) for i in perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]]


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

    Checkpoints every ``train_cfg.checkpoint_every`` iterations and at the end. ``seconds`` in the summary is
    this call's training time, ``total_seconds`` includes the time of the runs it resumed from (as saved in
    their checkpoints). ``resume=True`` continues
    from ``out_dir/last.pt`` (which must hold the same model and train configs). ``stop_after=N`` stops
    after iteration N without a final checkpoint, as an interrupted run would (for testing resume).
    Under torchrun (``WORLD_SIZE`` > 1) each rank trains on its share of every global batch under
    DistributedDataParallel (gloo on CPU, nccl on CUDA); rank 0 writes the checkpoints.
    ``before_step(iteration, model)`` runs after each backward (testing hook).
    Raises CheckpointError when a resumed checkpoint does not match, DetectionError for a bad device, a
    batch not divisible by the world size, or a diverged loss.
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
        # Through the config classes, so a checkpoint saved before a field existed compares with its default.
        try:
            stored_model = model_config_from_dict(ckpt["model_config"]).to_dict()
            stored_train = asdict(TrainConfig(**ckpt["train_config"]))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot resume from {ckpt_path}: invalid stored configuration ({exc})") from None
        diff = config_diff(canonical(stored_model), canonical(model_cfg.to_dict()))
        diff += config_diff(canonical(stored_train), canonical(asdict(train_cfg)))
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
        set_rng_state(ckpt["rng"][dist_info.rank], device_t)
    else:
        # Each rank draws its own RoI/anchor samples; rank 0 of a 1-process run uses the seed itself.
        torch.manual_seed(train_cfg.seed + dist_info.rank)
    history: list[dict[str, Any]] = list(ckpt.get("history", [])) if ckpt is not None else []
    seconds_before = float(ckpt.get("train_seconds", 0.0)) if ckpt is not None else 0.0

    net: nn.Module = model
    if dist_info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device_t.index] if device_t.type == "cuda" else None
        )

    def save(iteration: int) -> None:
        states = [rng_state(device_t)]
        if dist_info.enabled:
            import torch.distributed as dist

            states = [None] * dist_info.world_size
            dist.all_gather_object(states, {k: v.cpu() for k, v in rng_state(device_t).items()})
        if dist_info.rank == 0:
            save_checkpoint(
                ckpt_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "model_config": canonical(model_cfg.to_dict()),
                    "train_config": canonical(asdict(train_cfg)),
                    "iteration": iteration,
                    "world_size": dist_info.world_size,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": states,
                    "history": history,
                    "train_seconds": seconds_before + time.perf_counter() - t0,
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
        "total_seconds": seconds_before + time.perf_counter() - t0,
        "final_losses": last,
        "history": history,
        "world_size": dist_info.world_size,
    }
