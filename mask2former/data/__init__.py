"""Data: COCO / COCO-panoptic / ADE readers, label maps, augmentation, torch datasets, staging, synthetic data.

Importing this package is light (no torch, numpy or PIL): the Airflow layer imports
``mask2former.data.sources`` at DAG-parse time. The names below are loaded on first use::

    from mask2former.data import build_datasets, collate_batch, LabelMap
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LabelMap": "label_map",
    "CocoInstanceReader": "coco",
    "CocoPanopticReader": "coco_panoptic",
    "AdeReader": "ade",
    "load_rgb": "images",
    "TrainTransform": "transforms",
    "EvalTransform": "transforms",
    "SegmentationDataset": "dataset",
    "ImageFolderDataset": "dataset",
    "collate_batch": "dataset",
    "GroundTruth": "targets",
    "build_datasets": "build",
    "build_dataloader": "build",
    "build_inference_dataset": "build",
    "build_calibration_dataset": "build",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
