"""Data-loading throughput: images/s of the training dataset on synthetic 256 px COCO-panoptic images.

Runs the spec's default augmentation (shortest edge 640, crop 640x640, flip) and large-scale jitter
(scale 0.1..2.0 of a 640x640 crop, pad), each with num_workers 0 and 2, through the DataLoader of
build_dataloader (collate_batch, batch 2). Writes bench/results/dataloader.json and prints a
markdown table.

    python bench/bench_dataloader.py [--images 64] [--epochs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask2former.config.dataset import DatasetConfig  # noqa: E402
from mask2former.data.build import build_dataloader  # noqa: E402
from mask2former.data.synthetic import generate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "dataloader.json"


def _config(root: Path, *, large_scale_jitter: bool, num_workers: int) -> SimpleNamespace:
    dataset = DatasetConfig()  # the spec's defaults
    dataset.augmentation.large_scale_jitter = large_scale_jitter
    dataset.label_map = str(root / "label_map_panoptic.json")
    dataset.train = dataclasses.replace(
        dataset.train, type="coco_panoptic", img_dir=str(root / "images.tar.gz"),
        panoptic_json=str(root / "annotations_panoptic.json"), panoptic_dir=str(root / "images_panoptic.tar.gz"),
        batch_size=2, num_workers=num_workers)
    return SimpleNamespace(model=SimpleNamespace(mode="panoptic", sem_seg_head=SimpleNamespace(num_classes=13)),
                           dataset=dataset)


def measure(root: Path, *, large_scale_jitter: bool, num_workers: int, epochs: int) -> dict:
    cfg = _config(root, large_scale_jitter=large_scale_jitter, num_workers=num_workers)
    loader = build_dataloader(cfg, "train")  # shuffled, collate_batch, persistent workers
    torch.manual_seed(0)
    for _ in loader:  # warm-up epoch: worker start, archive extraction, page cache
        pass
    start, cpu_start, images, instances = time.perf_counter(), time.process_time(), 0, 0
    for _ in range(epochs):
        for batch in loader:
            images += batch["images"].shape[0]
            instances += sum(len(t["labels"]) for t in batch["targets"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    row = {"augmentation": "lsj" if large_scale_jitter else "default", "num_workers": num_workers,
           "images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1),
           "input_size": list(batch["images"].shape[-2:]), "masks_per_image": round(instances / images, 2)}
    if num_workers == 0:  # CPU time of this process = the whole pipeline; robust to other load on the machine
        row["cpu_ms_per_image"] = round(1000 * cpu_seconds / images, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = round(os.getloadavg()[0], 2)  # the 2-core dev machine is shared: context for the numbers
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = generate(Path(tmp), dataset_format="coco_panoptic", num_images=args.images, size=256, seed=0)["train"]
        generation_s = time.perf_counter() - start
        rows = [measure(root, large_scale_jitter=lsj, num_workers=workers, epochs=args.epochs)
                for lsj in (False, True) for workers in (0, 2)]
    report = {"benchmark": "dataloader", "dataset": f"synthetic coco_panoptic, {args.images} images 256x256",
              "generation_s": round(generation_s, 2), "batch_size": 2, "epochs": args.epochs,
              "machine": {"cpus": os.cpu_count(), "load_average_1min_before": load_before,
                          "python": platform.python_version(), "torch": torch.__version__},
              "results": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"synthetic generation: {args.images} images in {generation_s:.2f} s")
    print(f"load average before: {load_before} on {os.cpu_count()} CPUs")
    print("| augmentation | num_workers | images/s | CPU ms/image | input | masks/image |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['augmentation']} | {row['num_workers']} | {row['images_per_s']} | "
              f"{row.get('cpu_ms_per_image', '-')} | {row['input_size'][0]}x{row['input_size'][1]} | "
              f"{row['masks_per_image']} |")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
