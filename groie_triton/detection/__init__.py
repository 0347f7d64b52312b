"""Reference Faster/Mask R-CNN pipeline: GRoIE accuracy parity from training to COCO AP.

* :mod:`.data` - the procedural "shapes" instance-segmentation dataset, its COCO export and batching;
* :mod:`.models` - detector builders keyed by name (torchvision Faster/Mask R-CNN; baseline or GRoIE RoI
  extraction, GC-Net option);
* :mod:`.config` - the training schedule, presets, device and errors;
* :mod:`.checkpoint` - atomic, validated checkpoints and the model they describe;
* :mod:`.train` - training (resume, DDP); :mod:`.evaluate` - pycocotools evaluation;
* :mod:`.parity` - reference vs Triton detections; :mod:`.experiment` - baseline vs GRoIE;
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
from groie_triton.detection.evaluate import coco_evaluate, evaluate, predict
from groie_triton.detection.experiment import experiment, results_table
from groie_triton.detection.models import ContextBlock, ModelConfig, build_model
from groie_triton.detection.parity import parity
from groie_triton.detection.train import train, train_step

__all__ = [
    "CLASSES",
    "PRESETS",
    "CheckpointError",
    "ContextBlock",
    "DetectionError",
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
    "parity",
    "predict",
    "results_table",
    "train",
    "train_step",
]
