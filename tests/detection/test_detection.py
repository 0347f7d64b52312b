"""The reference Faster/Mask R-CNN pipeline: shapes data, builders, training, resume, COCO AP, parity, CLI.

Everything runs on the pure-PyTorch reference backend (``TRITON_INTERPRET=0``) except the parity test,
which evaluates one checkpoint through the Triton kernels under the interpreter on two tiny images.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from groie_triton.detection.__main__ import main
from groie_triton.detection.config import PRESETS, CheckpointError, TrainConfig
from groie_triton.detection.data import CLASSES, ShapesDataset, build_dataset, collate, export_coco_json
from groie_triton.detection.evaluation import coco_evaluate, evaluate
from groie_triton.detection.experiments import experiment
from groie_triton.detection.models import ContextBlock, ModelConfig, build_model
from groie_triton.detection.parity_check import parity
from groie_triton.detection.training import train, train_step
from groie_triton.testing import assert_close_to

# pycocotools' mask decoding trips numpy 2's __array__(copy=) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
QUICK_MODEL = PRESETS["quick"]["model"]
# Where the sizes do not matter: 64 px images and fewer sampled RoIs are several times cheaper.
TINY_MODEL = {
    **QUICK_MODEL,
    "image_size": 64,
    "rpn_post_nms_top_n_train": 100,
    "box_batch_size_per_image": 32,
}


def _quick_train_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{**PRESETS["quick"]["train"], **overrides})


@pytest.fixture(scope="module")
def groie_checkpoint(tmp_path_factory) -> Path:
    """A GRoIE Mask R-CNN (64 px) after a few iterations on the reference backend (shared by the module)."""
    out = tmp_path_factory.mktemp("groie_run")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        mcfg = ModelConfig(**TINY_MODEL, extractor="groie")
        train(mcfg, _quick_train_cfg(iterations=4, checkpoint_every=4), out, progress=False)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return out / "last.pt"


@pytest.fixture(scope="module")
def baseline_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline_run")
    train(ModelConfig(**TINY_MODEL), _quick_train_cfg(iterations=1, checkpoint_every=1), out, progress=False)
    return out / "last.pt"


# ------------------------------------------------------------------------------------------- dataset


def test_shapes_dataset_is_deterministic_and_order_independent():
    a = ShapesDataset(num_images=6, image_size=96, seed=3)
    b = ShapesDataset(num_images=6, image_size=96, seed=3)
    for i in (4, 1, 4, 0):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib)
        for key in ("boxes", "labels", "masks"):
            assert torch.equal(ta[key], tb[key])
    other = ShapesDataset(num_images=6, image_size=96, seed=4)
    assert not torch.equal(a[0][0], other[0][0])
    assert not torch.equal(a[0][0], ShapesDataset(num_images=6, image_size=96, seed=3, split="val")[0][0])


def test_annotations_are_valid_masks_inside_tight_boxes():
    ds = ShapesDataset(num_images=12, image_size=128, seed=0)
    sizes = []
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        boxes, masks, labels = target["boxes"], target["masks"], target["labels"]
        assert len(boxes) == len(masks) == len(labels) >= 1
        assert labels.min() >= 1 and labels.max() <= len(CLASSES)
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 128
        for box, mask, area in zip(boxes.long(), masks, target["area"], strict=True):
            x1, y1, x2, y2 = box.tolist()
            inside = mask[y1:y2, x1:x2]
            assert mask.sum() == inside.sum() == area >= ds.config.min_visible_pixels  # nothing outside the box
            # Tight: every edge row/column of the box holds a mask pixel.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        # Occlusion resolved: every pixel belongs to at most one instance.
        assert masks.sum(0).max() <= 1
        sizes += (boxes[:, 2:] - boxes[:, :2]).prod(1).sqrt().tolist()
    # Sizes span the FPN levels the model's level mapping uses (canonical scale 36 px at 128 px).
    canonical = ModelConfig(**QUICK_MODEL).canonical_scale
    levels = {min(5, max(2, math.floor(4 + math.log2(s / canonical + 1e-8)))) for s in sizes}
    assert levels == {2, 3, 4, 5}


def test_coco_json_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    ds = ShapesDataset(num_images=3, image_size=96, seed=1)
    path = export_coco_json(ds, tmp_path / "shapes.json")
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    for index in range(3):
        _, target = ds[index]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[index + 1]))
        assert len(anns) == len(target["labels"])
        for ann, mask, box, label in zip(anns, target["masks"], target["boxes"], target["labels"], strict=True):
            assert np.array_equal(coco.annToMask(ann), mask.numpy())
            x, y, w, h = ann["bbox"]
            assert [x, y, x + w, y + h] == box.tolist() and ann["category_id"] == label


def test_empty_or_unknown_dataset_raises():
    with pytest.raises(ValueError, match="empty image list"):
        ShapesDataset(num_images=0)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("coco", num_images=2)


def test_coco_evaluate_scores_ground_truth_as_100():
    ds = ShapesDataset(num_images=3, image_size=96, seed=2)
    outputs = []
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["labels"])
        outputs.append(
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "scores": torch.ones(n),
                "masks": t["masks"][:, None].float(),
            }
        )
    metrics = coco_evaluate(ds, outputs)
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] == pytest.approx(100.0)
    assert metrics["bbox_AP50"] == pytest.approx(100.0) and metrics["segm_AP75"] == pytest.approx(100.0)
    empty = [{k: v[:0] for k, v in o.items()} for o in outputs]
    assert coco_evaluate(ds, empty)["bbox_AP"] == 0.0


# -------------------------------------------------------------------------------------------- models


def test_context_block_is_identity_at_init_and_adds_global_context():
    torch.manual_seed(0)
    block = ContextBlock(16)
    x = torch.randn(2, 16, 5, 6)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    torch.nn.init.normal_(block.transform[-1].weight)
    out = block(x)
    # Channel-add fusion: the same vector is added at every position of an image.
    delta = out - x
    assert_close_to(delta, delta[:, :, :1, :1].expand_as(delta))
    weights = block.attention_logits(x).flatten(2).softmax(-1)  # [N, 1, HW]
    context = (x.flatten(2) * weights).sum(-1)[:, :, None, None]
    assert_close_to(delta, block.transform(context).expand_as(delta))


def test_unknown_model_names_raise():
    for key in ("model", "extractor", "backbone", "norm"):
        with pytest.raises(ValueError, match=f"unknown {key}"):
            ModelConfig(**{key: "nope"})


def test_builders_use_the_requested_roi_extraction():
    from torchvision.ops import MultiScaleRoIAlign

    from groie_triton.extractor import GRoIEPooler

    baseline = build_model(ModelConfig(**QUICK_MODEL))
    assert type(baseline.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    assert baseline.roi_heads.mask_roi_pool.output_size == (14, 14)
    groie = build_model(ModelConfig(**QUICK_MODEL, extractor="groie"))
    for pool, size in ((groie.roi_heads.box_roi_pool, 7), (groie.roi_heads.mask_roi_pool, 14)):
        assert isinstance(pool, GRoIEPooler) and pool.output_size == (size, size)
    faster = build_model(ModelConfig(**QUICK_MODEL, model="faster_rcnn"))
    assert not faster.roi_heads.has_mask()


def _fixed_batch(n: int = 2, size: int = 128):
    ds = ShapesDataset(num_images=n, image_size=size, seed=5)
    return collate(ds, list(range(n)), torch.device("cpu"))


@pytest.mark.parametrize("extractor", ["baseline", "groie"])
def test_gcnet_train_step_and_eval_pass(extractor):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_MODEL, gcnet=True, extractor=extractor))
    blocks = [m for m in model.modules() if isinstance(m, ContextBlock)]
    assert len(blocks) == 6  # resnet18: 2 residual blocks in each of c3, c4, c5
    assert not any(isinstance(m, ContextBlock) for m in model.backbone.body.layer1.modules())
    images, targets = _fixed_batch(size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = train_step(model, optimizer, images, targets)
    assert math.isfinite(losses["loss"]) and "loss_mask" in losses
    assert all(b.transform[-1].weight.abs().sum() > 0 for b in blocks)  # the zero-init convs learned
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and {"boxes", "labels", "scores", "masks"} <= set(out[0])


@pytest.mark.parametrize("extractor", ["baseline", "groie"])
def test_training_iterations_reduce_the_loss_on_a_fixed_batch(extractor):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_MODEL, extractor=extractor))
    images, targets = _fixed_batch(size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def measured_loss() -> float:
        torch.manual_seed(123)  # the same RPN/RoI samples for both measurements
        model.train()
        with torch.no_grad():
            return sum(model(images, targets).values()).item()

    before = measured_loss()
    for _ in range(6):
        train_step(model, optimizer, images, targets, clip_grad_norm=10.0)
    after = measured_loss()
    assert after < 0.8 * before, (before, after)


# ----------------------------------------------------------------------------------- train / resume


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path):
    mcfg = ModelConfig(**TINY_MODEL, model="faster_rcnn")
    tcfg = _quick_train_cfg(train_images=6, iterations=4, checkpoint_every=2)
    train(mcfg, tcfg, tmp_path / "straight", progress=False)
    first = train(mcfg, tcfg, tmp_path / "resumed", progress=False, stop_after=3)
    assert first["interrupted"]
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["iteration"] == 2
    second = train(mcfg, tcfg, tmp_path / "resumed", progress=False, resume=True)
    assert second["start_iteration"] == 2 and not second["interrupted"]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_evaluate_reports_coco_metrics_in_points(groie_checkpoint):
    result = evaluate(groie_checkpoint, images=2)
    assert result["backend"] == "reference" and result["images"] == 2
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert key in result["metrics"]
        value = result["metrics"][key]
        assert value is None or 0.0 <= value <= 100.0


# -------------------------------------------------------------------------------------------- parity


def test_parity_reference_vs_triton_interpreter_on_two_images(groie_checkpoint, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the two evaluation subprocesses; see _one_thread
    result = parity(groie_checkpoint, images=2, proposals=10, max_detections=5, score_thresh=0.0)
    assert result["backend_reference"] == "reference"
    assert result["backend_triton"] == "triton-interpreter"
    assert result["images"] == 2 and sum(result["num_detections"]) > 0  # the mask branch ran too
    assert result["same_labels_and_order"]
    assert result["max_box_abs_diff"] <= 1e-3
    assert result["ap_max_abs_diff"] <= 0.1
    assert result["passed"]


def test_parity_refuses_a_baseline_checkpoint(baseline_checkpoint):
    with pytest.raises(CheckpointError, match="GRoIE"):
        parity(baseline_checkpoint, images=2)


# ------------------------------------------------------------------------------------------ bad input


def _run_main(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def test_cli_missing_checkpoint(tmp_path, capsys):
    code, err = _run_main(capsys, "evaluate", "--checkpoint", str(tmp_path / "nope.pt"))
    assert code == 1 and "checkpoint not found" in err


def test_cli_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    code, err = _run_main(capsys, "evaluate", "--checkpoint", str(bad))
    assert code == 1 and "corrupt" in err
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    code, err = _run_main(capsys, "evaluate", "--checkpoint", str(foreign))
    assert code == 1 and "not a groie_triton detection checkpoint" in err


def test_cli_checkpoint_of_the_other_extractor(baseline_checkpoint, tmp_path, capsys):
    code, err = _run_main(capsys, "evaluate", "--checkpoint", str(baseline_checkpoint), "--extractor", "groie")
    assert code == 1 and "extractor 'baseline'" in err and "'groie' was requested" in err
    # Resuming a baseline run as GRoIE fails the same way.
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(baseline_checkpoint.read_bytes())
    code, err = _run_main(capsys, "train", "--quick", "--extractor", "groie", "--out", str(run), "--resume")
    assert code == 1 and "extractor 'baseline'" in err


def test_cli_unknown_names_and_empty_image_lists(baseline_checkpoint, tmp_path, capsys):
    for argv in (
        ("train", "--quick", "--dataset", "coco"),
        ("train", "--quick", "--model", "retinanet"),
        ("train", "--quick", "--extractor", "roipool"),
    ):
        code, err = _run_main(capsys, *argv)
        assert code == 2 and "invalid choice" in err
    code, err = _run_main(capsys, "evaluate", "--checkpoint", str(baseline_checkpoint), "--images", "0")
    assert code == 1 and "empty image list" in err
    code, err = _run_main(capsys, "train", "--quick", "--train-images", "0", "--out", str(tmp_path / "x"))
    assert code == 1 and "empty image list" in err
    code, err = _run_main(capsys, "parity", "--checkpoint", str(baseline_checkpoint), "--images", "0")
    assert code == 1 and "empty image list" in err


def test_cli_process_exits_non_zero_with_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "groie_triton.detection",
        "evaluate",
        "--checkpoint",
        str(tmp_path / "missing.pt"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: checkpoint not found") and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_cli_parity_quick_trains_and_compares(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "groie_triton.detection",
        "parity",
        "--quick",
        "--json",
        str(tmp_path / "p.json"),
    ]
    # Issue 11: `parity --quick` must finish within 5 minutes on 2 cores under the interpreter.
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads((tmp_path / "p.json").read_text())
    assert result["passed"] and result["max_box_abs_diff"] <= 1e-3


@pytest.mark.slow
def test_experiment_quick_writes_results_table(tmp_path):
    results = experiment(tmp_path, preset="quick", iterations=4, eval_images=2, progress=False)
    assert [r["extractor"] for r in results["runs"]] == ["baseline", "groie"]
    table = (tmp_path / "results.md").read_text()
    assert "| baseline |" in table and "| groie |" in table
