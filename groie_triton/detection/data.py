"""The procedural "shapes" instance-segmentation dataset, its COCO export, and batches of it on a device.

Nothing can be downloaded on the machines this project is developed on, so the detector is trained and
evaluated on generated images: rectangles, ellipses, triangles and rings of random colour, size, aspect
and angle on a shaded, noisy background with unannotated clutter (thin lines and specks). Objects occlude
each other (a later object hides part of an earlier one; the earlier one's mask and box are what stays
visible) and their sizes are log-uniform from a few pixels to most of the image, so with the model's level
mapping every FPN level receives RoIs.

Every image is a pure function of ``(seed, split, index)``: the dataset is deterministic, order-independent
and needs no storage.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CLASSES",
    "DATASETS",
    "ShapesConfig",
    "ShapesDataset",
    "build_dataset",
    "coco_dict",
    "collate",
    "export_coco_json",
]

CLASSES = ("rectangle", "ellipse", "triangle", "ring")
_SPLITS = {"train": 0, "val": 1, "test": 2}
_MAX_PLACEMENT_TRIES = 30


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of a shapes split. ``num_images`` images of ``image_size`` x ``image_size`` pixels.

    ``min_object_size`` is in pixels, ``max_object_size`` a fraction of the image side; an object keeps at
    least ``1 - max_occlusion`` of its pixels and at least ``min_visible_pixels`` visible pixels.
    """

    num_images: int = 256
    image_size: int = 256
    seed: int = 0
    split: str = "train"
    min_objects: int = 2
    max_objects: int = 8
    min_object_size: float = 8.0
    max_object_size: float = 0.8
    clutter: int = 8
    max_occlusion: float = 0.5
    min_visible_pixels: int = 20

    def __post_init__(self) -> None:
        if self.split not in _SPLITS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {sorted(_SPLITS)}")
        if self.num_images <= 0:
            raise ValueError(f"empty image list: the {self.split!r} split has num_images={self.num_images}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects} and {self.max_objects}")
        if not 0 < self.max_occlusion < 1:
            raise ValueError(f"max_occlusion must be in (0, 1), got {self.max_occlusion}")


def _rotated_coords(cx: float, cy: float, angle: float, xs: np.ndarray, ys: np.ndarray):
    dx, dy = xs - cx, ys - cy
    c, s = math.cos(angle), math.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def _shape_mask(kind: str, params: dict[str, float], size: int) -> np.ndarray:
    """Rasterise one shape at pixel centres; returns a bool [size, size] mask."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    u, v = _rotated_coords(params["cx"], params["cy"], params["angle"], xs, ys)
    a, b = params["w"] / 2, params["h"] / 2
    if kind == "rectangle":
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if kind == "ellipse":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "ring":
        r = params["inner"]
        return ((u / a) ** 2 + (v / b) ** 2 <= 1.0) & ((u / (a * r)) ** 2 + (v / (b * r)) ** 2 > 1.0)
    if kind == "triangle":
        angles = [params["phase"] + t for t in (0.0, params["t1"], params["t2"])]
        verts = [(a * math.cos(t), b * math.sin(t)) for t in angles]
        inside_pos = np.ones_like(u, dtype=bool)
        inside_neg = np.ones_like(u, dtype=bool)
        for (x0, y0), (x1, y1) in zip(verts, verts[1:] + verts[:1], strict=True):
            cross = (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0)
            inside_pos &= cross >= 0
            inside_neg &= cross <= 0
        return inside_pos | inside_neg
    raise ValueError(f"unknown shape kind {kind!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear colour gradient plus low-frequency shading: [size, size, 3] float in [0, 1]."""
    c0, c1 = rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 1.0, 3)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size
    t = (xs * math.cos(theta) + ys * math.sin(theta) + 1.5) / 3.0
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    fx, fy, ph = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 2 * math.pi)
    shading = 0.08 * np.sin(2 * math.pi * (fx * xs + fy * ys) + ph)
    return img + shading[..., None]


