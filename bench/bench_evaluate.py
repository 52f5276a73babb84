"""The evaluate action's own time (everything but the model's forward pass) against the peers' metric times.

One run:

1. ``python -m mask2former evaluate`` (in a worker process, in-process CLI) on ``--images`` synthetic
   COCO-panoptic images of ``--size`` px with a tiny random-weight panoptic model, giving mIoU, PQ and mask
   AP. The forward pass is timed on its own (the runner's call), so "own time" is the action's wall time
   less the forward: data loading, post-processing at the original size, RLE encoding, the metrics and
   the reports. ``--repo`` runs the same worker on another checkout of the engine (a before/after).
2. The peers on ``bench_metrics``' synthetic set of the same number and size of images: pycocotools'
   COCOeval (mask AP), torchmetrics ``PanopticQuality`` and ``MulticlassJaccardIndex``
   (``validate_args=False``), metric update and compute only; their sum is what a pipeline scoring the
   same three metrics with the peers would spend on metrics alone.

Prints a markdown table and writes ``bench/results/evaluate.json``.

    python bench/bench_evaluate.py [--images 500] [--size 128] [--rounds 3] [--repo /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "evaluate.json"

TINY_MODEL = {
    "model.mode": "panoptic", "model.backbone.swin.embed_dim": 32, "model.backbone.swin.depths": [1, 1, 1, 1],
    "model.backbone.swin.num_heads": [1, 2, 4, 8], "model.backbone.swin.drop_path_rate": 0.0,
    "model.sem_seg_head.num_classes": 13, "model.sem_seg_head.convs_dim": 32, "model.sem_seg_head.mask_dim": 32,
    "model.sem_seg_head.transformer_enc_layers": 1, "model.mask_former.num_object_queries": 20,
    "model.mask_former.hidden_dim": 32, "model.mask_former.nheads": 2, "model.mask_former.dim_feedforward": 64,
    "model.mask_former.dec_layers": 2, "model.test_topk_per_image": 20,
}


def worker(images: int, size: int, folder: Path) -> dict:
    """Run the evaluate action in this process; seconds of wall time and of forward passes."""
    import torch

    from mask2former.checkpoint import save_checkpoint
    from mask2former.cli import main
    from mask2former.config import load_spec
    from mask2former.data.synthetic import write_dataset
    from mask2former.model import build_model
    from mask2former.runtime.torch_runner import TorchRunner

    root = write_dataset(folder / "data", dataset_format="coco_panoptic", num_images=images, size=size, seed=0,
                         stream=1)
    checkpoint = folder / "model.pth"
    config = load_spec("export", overrides={**TINY_MODEL, "export.checkpoint": str(checkpoint)})
    torch.manual_seed(0)
    state = build_model(config.model).state_dict()
    for key in state:  # sharpen the class head so queries pass the score threshold (random logits are flat)
        if "class_embed" in key:
            state[key] = state[key] * 30.0
    save_checkpoint(checkpoint, {"state_dict": state, "model_config": dataclasses.asdict(config.model),
                                 "label_map": None, "contiguous_id": False, "epoch": 0, "global_step": 0})
    forward = [0.0]
    call = TorchRunner.__call__

    def timed_call(self, batch):
        start = time.perf_counter()
        outputs = call(self, batch)
        forward[0] += time.perf_counter() - start
        return outputs

    TorchRunner.__call__ = timed_call
    overrides = {**TINY_MODEL, "dataset.val.type": "coco_panoptic", "dataset.val.img_dir": str(root / "images.tar.gz"),
                 "dataset.val.panoptic_json": str(root / "annotations_panoptic.json"),
                 "dataset.val.panoptic_dir": str(root / "images_panoptic.tar.gz"),
                 "dataset.label_map": str(root / "label_map_panoptic.json"), "dataset.val.num_workers": 0,
                 "dataset.augmentation.test_min_size": size, "dataset.augmentation.test_max_size": 2 * size,
                 "model.object_mask_threshold": 0.05, "evaluate.batch_size": 8, "evaluate.checkpoint": str(checkpoint)}
    words = [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()]
    start = time.perf_counter()
    code = main(["evaluate", "--results-dir", str(folder / "job"), *words])
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"evaluate failed with exit code {code}")
    metrics = json.loads((folder / "job" / "metrics.json").read_text())
    return {"wall_s": wall, "forward_s": forward[0], "own_s": wall - forward[0],
            "values": {key: metrics.get(key) for key in ("mIoU", "PQ", "AP")}}


def run_worker(repo: Path, images: int, size: int) -> dict:
    """The worker in a fresh process on ``repo``'s engine (one thread, like the peers)."""
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--images", str(images),
                               "--size", str(size), "--folder", tmp], env=env, cwd=repo, check=True,
                              capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peers(images: int, size: int) -> dict:
    """Seconds of each peer's metric on bench_metrics' synthetic set (prepared outside the clocks)."""
    sys.path.insert(0, str(REPO / "bench"))
    import torch

    import bench_metrics as metrics

    torch.set_num_threads(1)
    data = metrics.build_dataset(images, size, seed=0)
    results = copy.deepcopy([{"image_id": i, **d} for i, dets in data["detections"].items() for d in dets])
    times = {}
    for name, function in (("pycocotools COCOeval", lambda: metrics.pycocotools_ap(data, results)),
                           ("torchmetrics PanopticQuality", lambda: metrics.torchmetrics_pq(data)),
                           ("torchmetrics MulticlassJaccardIndex", lambda: metrics.torchmetrics_miou(
                               data, validate_args=False))):
        times[name] = metrics.timed(function)[0]
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repo", type=Path, action="append", default=[],
                        help="also run the evaluate worker on this checkout (repeatable)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each checkout, alternating; the best is kept")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import logging

        logging.disable(logging.INFO)
        print(json.dumps(worker(args.images, args.size, args.folder)))
        return 0
    checkouts = {"this checkout": REPO, **{str(repo): repo for repo in args.repo}}
    rounds = {name: [] for name in checkouts}
    for _ in range(args.rounds):  # alternating, so that a change of load hits every checkout alike
        for name, repo in checkouts.items():
            rounds[name].append(run_worker(repo, args.images, args.size))
    runs = {name: dict(min(found, key=lambda run: run["own_s"]), rounds=len(found)) for name, found in rounds.items()}
    peer_times = peers(args.images, args.size)
    peer_sum = sum(peer_times.values())
    report = {"benchmark": "evaluate", "images": args.images, "size": args.size,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average_1m": os.getloadavg()[0]},
              "evaluate": runs, "peers_s": peer_times, "peers_sum_s": peer_sum}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.images} images of {args.size} px, one thread\n")
    print("| run | wall s | forward s | own s (wall - forward) | own / peers' metric sum |\n|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        print(f"| evaluate, {name} | {run['wall_s']:.2f} | {run['forward_s']:.2f} | {run['own_s']:.2f} | "
              f"{run['own_s'] / peer_sum:.3f} |")
    for name, seconds in peer_times.items():
        print(f"| {name} | {seconds:.2f} | | | |")
    print(f"| peers' metric sum | {peer_sum:.2f} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
