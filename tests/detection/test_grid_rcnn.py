"""Grid R-CNN (mmdetection's GridRoIHead + GridHead semantics) and the baseline-vs-GRoIE experiment harness.

The head is checked piece by piece against hand-computed cases (targets, loss, decoding, the neighbour
fusion's reach), then the whole detector trains a few steps on the reference backend.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from groie_triton.detection import experiments
from groie_triton.detection.__main__ import _experiment_systems, _parser
from groie_triton.detection.config import PRESETS, TrainConfig
from groie_triton.detection.data import ShapesDataset, collate
from groie_triton.detection.grid import (
    GRID_LOSS_WEIGHT,
    ClassOnlyPredictor,
    GridHead,
    GridRoIHeads,
    grid_neighbors,
    grid_sub_regions,
)
from groie_triton.detection.models import ModelConfig, build_model
from groie_triton.detection.training import train, train_step

TINY_GRID = {
    **PRESETS["quick"]["model"],
    "model": "grid_rcnn",
    "image_size": 64,
    "rpn_post_nms_top_n_train": 100,
    "box_batch_size_per_image": 32,
}


def _head(**kw) -> GridHead:
    torch.manual_seed(0)
    return GridHead(in_channels=16, point_feat_channels=8, **kw)


# ------------------------------------------------------------------------------------------ the head


def test_grid_head_shapes_in_train_and_eval_mode():
    head = _head()
    x = torch.randn(3, 16, 14, 14)
    out = head(x)
    assert out["fused"].shape == out["unfused"].shape == (3, 9, 28, 28)
    assert not torch.equal(out["fused"], out["unfused"])
    assert len(head.convs) == 8 and head.convs[0].stride == (2, 2)
    assert all(isinstance(c.norm, torch.nn.GroupNorm) and c.norm.num_groups == 36 for c in head.convs)
    head.eval()
    out = head(x)
    assert out["unfused"] is out["fused"]
    # Before training every heatmap pixel is probability ~0.01 (the last deconv's bias).
    assert out["fused"].sigmoid().sub(0.01).abs().max() < 1e-3
    with pytest.raises(ValueError, match="14x14"):
        head(torch.randn(1, 16, 7, 7))
    with pytest.raises(ValueError, match="square"):
        GridHead(16, grid_points=8, point_feat_channels=8)
    with pytest.raises(ValueError, match="num_groups"):
        GridHead(16, point_feat_channels=6)
    dilated = GridHead(16, point_feat_channels=8, dilation=2)
    assert dilated.convs[1].dilation == (2, 2) and dilated(x)["fused"].shape == (3, 9, 28, 28)


def test_grid_neighbours_and_sub_regions():
    neighbors = grid_neighbors(3)
    assert [len(n) for n in neighbors] == [2, 3, 2, 3, 4, 3, 2, 3, 2]
    assert sum(len(n) for n in neighbors) == 24
    assert neighbors[4] == (1, 3, 5, 7)  # left, up, down, right of the centre
    assert all(i in neighbors[j] for i, around in enumerate(neighbors) for j in around)  # symmetric
    regions = grid_sub_regions(3, 56)
    assert regions[0] == (0, 0, 28, 28) and regions[4] == (14, 14, 42, 42) and regions[8] == (28, 28, 56, 56)
    assert regions[1] == (0, 14, 28, 42) and regions[3] == (14, 0, 42, 28)  # point 1: column 0, row 1


def test_feature_fusion_is_identity_without_transitions_and_reaches_two_hops():
    head = _head()
    x = torch.randn(2, 9 * 8, 7, 7)
    assert head.fuse(x).shape == x.shape
    with torch.no_grad():
        for trans in (head.forder_trans, head.sorder_trans):
            for p in trans.parameters():
                p.zero_()
    torch.testing.assert_close(head.fuse(x), x, rtol=0, atol=0)

    head = _head()
    with torch.no_grad():
        base = head.fuse(x)
        bumped = x.clone()
        bumped[:, :8] += 1.0  # point 0, the top-left corner
        changed = (head.fuse(bumped) - base).reshape(2, 9, 8, 7, 7).abs().amax(dim=(0, 2, 3, 4)) > 0
    # Second-order fusion reaches grid distance <= 2 from point 0: (0,0) (0,1) (0,2) (1,0) (1,1) (2,0).
    assert changed.tolist() == [True, True, True, True, True, False, True, False, False]


def test_grid_targets_are_radius_one_discs_at_the_grid_points():
    head = _head()
    roi = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    # RoI = ground truth: on the 56x56 map of the RoI expanded 2x the points sit at 14, 28, 42, i.e. at
    # (14, 14) of each point's own 28x28 sub-region.
    t = head.targets(roi, roi)
    assert t.shape == (1, 9, 28, 28)
    plus = {(14, 14), (13, 14), (15, 14), (14, 13), (14, 15)}
    for p in range(9):
        assert {(int(y), int(x)) for y, x in torch.nonzero(t[0, p])} == plus
    # Ground truth shifted right by 5 px: x positions (15 + 10) / 80 * 56 = 17.5 -> 17 (truncated).
    t = head.targets(roi, roi + torch.tensor([5.0, 0.0, 5.0, 0.0]))
    ys, xs = torch.nonzero(t[0, 0], as_tuple=True)
    assert sorted(zip(ys.tolist(), xs.tolist(), strict=True)) == [(13, 17), (14, 16), (14, 17), (14, 18), (15, 17)]
    # A point on the map's edge keeps the pixels inside: ground truth x1 at the expanded RoI's x1.
    t = head.targets(roi, torch.tensor([[-10.0, 20.0, 50.0, 60.0]]))
    assert t[0, 0].sum() == 4 and t[0, 0, 14, 0] == 1
    # RoIs whose expanded box is at most 3 px wide or high get no positives.
    assert head.targets(torch.tensor([[0.0, 0.0, 1.5, 40.0]]), torch.tensor([[0.0, 0.0, 1.5, 40.0]])).sum() == 0


def test_grid_loss_is_weighted_sigmoid_cross_entropy_on_fused_and_unfused():
    targets = torch.zeros(2, 9, 28, 28)
    zeros = {"fused": torch.zeros(2, 9, 28, 28), "unfused": torch.zeros(2, 9, 28, 28)}
    assert GridHead.loss(zeros, targets).item() == pytest.approx(GRID_LOSS_WEIGHT * 2 * math.log(2), rel=1e-6)
    torch.manual_seed(1)
    pred = {"fused": torch.randn(2, 9, 28, 28), "unfused": torch.randn(2, 9, 28, 28)}
    targets = (torch.rand(2, 9, 28, 28) < 0.05).float()

    def bce(logits):
        p = logits.double().sigmoid()
        return -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()

    expected = GRID_LOSS_WEIGHT * (bce(pred["fused"]) + bce(pred["unfused"]))
    assert GridHead.loss(pred, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_grid_decoding_votes_each_edge_from_its_three_points():
    head = _head()
    box = torch.tensor([[0.0, 0.0, 28.0, 28.0]])  # expanded: (-14, -14, 42, 42), one pixel per map pixel
    heat = torch.full((1, 9, 28, 28), -20.0)
    heat[0, :, 14, 14] = 0.0  # every point at (14, 14) of its sub-region, score 0.5
    # The left column (points 0, 1, 2) at x = 12, 14, 16 with scores 0.75, 0.5, 0.25.
    for p, x, logit in ((0, 12, math.log(3)), (1, 14, 0.0), (2, 16, -math.log(3))):
        heat[0, p, 14, :] = -20.0
        heat[0, p, 14, x] = logit
    out = head.decode(box, heat)
    # Map pixel m -> image coordinate m + 0.5 - 14 (sub-region offsets 0 / 14 / 28 on the whole map).
    x1 = (0.75 * (12.5 - 14) + 0.5 * (14.5 - 14) + 0.25 * (16.5 - 14)) / 1.5
    torch.testing.assert_close(out, torch.tensor([[x1, 0.5, 28.5, 28.5]]))
    with pytest.raises(ValueError, match="heatmaps"):
        head.decode(box, heat[:, :, :14])


# ---------------------------------------------------------------------------------------- detector


def test_grid_rcnn_builds_with_the_requested_extractors():
    from torchvision.ops import MultiScaleRoIAlign

    from groie_triton.extractor import GRoIEPooler

    cfg = ModelConfig(**TINY_GRID)
    with pytest.raises(ValueError, match="multiple of 4"):
        ModelConfig(**TINY_GRID, grid_point_channels=6)
    baseline = build_model(cfg)
    heads = baseline.roi_heads
    # mmdetection's per-class NMS at IoU 0.3 (torchvision's 0.5 for the others); 32 / 4 channels per point.
    assert heads.nms_thresh == 0.3 and heads.grid_head.point_feat_channels == 8
    assert build_model(cfg, model="faster_rcnn").roi_heads.nms_thresh == 0.5
    assert isinstance(heads, GridRoIHeads) and isinstance(heads.box_predictor, ClassOnlyPredictor)
    assert type(heads.box_roi_pool) is MultiScaleRoIAlign and heads.box_roi_pool.output_size == (7, 7)
    assert type(heads.grid_roi_pool) is MultiScaleRoIAlign and heads.grid_roi_pool.output_size == (14, 14)
    assert [n for n, _ in heads.box_predictor.named_parameters()] == ["cls_score.weight", "cls_score.bias"]
    groie = build_model(cfg, extractor="groie").roi_heads
    for pool, size in ((groie.box_roi_pool, 7), (groie.grid_roi_pool, 14)):
        assert isinstance(pool, GRoIEPooler) and pool.output_size == (size, size)
        assert pool.with_pre and pool.with_post


@pytest.mark.parametrize("extractor", ["baseline", "groie"])
def test_grid_rcnn_training_steps_reach_every_parameter_then_detect(extractor):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_GRID, extractor=extractor))
    ds = ShapesDataset(num_images=2, image_size=64, seed=5)
    images, targets = collate(ds, [0, 1], torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen = []

    def grads_everywhere(m):
        seen.extend(name for name, p in m.named_parameters() if p.grad is None)

    losses = [train_step(model, optimizer, images, targets, clip_grad_norm=10.0, before_step=grads_everywhere)]
    assert seen == []  # every parameter, the grid head's and (GRoIE) the extractors' included, got a gradient
    for _ in range(3):
        losses.append(train_step(model, optimizer, images, targets, clip_grad_norm=10.0))
    assert set(losses[0]) == {"loss_classifier", "loss_grid", "loss_objectness", "loss_rpn_box_reg", "loss"}
    assert all(math.isfinite(loss["loss"]) for loss in losses)
    assert losses[-1]["loss"] < losses[0]["loss"]
    model.eval()
    model.roi_heads.score_thresh = 0.0  # a barely trained classifier: keep every detection for the check
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}
    assert sum(len(o["boxes"]) for o in out) > 0
    for o in out:
        assert o["boxes"].min() >= 0 and o["boxes"].max() <= 64 and (o["labels"] >= 1).all()


def test_grid_loss_without_positives_is_a_zero_reaching_the_grid_parameters():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_GRID))
    heads = model.roi_heads
    feats = {name: torch.randn(1, 32, s, s) for name, s in zip(["0", "1", "2", "3"], [16, 8, 4, 2], strict=True)}
    no_positive = [torch.zeros(4, dtype=torch.long)]
    loss = heads._grid_loss(
        feats, [torch.rand(4, 4) * 10], no_positive, no_positive, [{"boxes": torch.zeros(0, 4)}], [(64, 64)]
    )
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in heads.grid_head.parameters())


def test_interrupted_grid_rcnn_run_resumes_to_identical_weights(tmp_path):
    """The grid branch's randomness (jitter, RoI sub-sampling) comes from the generators the checkpoint saves."""
    mcfg = ModelConfig(**TINY_GRID)
    tcfg = TrainConfig(**{**PRESETS["quick"]["train"], "train_images": 6, "iterations": 3, "checkpoint_every": 1})
    train(mcfg, tcfg, tmp_path / "straight", progress=False)
    train(mcfg, tcfg, tmp_path / "resumed", progress=False, stop_after=2)
    assert train(mcfg, tcfg, tmp_path / "resumed", progress=False, resume=True)["start_iteration"] == 1
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(value, b[name]) for name, value in a.items())


