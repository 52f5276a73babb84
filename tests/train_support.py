"""Helpers for the training tests: synthetic data roots, a tiny model spec, the train CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from mask2former.data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 13  # synthetic raw ids go up to 12 (contiguous_id false)


def make_data(root: Path, *, dataset_format: str = "coco_panoptic", images: int = 8, val_images: Optional[int] = 4,
              size: int = 64, seed: int = 0) -> Dict[str, Path]:
    """Synthetic train (and val) roots under ``root``."""
    return generate(root, dataset_format=dataset_format, num_images=images, size=size, seed=seed,
                    val_images=val_images)


def split_section(data_root: Path, dataset_format: str, *, batch_size: int = 2) -> Dict[str, Any]:
    section: Dict[str, Any] = {"type": dataset_format, "img_dir": str(data_root / "images.tar.gz"),
                               "batch_size": batch_size, "num_workers": 0}
    if dataset_format == "coco_panoptic":
        section.update(panoptic_json=str(data_root / "annotations_panoptic.json"),
                       panoptic_dir=str(data_root / "images_panoptic.tar.gz"))
    else:
        section["instance_json"] = str(data_root / "annotations.json")
    return section


def tiny_spec(roots: Dict[str, Path], *, dataset_format: str = "coco_panoptic", mode: str = "panoptic",
              size: int = 64, batch_size: int = 2, num_epochs: int = 1, lr: float = 1e-3,
              queries: int = 10) -> Dict[str, Any]:
    """A spec of a tiny Swin Mask2Former on the synthetic roots (window 4, 10 queries, 3 decoder predictions)."""
    label_map = "label_map_panoptic.json" if dataset_format == "coco_panoptic" else "label_map.json"
    spec: Dict[str, Any] = {
        "model": {
            "mode": mode,
            "backbone": {"swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
                                  "window_size": 4, "drop_path_rate": 0.0}},
            "sem_seg_head": {"num_classes": NUM_CLASSES, "convs_dim": 32, "mask_dim": 32,
                             "transformer_enc_layers": 1},
            "mask_former": {"num_object_queries": queries, "hidden_dim": 32, "nheads": 4, "dim_feedforward": 64,
                            "dec_layers": 3, "train_num_points": 256},
        },
        "dataset": {
            "train": split_section(roots["train"], dataset_format, batch_size=batch_size),
            "label_map": str(roots["train"] / label_map),
            "augmentation": {"train_min_size": [size], "train_max_size": size * 2, "train_crop_size": [size, size],
                             "test_min_size": size, "test_max_size": size * 2},
        },
        "train": {"num_epochs": num_epochs, "seed": 7,
                  "optim": {"lr": lr, "milestones": [1000, 2000]}},
    }
    if "val" in roots:
        spec["dataset"]["val"] = split_section(roots["val"], dataset_format, batch_size=batch_size)
    return spec


def write_spec(path: Path, spec: Dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_train_cli(spec_path: Path, results_dir: Path, overrides: List[str] = (), timeout: float = 300,
                  env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``python -m mask2former train -e SPEC --results-dir DIR k=v ...`` in a subprocess (text output)."""
    command = [sys.executable, "-m", "mask2former", "train", "-e", str(spec_path), "--results-dir",
               str(results_dir), *overrides]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(command, cwd=str(REPO), env=full_env, capture_output=True, text=True, timeout=timeout)
