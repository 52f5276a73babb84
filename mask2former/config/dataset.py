"""The `dataset` section: where the data is, how it is labelled, how it is augmented."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .fields import section, spec_field

# ImageNet statistics on TAO's scale: the image is divided by 255 first, then normalised with these.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# Annotation formats a split may name (dataset.<split>.type and dataset.type).
DATASET_TYPES = ["coco", "coco_panoptic", "ade"]


@dataclass
class SplitConfig:
    type: str = spec_field("coco_panoptic", description="Annotation format (ade: semantic label PNGs listed in "
                                                        "annot_file).", enum=DATASET_TYPES)
    name: str = spec_field("", description="Dataset name.", no_effect="a split is known by its files; TAO's "
                                                                      "dataset name is only a label.")
    img_dir: Optional[str] = spec_field(None, description="Image folder or images.tar.gz (path, file:// or s3://).",
                                        nullable=True)
    instance_json: Optional[str] = spec_field(None, description="COCO instance annotations (annotations.json).",
                                              nullable=True)
    panoptic_json: Optional[str] = spec_field(None, description="COCO panoptic annotations "
                                                                "(annotations_panoptic.json).", nullable=True)
    panoptic_dir: Optional[str] = spec_field(None, description="Panoptic PNG folder or images_panoptic.tar.gz.",
                                             nullable=True)
    annot_file: Optional[str] = spec_field(None, description="ade: JSONL, one {\"img\": ..., \"segm\": ...} per "
                                                             "line (paths relative to root_dir).", nullable=True)
    root_dir: Optional[str] = spec_field(None, description="ade: folder or .tar.gz the annot_file paths are relative "
                                                           "to (empty: the annot_file's folder).", nullable=True)
    batch_size: int = spec_field(1, description="Images per batch and device.", minimum=1, popular=True)
    num_workers: int = spec_field(2, description="Data-loading worker processes.", minimum=0)
    target_size: List[int] = spec_field([], description="[width, height] every image of the split is stretched "
                                                        "to when it is read, as in TAO (aspect ratio not kept; "
                                                        "bicubic for images, nearest for labels), before "
                                                        "augmentation or the evaluation resize; metrics and "
                                                        "predictions are then at this size. Empty: off. The "
                                                        "test split also takes [size] for a square.",
                                        minimum=1, max_items=2)


@dataclass
class AugmentationConfig:
    train_min_size: List[int] = spec_field([640], description="Shortest-edge sizes drawn at random for training.",
                                           min_items=1, minimum=16)
    train_max_size: int = spec_field(2560, description="Cap on the longest edge in training.", minimum=16,
                                     automl_enabled=True, automl_min=512, automl_max=2560, math_cond="/ 32")
    train_crop_size: List[int] = spec_field([640, 640], description="Training crop [height, width].", min_items=2,
                                            max_items=2, minimum=16)
    test_min_size: int = spec_field(640, description="Shortest edge at evaluation and inference.", minimum=16,
                                    automl_enabled=True, automl_min=256, automl_max=1024, math_cond="/ 32")
    test_max_size: int = spec_field(640, description="Cap on the longest edge at evaluation and inference.",
                                    minimum=16, automl_enabled=True, automl_min=256, automl_max=2560,
                                    math_cond="/ 32")
    hflip_prob: float = spec_field(0.5, description="Probability of a horizontal flip in training.", minimum=0,
                                   maximum=1)
    color_jitter: bool = spec_field(False, description="Random brightness, contrast and saturation in training.")
    crop_single_category_max_area: float = spec_field(
        1.0, description="Largest share of a training crop one class may take (1.0: no limit; retried up to 10 "
                         "times).", exclusive_minimum=0, maximum=1)
    large_scale_jitter: bool = spec_field(
        False, description="Large-scale jitter: resize by a random factor of the crop size in lsj_scale_range, then "
                           "crop or pad to train_crop_size (replaces the shortest-edge resize).")
    lsj_scale_range: List[float] = spec_field([0.1, 2.0], description="Scale range of large-scale jitter.",
                                              min_items=2, max_items=2, exclusive_minimum=0)
    size_divisibility: int = spec_field(32, description="Inputs are padded to a multiple of this.", minimum=1)


@dataclass
class CalibrationConfig:
    images_dir: Optional[str] = spec_field(None, description="Calibration images for static quantization (folder "
                                                             "or images.tar.gz).", nullable=True)
    num_images: int = spec_field(32, description="Calibration images used.", minimum=1)


@dataclass
class DatasetConfig:
    train: SplitConfig = section(SplitConfig, "Training split.")
    val: SplitConfig = section(SplitConfig, "Validation split (used by train for validation and by evaluate).")
    test: SplitConfig = section(SplitConfig, "Inference images (img_dir).")
    type: Optional[str] = spec_field(None, description="Annotation format of the splits that do not name their "
                                                       "own (TAO's shipped infer.yaml sets it here).",
                                     enum=DATASET_TYPES, nullable=True)
    pin_memory: bool = spec_field(True, description="Page-locked host memory for batches.",
                                  no_effect="batches are pinned whenever they go to a CUDA device.")
    label_map: Optional[str] = spec_field(None, description="JSON list of {id, name, color, isthing} "
                                                            "(label_map.json or label_map_panoptic.json).",
                                          nullable=True, popular=True)
    contiguous_id: bool = spec_field(False, description="true: class index = position in the label map; false: "
                                                        "class index = raw category id (< num_classes).")
    pixel_mean: List[float] = spec_field(list(IMAGENET_MEAN), description="Per-channel (RGB) mean on TAO's 0..1 "
                                                                          "scale: the image is divided by 255, then "
                                                                          "normalised.",
                                         min_items=3, max_items=3, minimum=0)
    pixel_std: List[float] = spec_field(list(IMAGENET_STD), description="Per-channel (RGB) std on TAO's 0..1 scale.",
                                        min_items=3, max_items=3, exclusive_minimum=0)
    augmentation: AugmentationConfig = section(AugmentationConfig, "Augmentation and resizing.")
    quant_calibration_dataset: CalibrationConfig = section(CalibrationConfig, "Calibration data for quantize.")
