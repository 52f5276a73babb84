"""Helpers of the AutoML tests: a tiny train spec on synthetic data, and a scripted stand-in for the train CLI.

The stand-in (``STAND_IN_TRAINER``) is NOT the engine's training: it is a small script with the train
CLI's file contract (reads the trial's spec.yaml, appends status.json lines with ``epoch`` and
``kpi.mIoU``, records best_model.json, ends with SUCCESS) whose mIoU curve is a known function of the
learning rate. Tests of the trial runner's mechanics (following status lines, pruning and killing,
parallel workers on one study) use it so they take seconds; the real training is exercised by
tests/test_automl_search.py and tests/airflow/test_automl_pipeline.py.
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import yaml

from mask2former.data.synthetic import generate

NUM_CLASSES = 13  # synthetic raw ids go up to 12 (contiguous_id false)

#: A search space the tiny model affords on 64 px images (sizes left at the spec's values).
SMALL_RANGES: Dict[str, Dict[str, Any]] = {
    "model.mask_former.hidden_dim": {"valid_min": 16, "valid_max": 48},
    "model.mask_former.num_object_queries": {"valid_min": 6, "valid_max": 12},
    "model.mask_former.dec_layers": {"valid_min": 2, "valid_max": 3},
    "train.optim.lr": {"valid_min": 1e-4, "valid_max": 3e-3},
}
FIXED_SIZES: List[str] = ["dataset.augmentation.train_max_size", "dataset.augmentation.test_min_size",
                          "dataset.augmentation.test_max_size"]


def make_data(root: Path, *, images: int = 6, val_images: int = 4, size: int = 64) -> Dict[str, Path]:
    return generate(root, dataset_format="coco_panoptic", num_images=images, size=size, seed=0,
                    val_images=val_images)


def _split(root: Path) -> Dict[str, Any]:
    return {"type": "coco_panoptic", "img_dir": str(root / "images.tar.gz"),
            "panoptic_json": str(root / "annotations_panoptic.json"),
            "panoptic_dir": str(root / "images_panoptic.tar.gz"), "batch_size": 2, "num_workers": 0}


def tiny_spec(roots: Dict[str, Path], size: int = 64) -> Dict[str, Any]:
    """The tiny Swin Mask2Former of the other tests on the synthetic roots (train and val)."""
    return {
        "model": {
            "mode": "panoptic",
            "backbone": {"swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
                                  "window_size": 4, "drop_path_rate": 0.0}},
            "sem_seg_head": {"num_classes": NUM_CLASSES, "convs_dim": 32, "mask_dim": 32,
                             "transformer_enc_layers": 1},
            "mask_former": {"num_object_queries": 10, "hidden_dim": 32, "nheads": 4, "dim_feedforward": 64,
                            "dec_layers": 3, "train_num_points": 256},
        },
        "dataset": {
            "train": _split(roots["train"]), "val": _split(roots["val"]),
            "label_map": str(roots["train"] / "label_map_panoptic.json"),
            "augmentation": {"train_min_size": [size], "train_max_size": size * 2, "train_crop_size": [size, size],
                             "test_min_size": size, "test_max_size": size * 2},
        },
        "train": {"num_epochs": 1, "seed": 7, "optim": {"lr": 1e-3, "milestones": [1000, 2000]}},
    }


def write_yaml(path: Path, data: Dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def stand_in_miou(lr: float, epoch: int) -> float:
    """The stand-in's validation mIoU: best near lr 1e-3, growing with the epochs."""
    return round(60.0 * math.exp(-abs(math.log10(lr) + 3.0)) * (1 - 0.5 ** epoch), 4)


STAND_IN_TRAINER = textwrap.dedent('''
    """Stand-in for `python -m mask2former train` (see tests/automl_support.py)."""
    import json, math, os, sys, time
    from pathlib import Path
    import yaml

    folder = Path(sys.argv[1])
    spec = yaml.safe_load((folder / "spec.yaml").read_text())
    epochs = spec["train"]["num_epochs"]
    lr = spec["train"]["optim"]["lr"]
    delay = float(os.environ.get("STAND_IN_EPOCH_S", "0.3"))
    def line(status, message, **extra):
        with open(folder / "status.json", "a") as fh:
            fh.write(json.dumps({"status": status, "message": message, **extra}) + "\\n")
    line("STARTED", "train started")
    if lr > float(os.environ.get("STAND_IN_FAIL_ABOVE_LR", "1")):
        line("FAILURE", "ValueError: loss is nan (stand-in)")
        sys.exit(1)
    best = None
    for epoch in range(1, epochs + 1):
        time.sleep(delay)
        value = round(60.0 * math.exp(-abs(math.log10(lr) + 3.0)) * (1 - 0.5 ** epoch), 4)
        line("RUNNING", f"Validation after epoch {epoch}", epoch=epoch, max_epoch=epochs, kpi={"mIoU": value})
        line("RUNNING", f"Epoch {epoch} done", epoch=epoch, max_epoch=epochs, kpi={"loss": 1.0 / epoch})
        if best is None or value > best[1]:
            best = (epoch, value)
    (folder / "model_latest.pth").write_bytes(b"stand-in")
    (folder / "best_model.json").write_text(json.dumps({"epoch": best[0], "step": best[0], "metric": "mIoU",
                                                        "value": best[1], "checkpoint": "model_latest.pth"}))
    line("SUCCESS", "trained", kpi={"mIoU": value})
''')


def stand_in_command(script: Path):
    """A TrialRunner ``command`` that runs the stand-in instead of the train CLI."""

    def command(python: str, trial_dir: Path) -> List[str]:
        return [sys.executable, str(script), str(trial_dir)]

    return command


def write_stand_in(folder: Path) -> Path:
    path = folder / "stand_in_trainer.py"
    path.write_text(STAND_IN_TRAINER)
    return path
