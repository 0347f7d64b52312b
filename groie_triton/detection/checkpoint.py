"""Checkpoints: the atomic write, the validated read, and the model a checkpoint describes.

A checkpoint is a dict ``{"format", "model_config", "train_config", "iteration", "world_size", "model",
"optimizer", "rng", "history", "train_seconds"}`` written by :func:`groie_triton.detection.training.train`;
``rng`` holds one generator state per DDP rank (what the RPN/RoI samplers draw from), so a resumed run
continues exactly; ``train_seconds`` is the training time up to it, resumed runs included (absent in older
checkpoints).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from groie_triton.detection.config import CheckpointError
from groie_triton.detection.models import build_model, model_config_from_dict

__all__ = [
    "CHECKPOINT_FORMAT",
    "TEST_TIME_KEYS",
    "canonical",
    "config_diff",
    "load_checkpoint",
    "model_from_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "groie_triton.detection/checkpoint-v1"

# Inference-only settings an evaluation may change without touching the trained weights.
TEST_TIME_KEYS = (
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test",
    "box_detections_per_img",
    "box_score_thresh",
)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so an interruption never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, *, extractor: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`~groie_triton.detection.training.train`.

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


def canonical(config: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(config))


def config_diff(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """One ``"key: checkpoint X vs requested Y"`` line per key whose value differs."""
    return [
        f"{k}: checkpoint {stored.get(k)!r} vs requested {requested.get(k)!r}"
        for k in sorted(set(stored) | set(requested))
        if stored.get(k) != requested.get(k)
    ]


def model_from_checkpoint(
    ckpt: dict[str, Any], device: torch.device, test_overrides: dict[str, Any] | None = None
) -> nn.Module:
    """The checkpoint's model with its weights, on ``device``; ``test_overrides`` may change the settings in
    ``TEST_TIME_KEYS`` (None values are ignored). Raises ValueError for any other override and CheckpointError
    when the stored config or weights do not build."""
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


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generator states the RPN/RoI samplers draw from (CPU, and ``device``'s when it is CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
