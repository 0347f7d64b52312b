"""Evaluation: a model's detections on a split, and their COCO AP with pycocotools."""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from groie_triton.detection.checkpoint import load_checkpoint, model_from_checkpoint
from groie_triton.detection.config import resolve_device
from groie_triton.detection.data import ShapesDataset, build_dataset, coco_dict, collate

__all__ = ["METRIC_NAMES", "coco_evaluate", "evaluate", "predict"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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
    that size). ``outputs`` are in dataset order (image id = index + 1); raises ValueError when their number
    differs from the dataset's."""
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
    net = model_from_checkpoint(ckpt, device_t, test_overrides)
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
