"""Reference Faster/Mask/Grid R-CNN pipeline: GRoIE accuracy parity from training to COCO AP.

* :mod:`.data` - the procedural "shapes" instance-segmentation dataset, its COCO export and batching;
* :mod:`.models` - detector builders keyed by name (torchvision Faster/Mask R-CNN, Grid R-CNN; baseline or
  GRoIE RoI extraction, GC-Net option); :mod:`.grid` - Grid R-CNN's RoI head (mmdetection's semantics);
* :mod:`.config` - the training schedule, presets, device and errors;
* :mod:`.checkpoint` - atomic, validated checkpoints and the model they describe;
* :mod:`.training` - training (resume, DDP); :mod:`.evaluation` - pycocotools evaluation;
* :mod:`.parity_check` - reference vs Triton detections; :mod:`.experiments` - baseline vs GRoIE for the
  paper's systems;
* ``python -m groie_triton.detection train|evaluate|parity|experiment`` - the command line.
"""

from groie_triton.detection.checkpoint import load_checkpoint
from groie_triton.detection.config import PRESETS, CheckpointError, DetectionError, TrainConfig
from groie_triton.detection.data import (
    CLASSES,
    ShapesConfig,
    ShapesDataset,
    build_dataset,
    coco_dict,
    export_coco_json,
)
from groie_triton.detection.evaluation import coco_evaluate, evaluate, predict
from groie_triton.detection.experiments import SYSTEMS, experiment, paper_experiment, paper_table, results_table
from groie_triton.detection.grid import GridHead, GridRCNN, GridRoIHeads
from groie_triton.detection.models import ContextBlock, ModelConfig, build_model
from groie_triton.detection.parity_check import parity
from groie_triton.detection.training import train, train_step

__all__ = [
    "CLASSES",
    "PRESETS",
    "SYSTEMS",
    "CheckpointError",
    "ContextBlock",
    "DetectionError",
    "GridHead",
    "GridRCNN",
    "GridRoIHeads",
    "ModelConfig",
    "ShapesConfig",
    "ShapesDataset",
    "TrainConfig",
    "build_dataset",
    "build_model",
    "coco_dict",
    "coco_evaluate",
    "evaluate",
    "experiment",
    "export_coco_json",
    "load_checkpoint",
    "paper_experiment",
    "paper_table",
    "parity",
    "predict",
    "results_table",
    "train",
    "train_step",
]
