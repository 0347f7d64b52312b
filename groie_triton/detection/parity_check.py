"""Parity: one GRoIE checkpoint evaluated through the reference implementation and through the Triton kernels.

Any detector works (Faster, Mask, Grid R-CNN): the comparison is of the final detections (boxes, labels,
scores, and mask probabilities where there are masks) and of their COCO AP.

The two evaluations run in two subprocesses of ``python -m groie_triton.detection evaluate``, because the
interpreter switch (``TRITON_INTERPRET``) is read when triton is imported.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from groie_triton.detection.checkpoint import load_checkpoint
from groie_triton.detection.config import CheckpointError, DetectionError

__all__ = ["QUICK_ENV", "QUICK_TEST_TIME", "QUICK_TRAIN", "QUICK_TRAIN_ARGS", "compare_detections", "parity"]

# What ``parity --quick`` trains when given no checkpoint: parity needs a trained-looking GRoIE checkpoint,
# not a good one. 64 px images still give every FPN level (P2-P5: 16x16 down to 2x2) RoIs to pool from.
QUICK_TRAIN = {"image_size": 64, "iterations": 4}
QUICK_TRAIN_ARGS = (
    "--quick",
    "--extractor",
    "groie",
    "--image-size",
    str(QUICK_TRAIN["image_size"]),
    "--iterations",
    str(QUICK_TRAIN["iterations"]),
    "--checkpoint-every",
    str(QUICK_TRAIN["iterations"]),
)
# ``--quick`` test-time settings: few proposals and detections keep the interpreter run short, and a zero
# score threshold still sends detections through the mask branch.
QUICK_TEST_TIME = {"proposals": 10, "max_detections": 5, "score_thresh": 0.0}
# ``--quick`` subprocesses run torch on one thread unless OMP_NUM_THREADS says otherwise: the tensors are
# tiny, and on a loaded 2-core machine OpenMP workers spinning for a core made the training alone 8x slower
# (123 s instead of 16 s under a load average of 7).
QUICK_ENV = {"OMP_NUM_THREADS": "1"}


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
    model: str = "mask_rcnn",
) -> dict[str, Any]:
    """Evaluate one GRoIE checkpoint through the reference implementation and through the Triton kernels.

    The two evaluations run in two subprocesses (the interpreter switch is read when triton is imported):
    reference = CPU with ``TRITON_INTERPRET=0``; Triton = ``device`` (CUDA: compiled kernels; CPU:
    ``TRITON_INTERPRET=1``, the interpreter). Without ``checkpoint`` (``quick``) a tiny GRoIE ``model`` (any
    of :data:`~groie_triton.detection.models.MODELS`; default Mask R-CNN) is trained first (``QUICK_TRAIN_ARGS``);
    with a checkpoint, ``model`` is ignored. ``proposals`` / ``max_detections`` / ``score_thresh`` override the
    checkpoint's test-time settings in both runs (``quick`` defaults: ``QUICK_TEST_TIME``); ``quick`` also
    runs the subprocesses with ``QUICK_ENV`` (one torch thread) where the environment does not set it. Returns
    ``{"passed", "ap_reference", "ap_triton", "ap_max_abs_diff", "max_box_abs_diff", "same_labels_and_order",
    "images", ...}``; passed means boxes within ``box_tol``, same labels and order, every AP within ``ap_tol``
    points. Raises ValueError for an empty image list, CheckpointError for a bad or non-GRoIE checkpoint,
    DetectionError when a subprocess fails or the backends are not the expected ones.
    """
    if quick:
        proposals = QUICK_TEST_TIME["proposals"] if proposals is None else proposals
        max_detections = QUICK_TEST_TIME["max_detections"] if max_detections is None else max_detections
        score_thresh = QUICK_TEST_TIME["score_thresh"] if score_thresh is None else score_thresh
    images = int(images)
    if images <= 0:
        raise ValueError(f"empty image list: images={images}")
    env = {k: v for k, v in QUICK_ENV.items() if k not in os.environ} if quick else {}
    with tempfile.TemporaryDirectory(prefix="groie_parity_", dir=work_dir) as tmp:
        tmp_path = Path(tmp)
        trained_here = checkpoint is None
        if trained_here:
            if not quick:
                raise DetectionError("parity needs --checkpoint (or --quick to train a tiny one first)")
            t0 = time.perf_counter()
            args = ["train", *QUICK_TRAIN_ARGS, "--model", model, "--out", str(tmp_path / "train"), "--no-progress"]
            _run_cli(args, {**env, "TRITON_INTERPRET": "0"}, timeout)
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
            args = ["evaluate", "--checkpoint", str(checkpoint), "--images", str(images), "--device", run_device]
            args += ["--json", str(out_json), "--detections", str(out_dets), "--no-progress"]
            for flag, value in (
                ("--proposals", proposals),
                ("--max-detections", max_detections),
                ("--score-thresh", score_thresh),
            ):
                if value is not None:
                    args += [flag, str(value)]
            _run_cli(args, {**env, "TRITON_INTERPRET": interpret}, timeout)
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
