"""DistributedDataParallel training of the detection pipeline (gloo on CPU, loopback only).

Two processes train for a few steps through :func:`groie_triton.detection.training.train` exactly as under
torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment); their gradients must equal
those of one process on the same global batch. DDP averages per-rank losses, each normalised over its own
rank's samples, and each rank draws its own RPN/RoI samples from its own generator; the single-process
reference therefore runs the global batch shard by shard, each shard with that rank's generator, and
averages - which is the definition of the global-batch loss DDP optimises. GroupNorm (the default) is
per-image, so no batch statistic differs between the two setups.

Each step of the reference starts from the DDP run's weights of that step: a randomly initialised RPN
scores anchors almost equally, so the last-bit difference between an all-reduce and a local sum can
reorder its top-k proposals one step later and sample other RoIs; comparing step by step from identical
weights checks the gradients, not that chaos.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groie_triton.detection.config import PRESETS, TrainConfig
from groie_triton.detection.data import build_dataset, collate
from groie_triton.detection.models import ModelConfig, build_model
from groie_triton.detection.training import batch_indices, train
from groie_triton.testing import assert_close_to

WORLD = 2
STEPS = 3
MODEL_CFG = dict(PRESETS["quick"]["model"], image_size=64)
TRAIN_CFG = dict(train_images=8, iterations=STEPS, batch_size=2, lr=0.01, warmup_iters=0, checkpoint_every=STEPS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().clone() for p in model.parameters()])


def _flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        TRITON_INTERPRET="0",
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    grads: list[torch.Tensor] = []
    params: list[torch.Tensor] = []
    rank_mismatch: list[float] = []

    def record(iteration: int, model: torch.nn.Module) -> None:
        grad = _flat_grads(model)
        rank0 = grad.clone()
        dist.broadcast(rank0, src=0)
        rank_mismatch.append((grad - rank0).abs().max().item())
        grads.append(grad)
        params.append(_flat_params(model))

    train(
        ModelConfig(**MODEL_CFG),
        TrainConfig(**TRAIN_CFG),
        Path(out_dir) / "run",
        progress=False,
        before_step=record,
    )
    if rank == 0:
        torch.save({"grads": grads, "params": params}, Path(out_dir) / "ddp_rank0.pt")
    torch.save(rank_mismatch, Path(out_dir) / f"mismatch_rank{rank}.pt")
    dist.destroy_process_group()


def _single_process_reference(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Averaged gradient of each step's global batch, starting from ``params[step]``; and rank 0's own
    gradient of step 0."""
    mcfg, tcfg = ModelConfig(**MODEL_CFG), TrainConfig(**TRAIN_CFG)
    dataset = build_dataset("shapes", num_images=tcfg.train_images, image_size=mcfg.image_size, split="train")
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg)
    rank_rng = []
    for rank in range(WORLD):
        torch.manual_seed(tcfg.seed + rank)
        rank_rng.append(torch.get_rng_state())
    model.train()
    grads = []
    for it in range(STEPS):
        torch.nn.utils.vector_to_parameters(params[it], model.parameters())
        model.zero_grad(set_to_none=True)
        indices = batch_indices(tcfg, len(dataset), it)
        for rank in range(WORLD):
            torch.set_rng_state(rank_rng[rank])
            images, targets = collate(dataset, indices[rank::WORLD], torch.device("cpu"), hflip_seed=(tcfg.seed, it))
            (sum(model(images, targets).values()) / WORLD).backward()
            rank_rng[rank] = torch.get_rng_state()
            if it == 0 and rank == 0:
                rank0_own = _flat_grads(model) * WORLD
        grads.append(_flat_grads(model))
    return grads, rank0_own


def test_ddp_gradients_equal_single_process_on_same_global_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors; OpenMP workers spin on a busy machine
    try:
        _check_ddp_against_single_process(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_ddp_against_single_process(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "ddp_rank0.pt")
    for rank in range(WORLD):
        assert torch.load(tmp_path / f"mismatch_rank{rank}.pt") == [0.0] * STEPS, "ranks hold different gradients"
    reference, rank0_own = _single_process_reference(ddp["params"])

    assert len(ddp["grads"]) == len(reference) == STEPS
    for step in range(STEPS):
        # Not the float32 table: the all-reduce sums each gradient in another order than one process does
        # (rtol 1e-4), and most gradients are far below 1, where the table's atol would hide a wrong one.
        assert_close_to(ddp["grads"][step], reference[step], rtol=1e-4, atol=1e-6, msg=f"step {step}")
    # A rank's own gradient is far from the average: the check above would catch a missing all-reduce.
    assert (rank0_own - reference[0]).abs().max() > 1e-2 * reference[0].abs().max()
    # The weights did move, so later steps were taken from updated (and checkpointed) weights.
    assert not torch.equal(ddp["params"][0], ddp["params"][-1])
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == WORLD and ckpt["iteration"] == STEPS and len(ckpt["rng"]) == WORLD


@pytest.mark.slow
def test_torchrun_cli_trains_two_processes(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    cmd += ["--master_port", str(_free_port()), "-m", "groie_triton.detection", "train", "--quick"]
    cmd += ["--iterations", "2", "--image-size", "64", "--out", str(tmp_path / "run"), "--no-progress"]
    cmd += ["--json", str(tmp_path / "train.json")]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["iteration"] == 2