def test_resume_accepts_a_checkpoint_saved_before_the_grid_fields(tmp_path):
    mcfg = ModelConfig(**{**TINY_GRID, "model": "faster_rcnn"})
    tcfg = TrainConfig(**{**PRESETS["quick"]["train"], "train_images": 4, "iterations": 3, "checkpoint_every": 1})
    train(mcfg, tcfg, tmp_path, progress=False, stop_after=2)  # checkpoint of iteration 1, then interrupted
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in ("box_nms_thresh", "grid_point_channels", "grid_dilation"):
        del ckpt["model_config"][key]
    torch.save(ckpt, tmp_path / "last.pt")
    summary = train(mcfg, tcfg, tmp_path, progress=False, resume=True)
    assert summary["start_iteration"] == 1 and summary["total_seconds"] >= summary["seconds"]


# ------------------------------------------------------------------------------------- experiment


def _pair(seed: int, box: tuple[float, float], mask: tuple[float, float] | None) -> dict:
    runs = []
    for extractor, b, m in zip(("baseline", "groie"), box, mask or (None, None), strict=True):
        metrics = {"bbox_AP": b} | ({"segm_AP": m} if mask else {})
        runs.append({"extractor": extractor, "metrics": metrics, "train_seconds": 60.0})
    return {
        "seed": seed,
        "preset": "experiment",
        "model_config": {"image_size": 256, "fpn_channels": 64},
        "train_config": {"train_images": 1024, "iterations": 1800, "batch_size": 2},
        "eval_images": 200,
        "device": "cpu",
        "runs": runs,
    }


