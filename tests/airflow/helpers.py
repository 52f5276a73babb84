"""Shared pieces of the Airflow tests: the tiny model, synthetic datasets, S3 uploads, fake task contexts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL: Dict[str, Any] = json.loads((REPO / "scripts" / "tiny_model.json").read_text())
#: Synthetic raw category ids go up to 12; with contiguous_id false the class index is the raw id.
NUM_CLASSES = 13


def tiny_overrides(**extra: Any) -> Dict[str, Any]:
    return {**TINY_MODEL, "model.sem_seg_head.num_classes": NUM_CLASSES, **extra}


def make_dataset(root: Path, *, images: int = 4, val_images: int = 2, size: int = 64, seed: int = 0,
                 fmt: str = "coco_panoptic") -> Path:
    """``root/train`` and ``root/val`` synthetic dataset roots (the generator of mask2former.data.synthetic)."""
    if not (root / "train" / "images.tar.gz").is_file():
        subprocess.run([sys.executable, "-m", "mask2former.data.synthetic", str(root), "--format", fmt, "--images",
                        str(images), "--val-images", str(val_images), "--size", str(size), "--seed", str(seed)],
                       check=True, capture_output=True)
    return root


def upload_tree(client: Any, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}")


def fake_context(dag_id: str = "dag", run_id: str = "manual__2024-01-01T00:00:00+00:00", task_id: str = "task",
                 map_index: int = -1) -> Dict[str, Any]:
    """The part of a task context the operators read (ti: dag_id, run_id, task_id, map_index)."""
    return {"ti": SimpleNamespace(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index)}
