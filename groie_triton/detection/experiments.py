"""The experiment: baseline vs GRoIE RoI extraction trained and evaluated with the same seed, data and schedule.

:func:`experiment` runs one pair (one detector, one seed); :func:`paper_experiment` runs the pairs of the GRoIE
paper's table (Faster R-CNN, Grid R-CNN, Mask R-CNN, GC-Net Mask R-CNN; one or several seeds) and writes the
table. Everything resumes: a run whose evaluation is on disk for the same configuration is skipped, a run
with a checkpoint continues from it (bit-exactly, see :mod:`.training`).

Layout under ``out_dir`` of :func:`paper_experiment`::

    SYSTEM/seedS/{baseline,groie}/last.pt      checkpoint (resume point)
    SYSTEM/seedS/{baseline,groie}/result.json  its evaluation and timings (the "done" marker)
    SYSTEM/seedS/results.{json,md}             the pair
    results.{json,md}                          every pair on disk, in the paper's layout
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from groie_triton.detection.checkpoint import canonical
from groie_triton.detection.config import PRESETS, TrainConfig
from groie_triton.detection.evaluation import evaluate
from groie_triton.detection.models import ModelConfig
from groie_triton.detection.training import train

__all__ = ["EXTRACTOR_ORDER", "SYSTEMS", "collect", "experiment", "paper_experiment", "paper_table", "results_table"]

EXTRACTOR_ORDER = ("baseline", "groie")
# The GRoIE paper's table, in its order: name -> (label, ModelConfig overrides, has masks).
SYSTEMS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "faster_rcnn": ("Faster R-CNN", {"model": "faster_rcnn"}, False),
    "grid_rcnn": ("Grid R-CNN", {"model": "grid_rcnn"}, False),
    "mask_rcnn": ("Mask R-CNN", {"model": "mask_rcnn"}, True),
    "gcnet": ("GC-Net (Mask R-CNN + context blocks)", {"model": "mask_rcnn", "gcnet": True}, True),
}


def _configs(
    model: str, gcnet: bool, extractor: str, preset: str, iterations: int | None, seed: int
) -> tuple[ModelConfig, TrainConfig]:
    spec = PRESETS[preset]
    tcfg = TrainConfig(**{**spec["train"], "seed": seed, **({"iterations": iterations} if iterations else {})})
    mcfg = ModelConfig(**{**spec["model"], "model": model, "extractor": extractor, "gcnet": gcnet})
    return mcfg, tcfg


def _finished(run_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved row of a finished run with this exact configuration, else None."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return row if row.get("fingerprint") == fingerprint else None


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
    resume: bool = True,
    progress: bool = True,
    extractors: tuple[str, ...] | list[str] = EXTRACTOR_ORDER,
) -> dict[str, Any]:
    """Train and evaluate the baseline and GRoIE ``model`` with the same seed, data and schedule.

    Writes ``out_dir/{baseline,groie}/last.pt`` and ``result.json`` (the run's metrics and timings),
    ``out_dir/results.json`` and ``out_dir/results.md`` (a markdown table of box and mask AP); returns the
    results dict. ``resume`` (the default) skips a run whose ``result.json`` holds the same configuration
    and continues one from its ``last.pt``; ``resume=False`` trains both from scratch. Raises KeyError for
    an unknown ``preset``, CheckpointError when a checkpoint to resume holds another configuration, plus what
    :func:`train` and :func:`evaluate` raise.

    ``extractors``: the arms this call trains (default both). The other arm is read from its ``result.json``
    when it has finished (same configuration), so the two arms of a pair can run in two processes at once;
    the pair's ``results.{json,md}`` are written by whichever call finds both finished. Until then the
    returned dict has ``"complete": False`` and the arms that are done under ``"runs"``.
    """
    unknown = [e for e in extractors if e not in EXTRACTOR_ORDER]
    if unknown or not extractors:
        raise ValueError(f"extractors must be a non-empty subset of {EXTRACTOR_ORDER}, got {list(extractors)}")
    out_dir = Path(out_dir)
    n_eval = eval_images or PRESETS[preset]["eval_images"]
    done: dict[str, dict[str, Any]] = {}
    fingerprints = {}
    for extractor in EXTRACTOR_ORDER:
        mcfg, tcfg = _configs(model, gcnet, extractor, preset, iterations, seed)
        run_dir = out_dir / extractor
        fingerprint = canonical({"model_config": mcfg.to_dict(), "train_config": asdict(tcfg), "eval_images": n_eval})
        fingerprints[extractor] = fingerprint
        if extractor not in extractors:
            continue  # another process's arm: read once this call's arms are done (below)
        row = _finished(run_dir, fingerprint) if resume else None
        if row is None:
            summary = train(
                mcfg, tcfg, run_dir, device=device, resume=resume and (run_dir / "last.pt").is_file(), progress=progress
            )
            result = evaluate(run_dir / "last.pt", images=n_eval, device=device, progress=progress)
            history = summary["history"]
            row = {
                "extractor": extractor,
                "train_seconds": summary["total_seconds"],
                "seconds_per_iteration": summary["total_seconds"] / tcfg.iterations,
                "eval_seconds": result["seconds"],
                "final_loss": history[-1]["loss"] if history else None,
                "metrics": result["metrics"],
                "fingerprint": fingerprint,
            }
            (run_dir / "result.json").write_text(json.dumps(row, indent=2))
        done[extractor] = row
    for extractor in EXTRACTOR_ORDER:
        if extractor not in done and (row := _finished(out_dir / extractor, fingerprints[extractor])) is not None:
            done[extractor] = row
    runs = [{k: v for k, v in done[e].items() if k != "fingerprint"} for e in EXTRACTOR_ORDER if e in done]
    if len(runs) < len(EXTRACTOR_ORDER):
        return {"model": model, "gcnet": gcnet, "seed": seed, "complete": False, "runs": runs}
    results = {
        "model": model,
        "gcnet": gcnet,
        "seed": seed,
        "preset": preset,
        "model_config": dict(PRESETS[preset]["model"]),
        "train_config": asdict(tcfg),
        "eval_images": n_eval,
        "device": device,
        "torch": torch.__version__,
        "runs": runs,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(results_table(results))
    return results


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def results_table(results: dict[str, Any]) -> str:
    """Markdown table of an :func:`experiment` result (one pair)."""
    header = "| RoI extractor | box AP | box AP50 | box AP75 | mask AP | mask AP50 | mask AP75 | train time |\n"
    header += "|---|---|---|---|---|---|---|---|\n"
    lines = []
    for row in results["runs"]:
        m = row["metrics"]
        lines.append(
            f"| {row['extractor']} | {_fmt(m.get('bbox_AP'))} | {_fmt(m.get('bbox_AP50'))} "
            f"| {_fmt(m.get('bbox_AP75'))} "
            f"| {_fmt(m.get('segm_AP'))} | {_fmt(m.get('segm_AP50'))} | {_fmt(m.get('segm_AP75'))} "
            f"| {row['train_seconds'] / 60:.1f} min |"
        )
    tc = results["train_config"]
    caption = (
        f"{results['model']}{' + GC-Net' if results['gcnet'] else ''}, resnet18-FPN from scratch, shapes "
        f"{tc['train_images']} train / {results['eval_images']} val images, {tc['iterations']} iterations x "
        f"batch {tc['batch_size']}, seed {tc['seed']}, {results['device']}.\n\n"
    )
    return caption + header + "\n".join(lines) + "\n"


def paper_experiment(
    out_dir: str | Path,
    *,
    systems: tuple[str, ...] | list[str] = tuple(SYSTEMS),
    seeds: tuple[int, ...] | list[int] = (0,),
    preset: str = "experiment",
    iterations: int | None = None,
    eval_images: int | None = None,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    extractors: tuple[str, ...] | list[str] = EXTRACTOR_ORDER,
) -> dict[str, Any]:
    """Run :func:`experiment` for every system (keys of :data:`SYSTEMS`) and seed, in ``out_dir/SYSTEM/seedS``,
    then write ``out_dir/results.json`` and ``results.md``: every pair on disk (also those of earlier calls),
    in the paper's layout (:func:`paper_table`); ``extractors`` as :func:`experiment` (pairs with an arm still
    running elsewhere are left out of the table). Returns the collected results. Raises ValueError for an
    unknown system or no seed, plus what :func:`experiment` raises.
    """
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system {', '.join(unknown)}; available: {', '.join(SYSTEMS)}")
    if not seeds:
        raise ValueError("no seed given")
    out_dir = Path(out_dir)
    for system in systems:
        overrides = SYSTEMS[system][1]
        for seed in seeds:
            experiment(
                out_dir / system / f"seed{seed}",
                model=overrides["model"],
                gcnet=overrides.get("gcnet", False),
                preset=preset,
                iterations=iterations,
                eval_images=eval_images,
                seed=seed,
                device=device,
                resume=resume,
                progress=progress,
                extractors=extractors,
            )
    command = f"python -m groie_triton.detection experiment --out {out_dir}"
    command += " --quick" if preset == "quick" else ""
    command += f" --iterations {iterations}" if iterations else ""
    command += f" --eval-images {eval_images}" if eval_images else ""
    command += f" --seeds {' '.join(str(s) for s in seeds)}" if list(seeds) != [0] else ""
    command += f" --device {device}" if device != "cpu" else ""
    return collect(out_dir, command=command)


def collect(out_dir: str | Path, command: str = "python -m groie_triton.detection experiment") -> dict[str, Any]:
    """Gather every ``SYSTEM/seedS/results.json`` under ``out_dir`` and (re)write ``out_dir/results.json`` and
    ``results.md`` (:func:`paper_table`; ``command`` is what produces the missing rows); returns
    ``{"systems": {system: [pair results, by seed]}}``."""
    out_dir = Path(out_dir)
    found: dict[str, list[dict[str, Any]]] = {}
    for system in SYSTEMS:
        pairs = [json.loads(p.read_text()) for p in sorted((out_dir / system).glob("seed*/results.json"))]
        if pairs:
            found[system] = sorted(pairs, key=lambda r: r["seed"])
    collected = {"systems": found}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(collected, indent=2))
    (out_dir / "results.md").write_text(paper_table(collected, command))
    return collected


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def paper_table(collected: dict[str, Any], command: str = "python -m groie_triton.detection experiment") -> str:
    """The paper's layout: per system a baseline row and a "+ GRoIE" row with box AP and mask AP (mean ± sample
    standard deviation over the seeds run), then one line per seed with the GRoIE gains. Systems without a
    finished pair get a "not run yet" row, and the command that produces them follows the table."""
    lines = [
        "| System | RoI extractor | box AP | mask AP | seeds |",
        "|---|---|---|---|---|",
    ]
    per_seed = [
        "| System | seed | box AP baseline -> GRoIE (gain) | mask AP baseline -> GRoIE (gain) |",
        "|---|---|---|---|",
    ]
    schedules = set()
    missing = []
    for system, (label, _, has_masks) in SYSTEMS.items():
        pairs = collected["systems"].get(system, [])
        if not pairs:
            lines.append(f"| {label} | baseline / + GRoIE | not run yet | not run yet | – |")
            missing.append(system)
            continue
        seeds = ", ".join(str(p["seed"]) for p in pairs)
        for extractor, name in zip(EXTRACTOR_ORDER, ("baseline", "+ GRoIE"), strict=True):
            runs = [next(r for r in p["runs"] if r["extractor"] == extractor) for p in pairs]
            box = _cell([r["metrics"].get("bbox_AP") for r in runs])
            mask = _cell([r["metrics"].get("segm_AP") for r in runs]) if has_masks else "–"
            lines.append(f"| {label} | {name} | {box} | {mask} | {seeds} |")
        for p in pairs:
            b, g = (next(r for r in p["runs"] if r["extractor"] == e)["metrics"] for e in EXTRACTOR_ORDER)
            cells = []
            for key in ("bbox_AP", "segm_AP") if has_masks else ("bbox_AP",):
                if b.get(key) is None or g.get(key) is None:
                    cells.append("n/a")
                else:
                    cells.append(f"{b[key]:.1f} -> {g[key]:.1f} ({g[key] - b[key]:+.1f})")
            per_seed.append(f"| {label} | {p['seed']} | {cells[0]} | {cells[1] if has_masks else '–'} |")
            tc = p["train_config"]
            schedules.add(
                f"{p['preset']} preset: {p['model_config'].get('image_size')} px, FPN width "
                f"{p['model_config'].get('fpn_channels')}, {tc['train_images']} train images, {tc['iterations']} "
                f"iterations x batch {tc['batch_size']}, {p['eval_images']} val images, {p['device']}"
            )
    caption = "Box and mask AP (COCO AP in points, pycocotools) on the shapes validation split"
    if schedules:
        caption += "; " + "; ".join(sorted(schedules))
    text = caption + ".\n\n" + "\n".join(lines) + "\n"
    if missing:
        text += f"\nNot run yet: `{command} --systems {' '.join(missing)}`\n"
    if len(per_seed) > 2:
        text += "\n" + "\n".join(per_seed) + "\n"
    return text