def test_paper_table_layout_seeds_and_missing_rows():
    collected = {
        "systems": {
            "faster_rcnn": [_pair(0, (20.0, 22.5), None)],
            "mask_rcnn": [_pair(0, (23.0, 28.0), (19.0, 26.0)), _pair(1, (25.0, 27.0), (21.0, 25.0))],
        }
    }
    table = experiments.paper_table(collected)
    lines = table.splitlines()
    assert "| Faster R-CNN | baseline | 20.0 | – | 0 |" in lines
    assert "| Faster R-CNN | + GRoIE | 22.5 | – | 0 |" in lines
    # Two seeds: mean ± sample standard deviation.
    assert "| Mask R-CNN | baseline | 24.0 ± 1.4 | 20.0 ± 1.4 | 0, 1 |" in lines
    assert "| Mask R-CNN | + GRoIE | 27.5 ± 0.7 | 25.5 ± 0.7 | 0, 1 |" in lines
    assert "| Mask R-CNN | 1 | 25.0 -> 27.0 (+2.0) | 21.0 -> 25.0 (+4.0) |" in lines
    assert "| Grid R-CNN | baseline / + GRoIE | not run yet | not run yet | – |" in lines
    assert "--systems grid_rcnn gcnet`" in table
    main_table = lines[lines.index("| System | RoI extractor | box AP | mask AP | seeds |") + 2 :]
    labels = [line.split("|")[1].strip() for line in main_table[: main_table.index("")]]
    assert list(dict.fromkeys(labels)) == [label for label, _, _ in experiments.SYSTEMS.values()]  # paper's order


