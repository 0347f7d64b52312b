"""The experiment: baseline vs GRoIE RoI extraction trained and evaluated with the same seed, data and schedule."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from groie_triton.detection.config import PRESETS, TrainConfig
from groie_triton.detection.evaluate import evaluate
from groie_triton.detection.models import ModelConfig
from groie_triton.detection.train import train

__all__ = ["experiment", "results_table"]


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
    markdown table of box and mask AP); returns the results dict. ``resume`` continues each run from its
    checkpoint where there is one. Raises KeyError for an unknown ``preset``, plus what :func:`train` and
    :func:`evaluate` raise.
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
        "model_config": dict(spec["model"]),
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
