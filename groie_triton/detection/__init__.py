"""Reference Faster/Mask R-CNN pipeline: GRoIE accuracy parity from training to COCO AP.

* :mod:`.data` - the procedural "shapes" instance-segmentation dataset and its COCO export;
* :mod:`.models` - torchvision Faster/Mask R-CNN builders (baseline or GRoIE RoI extraction, GC-Net option);
* :mod:`.engine` - training (checkpoints, resume, DDP), pycocotools evaluation, reference/Triton parity;
* ``python -m groie_triton.detection train|evaluate|parity|experiment`` - the command line.
"""

from groie_triton.detection.data import (
    CLASSES,
    ShapesConfig,
    ShapesDataset,
    build_dataset,
    coco_dict,
    export_coco_json,
)
from groie_triton.detection.engine import (
    CheckpointError,
    DetectionError,
    TrainConfig,
    coco_evaluate,
    evaluate,
    experiment,
    load_checkpoint,
    parity,
    predict,
    train,
    train_step,
)
from groie_triton.detection.models import ContextBlock, ModelConfig, build_model

__all__ = [
    "CLASSES",
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
    "train",
    "train_step",
]