def test_experiment_skips_finished_runs_and_collects_them(tmp_path, monkeypatch):
    calls = []

    def fake_train(mcfg, tcfg, run_dir, **kw):
        calls.append((mcfg.model, mcfg.extractor, tcfg.seed, kw["resume"]))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "last.pt").write_bytes(b"x")
        return {"total_seconds": 2.0, "history": [{"loss": 1.0}]}

    def fake_evaluate(path, **kw):
        return {"seconds": 1.0, "metrics": {"bbox_AP": 10.0 if "baseline" in str(path) else 12.0}}

    monkeypatch.setattr(experiments, "train", fake_train)
    monkeypatch.setattr(experiments, "evaluate", fake_evaluate)
    kw = dict(systems=["faster_rcnn", "grid_rcnn"], seeds=[0, 1], preset="quick", eval_images=2, progress=False)
    collected = experiments.paper_experiment(tmp_path, **kw)
    assert len(calls) == 8 and not any(c[3] for c in calls)
    assert sorted(collected["systems"]) == ["faster_rcnn", "grid_rcnn"]
    assert (tmp_path / "grid_rcnn" / "seed1" / "groie" / "result.json").is_file()
    table = (tmp_path / "results.md").read_text()
    assert "| Grid R-CNN | + GRoIE | 12.0 ± 0.0 | – | 0, 1 |" in table
    assert f"--out {tmp_path} --quick --eval-images 2 --seeds 0 1 --systems mask_rcnn gcnet`" in table
    # A second call finds every run done; another schedule is a new run that resumes from the checkpoint.
    experiments.paper_experiment(tmp_path, **kw)
    assert len(calls) == 8
    experiments.paper_experiment(tmp_path, **{**kw, "systems": ["grid_rcnn"], "seeds": [0], "iterations": 7})
    assert calls[8:] == [("grid_rcnn", "baseline", 0, True), ("grid_rcnn", "groie", 0, True)]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["systems"]["grid_rcnn"][0]["train_config"]["iterations"] == 7
    with pytest.raises(ValueError, match="unknown system"):
        experiments.paper_experiment(tmp_path, systems=["retinanet"])