def _draw_clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Unannotated distractors: thin straight lines and small specks."""
    size = img.shape[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    for _ in range(count):
        color = rng.uniform(0, 1, 3)
        if rng.random() < 0.6:
            x0, y0, x1, y1 = rng.uniform(0, size, 4)
            length = math.hypot(x1 - x0, y1 - y0) + 1e-6
            dist = np.abs((y1 - y0) * xs - (x1 - x0) * ys + x1 * y0 - y1 * x0) / length
            t = ((xs - x0) * (x1 - x0) + (ys - y0) * (y1 - y0)) / length**2
            mask = (dist <= rng.uniform(0.5, 1.2)) & (t >= 0) & (t <= 1)
        else:
            cx, cy = rng.uniform(0, size, 2)
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= rng.uniform(0.8, 2.5) ** 2
        img[mask] = color


def _sample_shape(rng: np.random.Generator, cfg: ShapesConfig) -> tuple[str, dict[str, float]]:
    size = cfg.image_size
    label = int(rng.integers(len(CLASSES)))
    kind = CLASSES[label]
    lo, hi = math.log(cfg.min_object_size), math.log(cfg.max_object_size * size)
    s = math.exp(rng.uniform(lo, hi))
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    params = {
        "cx": rng.uniform(0.1 * size, 0.9 * size),
        "cy": rng.uniform(0.1 * size, 0.9 * size),
        "w": s * math.sqrt(aspect),
        "h": s / math.sqrt(aspect),
        "angle": rng.uniform(0, math.pi),
        "inner": rng.uniform(0.45, 0.7),
        "phase": rng.uniform(0, 2 * math.pi),
        "t1": 2 * math.pi / 3 + rng.uniform(-0.4, 0.4),
        "t2": 4 * math.pi / 3 + rng.uniform(-0.4, 0.4),
    }
    if kind == "ring":
        # A ring needs a wall at least ~2 px thick to be a ring rather than a speckled ellipse.
        min_side = 4.0 / (1.0 - params["inner"])
        params["w"], params["h"] = max(params["w"], min_side), max(params["h"], min_side)
    return kind, params


def _color_far_from(rng: np.random.Generator, reference: np.ndarray) -> np.ndarray:
    color = rng.uniform(0, 1, 3)
    for _ in range(10):
        if np.abs(color - reference).sum() >= 0.6:
            break
        color = rng.uniform(0, 1, 3)
    return color


def generate_sample(cfg: ShapesConfig, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate image ``index`` of a split.

    Returns ``(image [H, W, 3] float32 in [0, 1], labels [N] int64 in 1..len(CLASSES), masks [N, H, W]
    bool)``; every mask has at least ``cfg.min_visible_pixels`` pixels.
    """
    if not 0 <= index < cfg.num_images:
        raise IndexError(f"image index {index} out of range for {cfg.num_images} images")
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _SPLITS[cfg.split], index]))
    size = cfg.image_size
    img = _background(rng, size)
    _draw_clutter(rng, img, cfg.clutter)

    full: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    labels: list[int] = []
    target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(target):
        for _ in range(_MAX_PLACEMENT_TRIES):
            kind, params = _sample_shape(rng, cfg)
            mask = _shape_mask(kind, params, size)
            if mask.sum() < cfg.min_visible_pixels:
                continue
            still = [vis & ~mask for vis in visible]
            if all(
                s.sum() >= max(cfg.min_visible_pixels, (1 - cfg.max_occlusion) * f.sum())
                for s, f in zip(still, full, strict=True)
            ):
                break
        else:
            continue
        color = _color_far_from(rng, img[mask].mean(axis=0))
        shade = 1.0 + 0.15 * rng.uniform(-1, 1) * (np.mgrid[0:size, 0:size][0] / size - 0.5)
        img[mask] = color * shade[mask][:, None]
        visible = still + [mask]
        full.append(mask)
        labels.append(CLASSES.index(kind) + 1)

    img = img + rng.normal(0.0, 0.03, img.shape)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    masks = np.stack(visible) if visible else np.zeros((0, size, size), dtype=bool)
    return img, np.asarray(labels, dtype=np.int64), masks


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes (x1, y1, x2, y2) in pixel-edge coordinates of bool masks [N, H, W] -> float32 [N, 4]."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


class ShapesDataset(torch.utils.data.Dataset):
    """The shapes split described by a :class:`ShapesConfig`.

    ``dataset[i]`` returns ``(image, target)``: image float32 [3, S, S] in [0, 1]; target the dict
    torchvision's detection models take: ``boxes`` float32 [N, 4] (x1, y1, x2, y2, tight around the visible
    mask), ``labels`` int64 [N] in 1..4, ``masks`` uint8 [N, S, S], ``image_id`` int (COCO id, index + 1),
    ``area`` float32 [N] (mask pixels), ``iscrowd`` int64 [N] zeros.
    Raises ValueError for an empty split (``num_images <= 0``) and IndexError for an index out of range.
    """

    def __init__(self, config: ShapesConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else ShapesConfig()
        self.config = ShapesConfig(**{**asdict(base), **overrides})
        self.classes = CLASSES

    def __len__(self) -> int:
        return self.config.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img, labels, masks = generate_sample(self.config, index)
        target = {
            "boxes": torch.from_numpy(masks_to_boxes(masks)),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks.astype(np.uint8)),
            "image_id": index + 1,
            "area": torch.from_numpy(masks.sum(axis=(1, 2)).astype(np.float32)),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
        }
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), target


DATASETS = {"shapes": ShapesDataset}


def build_dataset(name: str, **config: Any) -> ShapesDataset:
    """Build a dataset by name (only ``"shapes"``); raises ValueError for an unknown name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**config)


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_dict(dataset: ShapesDataset) -> dict[str, Any]:
    """The dataset's ground truth as a COCO instances dict (RLE segmentations, ids from 1)."""
    images, annotations = [], []
    size = dataset.config.image_size
    for index in range(len(dataset)):
        _, labels, masks = generate_sample(dataset.config, index)
        image_id = index + 1
        images.append({"id": image_id, "width": size, "height": size, "file_name": f"{index:06d}.png"})
        for label, mask, box in zip(labels, masks, masks_to_boxes(masks), strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(mask.sum()),
                    "segmentation": _rle(mask),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "groie_triton procedural shapes", **asdict(dataset.config)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)],
    }


def export_coco_json(dataset: ShapesDataset, path: str | Path) -> Path:
    """Write :func:`coco_dict` to ``path`` (loadable by ``pycocotools.coco.COCO``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_dict(dataset)))
    return path


def _flip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def collate(
    dataset: ShapesDataset,
    indices: list[int],
    device: torch.device,
    *,
    hflip_seed: tuple[int, ...] | None = None,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Load ``indices`` as (images, targets) on ``device``; with ``hflip_seed``, flip each image with
    probability 1/2 decided by ``(hflip_seed, index)`` (deterministic, independent of rank and order)."""
    images, targets = [], []
    for index in indices:
        image, target = dataset[index]
        if hflip_seed is not None and np.random.default_rng([*hflip_seed, index]).random() < 0.5:
            image, target = _flip(image, target)
        images.append(image.to(device))
        targets.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in target.items()})
    return images, targets
