"""Convergence benchmark: validation mIoU, PQ and mask AP against wall time, training the small configuration
on synthetic COCO-panoptic data on this machine's CPU.

Small configuration (REFERENCE.md's test configuration): Swin embed 32, depths [1,1,1,1], heads [1,2,4,8],
window 4; pixel decoder 64 channels, 2 deformable layers; decoder hidden 64, 4 heads, FFN 128, 4
predictions, 20 queries, 1024 points; AdamW lr 2e-3 with WarmupPoly (10 warm-up steps), clip 0.1, fp32.
Data: ``--images`` training and ``--val-images`` validation images of ``--size`` px (6 classes: 3 stuff, 3
things); validation after every epoch. Runs the train action in-process; times are seconds since the
action started (data and model set-up included), taken when each validation line is written.
Writes bench/results/convergence.json and prints a markdown table.

    python bench/bench_convergence.py [--images 32] [--val-images 8] [--size 128] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mask2former import results  # noqa: E402
from mask2former.actions.job import Job  # noqa: E402
from mask2former.actions.train import run  # noqa: E402
from mask2former.config import load_spec  # noqa: E402
from mask2former.data.synthetic import generate  # noqa: E402

OUT = REPO / "bench" / "results" / "convergence.json"


class TimedStatus(results.StatusWriter):
    """A status writer that also keeps each line with the seconds since the run started."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.start = time.monotonic()
        self.timeline: List[Dict[str, Any]] = []

    def write(self, status: str, message: str, **extra: Any) -> Dict[str, Any]:
        line = super().write(status, message, **extra)
        self.timeline.append(dict(line, elapsed_s=round(time.monotonic() - self.start, 2)))
        return line


def split(root: Path, batch_size: int) -> Dict[str, Any]:
    return {"type": "coco_panoptic", "img_dir": str(root / "images.tar.gz"),
            "panoptic_json": str(root / "annotations_panoptic.json"),
            "panoptic_dir": str(root / "images_panoptic.tar.gz"), "batch_size": batch_size, "num_workers": 0}


def small_spec(roots: Dict[str, Path], *, size: int, epochs: int, batch_size: int) -> Dict[str, Any]:
    return {
        "model": {
            "mode": "panoptic",
            "backbone": {"swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
                                  "window_size": 4, "drop_path_rate": 0.0}},
            "sem_seg_head": {"num_classes": 13, "convs_dim": 64, "mask_dim": 64, "transformer_enc_layers": 2},
            "mask_former": {"num_object_queries": 20, "hidden_dim": 64, "nheads": 4, "dim_feedforward": 128,
                            "dec_layers": 4, "train_num_points": 1024},
        },
        "dataset": {
            "train": split(roots["train"], batch_size), "val": split(roots["val"], batch_size),
            "label_map": str(roots["train"] / "label_map_panoptic.json"),
            "augmentation": {"train_min_size": [size], "train_max_size": 2 * size, "train_crop_size": [size, size],
                             "test_min_size": size, "test_max_size": 2 * size},
        },
        "train": {"num_epochs": epochs, "seed": 1, "clip_grad_norm": 0.1, "precision": "fp32",
                  "optim": {"lr": 2e-3, "lr_scheduler": "WarmupPoly", "warmup_iters": 10}},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--val-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-convergence-") as tmp:
        roots = generate(Path(tmp) / "data", dataset_format="coco_panoptic", num_images=args.images, size=args.size,
                         seed=0, val_images=args.val_images)
        folder = Path(tmp) / "run"
        status = TimedStatus(folder)
        config = load_spec("train", spec=small_spec(roots, size=args.size, epochs=args.epochs,
                                                    batch_size=args.batch_size))
        outcome = run(config, Job(action="train", results_dir=folder, status=status,
                                  log=logging.getLogger("bench")))
        total = time.monotonic() - status.start
    losses = {line["epoch"]: line["kpi"]["loss"] for line in status.timeline if line["message"].startswith("Epoch ")}
    curve = [{"epoch": line["epoch"], "elapsed_s": line["elapsed_s"], "train_loss": losses.get(line["epoch"]),
              **{key: line["kpi"].get(key) for key in ("mIoU", "PQ", "AP")}}
             for line in status.timeline if line["message"].startswith("Validation")]
    report = {
        "benchmark": "convergence", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                "torch": torch.__version__, "threads": torch.get_num_threads(),
                                                "load_average_1m": os.getloadavg()[0]},
        "settings": vars(args), "total_s": round(total, 1), "steps": outcome.metrics["steps"],
        "best": outcome.metrics.get("best"), "final": {key: outcome.metrics.get(key) for key in ("mIoU", "PQ", "AP")},
        "curve": curve,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"| epoch | wall s | train loss | mIoU | PQ | AP |\n|---:|---:|---:|---:|---:|---:|")
    for row in curve:
        print(f"| {row['epoch']} | {row['elapsed_s']:.0f} | {row['train_loss']:.2f} | {row['mIoU']:.1f} | "
              f"{row['PQ']:.1f} | {row['AP']:.1f} |")
    print(f"\n{outcome.metrics['steps']} steps in {total:.0f} s; best {report['best']}; wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