def test_experiment_arms_in_two_processes_write_the_pair_once_both_finished(tmp_path, monkeypatch):
    calls = []

    def fake_train(mcfg, tcfg, run_dir, **kw):
        calls.append(mcfg.extractor)
        run_dir.mkdir(parents=True, exist_ok=True)
        return {"total_seconds": 2.0, "history": [{"loss": 1.0}]}

    monkeypatch.setattr(experiments, "train", fake_train)
    monkeypatch.setattr(experiments, "evaluate", lambda path, **kw: {"seconds": 1.0, "metrics": {"bbox_AP": 5.0}})
    kw = dict(systems=["faster_rcnn"], seeds=[1], preset="quick", eval_images=2, progress=False)
    # The GRoIE arm finishes first: no pair yet, the table still says "not run yet".
    collected = experiments.paper_experiment(tmp_path, **kw, extractors=["groie"])
    assert calls == ["groie"] and collected["systems"] == {}
    assert not (tmp_path / "faster_rcnn" / "seed1" / "results.json").exists()
    assert "| Faster R-CNN | baseline / + GRoIE | not run yet |" in (tmp_path / "results.md").read_text()
    # The baseline's process then finds the GRoIE result and writes the pair, without retraining it.
    collected = experiments.paper_experiment(tmp_path, **kw, extractors=["baseline"])
    assert calls == ["groie", "baseline"]
    assert [r["extractor"] for r in collected["systems"]["faster_rcnn"][0]["runs"]] == ["baseline", "groie"]
    args = _parser().parse_args(["experiment", "--extractors", "groie"])
    assert args.extractors == ["groie"] and _parser().parse_args(["experiment"]).extractors == ["baseline", "groie"]
    with pytest.raises(ValueError, match="extractors must be"):
        experiments.experiment(tmp_path, extractors=["roipool"])
    # The other arm finishing while this call trains (the usual case: started together) is found at the end.
    pair = dict(model="faster_rcnn", preset="quick", eval_images=2, seed=2, progress=False)

    def train_groie_while_baseline_finishes(mcfg, tcfg, run_dir, **kw):
        if mcfg.extractor == "groie":
            experiments.experiment(run_dir.parent, **pair, extractors=["baseline"])
        return fake_train(mcfg, tcfg, run_dir, **kw)

    monkeypatch.setattr(experiments, "train", train_groie_while_baseline_finishes)
    results = experiments.experiment(tmp_path / "seed2", **pair, extractors=["groie"])
    assert "complete" not in results and [r["extractor"] for r in results["runs"]] == ["baseline", "groie"]
    assert (tmp_path / "seed2" / "results.json").is_file()


def test_experiment_cli_system_selection():
    parse = _parser().parse_args
    assert _experiment_systems(parse(["experiment"])) == ["faster_rcnn", "grid_rcnn", "mask_rcnn", "gcnet"]
    assert _experiment_systems(parse(["experiment", "--model", "grid_rcnn"])) == ["grid_rcnn"]
    assert _experiment_systems(parse(["experiment", "--gcnet"])) == ["gcnet"]
    assert _experiment_systems(parse(["experiment", "--systems", "gcnet", "faster_rcnn"])) == ["gcnet", "faster_rcnn"]
    with pytest.raises(ValueError, match="GC-Net"):
        _experiment_systems(parse(["experiment", "--gcnet", "--model", "grid_rcnn"]))
    args = parse(["experiment", "--systems", "mask_rcnn", "--seeds", "0", "1", "2"])
    assert args.seeds == [0, 1, 2] and not args.restart


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.slow
def test_parity_cli_on_a_grid_rcnn_checkpoint(tmp_path, monkeypatch, capsys):
    """The grid branch (its GRoIE 14x14 extractor, heatmaps and decoding) gives the same detections through
    the Triton interpreter as through the reference backend."""
    from groie_triton.detection.__main__ import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tcfg = TrainConfig(**{**PRESETS["quick"]["train"], "iterations": 4, "checkpoint_every": 4})
    train(ModelConfig(**TINY_GRID, extractor="groie"), tcfg, tmp_path / "run", progress=False)
    out = tmp_path / "parity.json"
    argv = [
        "parity",
        "--checkpoint",
        str(tmp_path / "run" / "last.pt"),
        "--images",
        "1",
        "--proposals",
        "10",
        "--max-detections",
        "5",
        "--score-thresh",
        "0",
        "--json",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["model_config"]["model"] == "grid_rcnn" and result["backend_triton"] == "triton-interpreter"
    assert result["num_detections"] == [5] and result["same_labels_and_order"]
    assert result["max_box_abs_diff"] <= 1e-3 and result["ap_max_abs_diff"] <= 0.1 and result["passed"]
