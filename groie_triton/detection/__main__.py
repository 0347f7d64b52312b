"""``python -m groie_triton.detection train|evaluate|parity|experiment``: see ``--help`` of each command.

``experiment`` runs baseline vs GRoIE for the systems of the GRoIE paper's table (all four by default) and
resumes by default: finished runs are skipped, interrupted ones continue from their checkpoints.

Errors a user can cause (missing or corrupt checkpoint, a checkpoint of another model or extractor,
unknown names, an empty image list) print one ``error:`` line on stderr and exit with status 1; argparse
usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from groie_triton.detection.config import PRESETS, DetectionError, TrainConfig
from groie_triton.detection.data import DATASETS
from groie_triton.detection.evaluation import evaluate
from groie_triton.detection.experiments import EXTRACTOR_ORDER, SYSTEMS, paper_experiment, paper_table
from groie_triton.detection.models import BACKBONES, EXTRACTORS, MODELS, NORMS, ModelConfig
from groie_triton.detection.parity_check import QUICK_TEST_TIME, QUICK_TRAIN, parity
from groie_triton.detection.training import train


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


def _format_metrics(metrics: dict[str, float | None]) -> str:
    return "  ".join(f"{k}={'n/a' if v is None else f'{v:.1f}'}" for k, v in metrics.items())


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--json", metavar="PATH", help="write the machine-readable result here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _test_time(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proposals", type=int, help="RPN proposals per image at test time (default: checkpoint's)")
    p.add_argument("--max-detections", type=int, help="detections per image (default: checkpoint's)")
    p.add_argument("--score-thresh", type=float, help="minimum detection score (default: checkpoint's)")


def _test_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "rpn_post_nms_top_n_test": args.proposals,
        "box_detections_per_img": args.max_detections,
        "box_score_thresh": args.score_thresh,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m groie_triton.detection",
        description="Faster/Mask/Grid R-CNN with baseline or GRoIE RoI extraction on the procedural shapes set.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a detector; checkpoints to OUT/last.pt")
    t.add_argument("--quick", action="store_true", help="tiny model and schedule (seconds on a CPU)")
    t.add_argument("--model", choices=MODELS, default="mask_rcnn")
    t.add_argument("--extractor", choices=EXTRACTORS, default="baseline")
    t.add_argument("--backbone", choices=BACKBONES, default="resnet18")
    t.add_argument("--norm", choices=NORMS, default="gn")
    t.add_argument("--gcnet", action="store_true", help="GC-Net context blocks in c3-c5")
    t.add_argument("--dataset", choices=sorted(DATASETS), default="shapes")
    t.add_argument("--train-images", type=int)
    t.add_argument("--image-size", type=int)
    t.add_argument("--fpn-channels", type=int)
    t.add_argument("--iterations", type=int)
    t.add_argument("--batch-size", type=int, help="global batch (split over DDP ranks)")
    t.add_argument("--lr", type=float)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data-seed", type=int, default=0)
    t.add_argument("--out", default=None, help="run directory (default: runs/detection/MODEL_EXTRACTOR)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--stop-after", type=int, help="stop after N iterations without a final checkpoint (tests)")
    t.add_argument("--eval-images", type=int, default=0, help="evaluate on N validation images at the end")
    _common(t)

    e = sub.add_parser("evaluate", help="COCO bbox/segm AP of a checkpoint on the validation split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--quick", action="store_true", help="2 images")
    e.add_argument("--images", type=int, help="number of validation images (default 50, --quick 2)")
    e.add_argument("--dataset", choices=sorted(DATASETS), default=None)
    e.add_argument("--extractor", choices=EXTRACTORS, help="fail unless the checkpoint uses this extractor")
    e.add_argument("--model", choices=MODELS, help="fail unless the checkpoint is this model")
    e.add_argument("--detections", metavar="PATH", help="also torch.save the raw per-image outputs")
    _test_time(e)
    _common(e)

    q = sub.add_parser("parity", help="one GRoIE checkpoint through the reference and the Triton kernels")
    q.add_argument("--checkpoint", help="GRoIE checkpoint (default with --quick: train a tiny one first)")
    q.add_argument(
        "--quick",
        action="store_true",
        help=f"without --checkpoint train a tiny one ({QUICK_TRAIN['image_size']} px, {QUICK_TRAIN['iterations']} "
        f"iterations); {QUICK_TEST_TIME['proposals']} proposals, {QUICK_TEST_TIME['max_detections']} detections, "
        f"score >= {QUICK_TEST_TIME['score_thresh']:g}; one torch thread",
    )
    q.add_argument(
        "--model", choices=MODELS, default="mask_rcnn", help="the detector --quick trains (ignored with --checkpoint)"
    )
    q.add_argument("--images", type=int, default=2, help="validation images compared (default 2)")
    q.add_argument("--box-tol", type=float, default=1e-3, help="max box coordinate difference (pixels)")
    q.add_argument("--ap-tol", type=float, default=0.1, help="max AP difference (points)")
    _test_time(q)
    _common(q)

    x = sub.add_parser(
        "experiment",
        help="baseline vs GRoIE for the paper's systems, same seed, data and schedule; OUT/results.{json,md}",
    )
    x.add_argument("--out", default="runs/detection/experiment")
    x.add_argument("--systems", nargs="+", choices=tuple(SYSTEMS), help=f"default: all ({', '.join(SYSTEMS)})")
    x.add_argument("--model", choices=MODELS, help="one detector only (same as --systems MODEL)")
    x.add_argument("--gcnet", action="store_true", help="the GC-Net system only (same as --systems gcnet)")
    x.add_argument("--quick", action="store_true", help="the quick preset (smoke test of the experiment)")
    x.add_argument("--iterations", type=int)
    x.add_argument("--eval-images", type=int)
    x.add_argument("--seed", type=int, default=0, help="one seed (default 0)")
    x.add_argument("--seeds", type=int, nargs="+", help="several seeds, each a full pair (overrides --seed)")
    x.add_argument("--resume", action="store_true", help="the default: skip finished runs, continue interrupted ones")
    x.add_argument("--restart", action="store_true", help="retrain every selected run from scratch")
    x.add_argument(
        "--extractors", nargs="+", choices=EXTRACTOR_ORDER, default=list(EXTRACTOR_ORDER),
        help="arms to train (default both); e.g. one process per arm: a pair's tables are written when both finished",
    )
    _common(x)
    return parser


def _train(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS["quick" if args.quick else "experiment"]
    model_kw = dict(preset["model"])
    model_kw.update(
        model=args.model, extractor=args.extractor, backbone=args.backbone, norm=args.norm, gcnet=args.gcnet
    )
    for key in ("image_size", "fpn_channels"):
        if getattr(args, key) is not None:
            model_kw[key] = getattr(args, key)
    if args.fpn_channels is not None:
        model_kw["mask_head_channels"] = args.fpn_channels
    train_kw = dict(preset["train"])
    train_kw.update(dataset=args.dataset, seed=args.seed, data_seed=args.data_seed)
    for key in ("train_images", "iterations", "batch_size", "lr", "checkpoint_every"):
        if getattr(args, key) is not None:
            train_kw[key] = getattr(args, key)
    mcfg, tcfg = ModelConfig(**model_kw), TrainConfig(**train_kw)
    out = args.out or f"runs/detection/{args.model}_{args.extractor}{'_gcnet' if args.gcnet else ''}"
    summary = train(
        mcfg,
        tcfg,
        out,
        device=args.device,
        resume=args.resume,
        progress=not args.no_progress,
        stop_after=args.stop_after,
    )
    if os.environ.get("RANK", "0") != "0":
        return summary
    print(f"checkpoint {summary['checkpoint']}  iterations {summary['iterations']}  losses {summary['final_losses']}")
    if args.eval_images and not summary["interrupted"] and summary["world_size"] == 1:
        result = evaluate(summary["checkpoint"], images=args.eval_images, device=args.device)
        summary["metrics"] = result["metrics"]
        print(_format_metrics(result["metrics"]))
    return summary


def _experiment_systems(args: argparse.Namespace) -> list[str]:
    """--systems, or the one system --model / --gcnet names, or all."""
    if args.gcnet:
        if args.model not in (None, "mask_rcnn") or (args.systems and args.systems != ["gcnet"]):
            raise ValueError("--gcnet selects the GC-Net system (Mask R-CNN + context blocks) only")
        return ["gcnet"]
    if args.model is not None:
        if args.systems and args.systems != [args.model]:
            raise ValueError("give either --model or --systems")
        return [args.model]
    return list(args.systems or SYSTEMS)


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            result = _train(args)
        elif args.command == "evaluate":
            images = args.images if args.images is not None else (2 if args.quick else 50)
            result = evaluate(
                args.checkpoint,
                images=images,
                dataset=args.dataset,
                device=args.device,
                extractor=args.extractor,
                model=args.model,
                progress=not args.no_progress,
                detections_path=args.detections,
                test_overrides=_test_overrides(args),
            )
            print(f"{result['images']} images, backend {result['backend']}: {_format_metrics(result['metrics'])}")
        elif args.command == "parity":
            result = parity(
                args.checkpoint,
                images=args.images,
                device=args.device,
                quick=args.quick,
                proposals=args.proposals,
                max_detections=args.max_detections,
                score_thresh=args.score_thresh,
                box_tol=args.box_tol,
                ap_tol=args.ap_tol,
                model=args.model,
            )
            print(
                f"parity {'PASSED' if result['passed'] else 'FAILED'} on {result['images']} images: "
                f"max_box_abs_diff={result['max_box_abs_diff']:.3g} "
                f"same_labels_and_order={result['same_labels_and_order']} "
                f"ap_max_abs_diff={result['ap_max_abs_diff']:.3g}"
            )
            print(f"  reference ({result['backend_reference']}): {_format_metrics(result['ap_reference'])}")
            print(f"  triton    ({result['backend_triton']}): {_format_metrics(result['ap_triton'])}")
        else:
            result = paper_experiment(
                args.out,
                systems=_experiment_systems(args),
                seeds=args.seeds or [args.seed],
                preset="quick" if args.quick else "experiment",
                iterations=args.iterations,
                eval_images=args.eval_images,
                device=args.device,
                resume=not args.restart,
                progress=not args.no_progress,
                extractors=args.extractors,
            )
            print(paper_table(result))
    except (DetectionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    if os.environ.get("RANK", "0") == "0":
        _write_json(args.json, result)
    if args.command == "parity" and not result["passed"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
