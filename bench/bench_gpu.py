"""GPU figures in one run: bf16 training images/s of Swin-T at 1024 px with large-scale jitter, inference
frames/s in PyTorch (fp32 and bf16) and in ONNX Runtime's CUDA execution provider, and the peak GPU memory of
each.

Swin-T (embed 96, depths [2, 2, 6, 2]), 133 classes, 100 queries, 12544 points: the COCO-panoptic
configuration. Training batches come from this project's data pipeline (``large_scale_jitter``, crop 1024)
on generated COCO-panoptic images, in DataLoader workers; the step is the engine's: forward, criterion,
backward under bf16 autocast, global-norm clipping and fused AdamW. Inference runs one 1024x1024 image at a
time in eval mode. The ONNX model is exported by the engine's exporter (batch 1, 1024x1024); without
``onnxruntime-gpu`` (the CUDA execution provider) that row says so instead of a number. The card's name,
driver-visible memory and versions go into the report. Writes ``--out`` (default
bench/results/gpu.json) and prints a markdown table.

    python bench/bench_gpu.py [--batch-size 4] [--steps 20] [--workers 8] [--out FILE]
    python bench/bench_gpu.py --device cpu --size 128 --steps 2 --swin-depths 1 1 1 1   # a check of the script
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = REPO / "bench" / "results" / "gpu.json"


def spec(roots: Dict[str, Path], args: argparse.Namespace) -> Dict[str, Any]:
    data = roots["train"]
    return {
        "model": {"mode": "panoptic",
                  "backbone": {"swin": {"type": "custom" if args.swin_depths else "tiny", "embed_dim": 96,
                                        "depths": args.swin_depths or [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]}},
                  "sem_seg_head": {"num_classes": 133}, "mask_former": {"num_object_queries": 100}},
        "dataset": {
            "train": {"type": "coco_panoptic", "img_dir": str(data / "images.tar.gz"),
                      "panoptic_json": str(data / "annotations_panoptic.json"),
                      "panoptic_dir": str(data / "images_panoptic.tar.gz"), "batch_size": args.batch_size,
                      "num_workers": args.workers},
            "label_map": str(data / "label_map_panoptic.json"),
            "augmentation": {"large_scale_jitter": True, "train_crop_size": [args.size, args.size]},
        },
        "train": {"precision": "bf16", "clip_grad_norm": 0.01},
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def timed(step: Callable[[], Any], *, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per call, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    images = batch["images"].to(device, non_blocking=True)
    targets = [{key: value.to(device, non_blocking=True) for key, value in target.items()}
               for target in batch["targets"]]
    return {"images": images, "targets": targets}


def training(config: Any, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    from torch.utils.data import DataLoader

    from mask2former.data.build import build_datasets
    from mask2former.data.dataset import collate_batch
    from mask2former.training.optim import build_optimizer
    from mask2former.training.session import build_network

    dataset = build_datasets(config, "train")
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0, pin_memory=True,
                        collate_fn=partial(collate_batch, size_divisibility=32))
    model, criterion = build_network(config)
    model, criterion = model.to(device).train(), criterion.to(device)
    optimizer = build_optimizer(model, config.train.optim, fused=True)
    batches = iter(())

    def next_batch() -> Dict[str, Any]:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    def step() -> None:
        batch = to_device(next_batch(), device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            outputs = model(batch["images"])
            loss = criterion.total_loss(criterion(outputs, batch["targets"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak(device)
    seconds = timed(step, warmup=args.warmup, steps=args.steps, device=device)
    return {"batch_size": args.batch_size, "seconds_per_step": seconds, "images_per_s": args.batch_size / seconds,
            "peak_gib": peak_gib(device), "model": model}


def inference(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> Dict[str, Dict[str, float]]:
    image = torch.randn(1, 3, args.size, args.size, device=device)
    model.eval()
    rows = {}
    for name, bf16 in (("pytorch fp32", False), ("pytorch bf16", True)):
        def forward() -> None:
            with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                model(image)

        reset_peak(device)
        seconds = timed(forward, warmup=args.warmup, steps=args.steps, device=device)
        rows[name] = {"fps": 1 / seconds, "peak_gib": peak_gib(device)}
    return rows


def onnxruntime_row(model: torch.nn.Module, config: Any, args: argparse.Namespace, folder: Path,
                    device: torch.device) -> Dict[str, Any]:
    """Frames/s of the exported model in ONNX Runtime's execution provider for ``device``."""
    import numpy as np
    import onnxruntime as ort

    from mask2former.export.onnx_export import export_onnx
    from mask2former.runtime.inference_model import InferenceModel

    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return {"unavailable": f"onnxruntime {ort.__version__} has no {provider} "
                               f"({ort.get_available_providers()}): install onnxruntime-gpu"}
    path = folder / "model.onnx"
    wrapped = InferenceModel(model.float().cpu(), mode=config.model.mode,
                             topk=config.model.test_topk_per_image).eval()
    export_onnx(wrapped, path, output_names=wrapped.output_names, input_height=args.size, input_width=args.size,
                batch_size=1)
    session = ort.InferenceSession(str(path), providers=[provider])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
        (1, 3, args.size, args.size), dtype=np.float32)}
    seconds = timed(lambda: session.run(None, feed), warmup=args.warmup, steps=args.steps, device=torch.device("cpu"))
    return {"fps": 1 / seconds, "onnxruntime": ort.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--images", type=int, default=32, help="generated training images")
    parser.add_argument("--swin-depths", type=int, nargs=4, help="a smaller Swin, to check the script on a CPU")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible: run this on a GPU host (or --device cpu to check the script)")

    from mask2former.config import load_spec
    from mask2former.data.synthetic import generate

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        roots = generate(Path(tmp) / "data", dataset_format="coco_panoptic", num_images=args.images,
                         size=args.size, seed=0)
        config = load_spec("train", spec=spec(roots, args))
        train = training(config, args, device)
        model = train.pop("model")
        rows: Dict[str, Any] = inference(model, args, device)
        rows[f"onnxruntime {device.type}"] = onnxruntime_row(model, config, args, Path(tmp), device)
    report = {"benchmark": "gpu", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda},
              "settings": {key: value for key, value in vars(args).items() if key != "out"},
              "training_bf16_lsj": train, "inference": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"{report['device']}, torch {torch.__version__}, {args.size} px\n")
    print("| what | figure | peak GPU memory GiB |\n|---|---:|---:|")
    print(f"| training, bf16, LSJ, batch {args.batch_size} | {train['images_per_s']:.2f} images/s | "
          f"{train['peak_gib']:.2f} |")
    for name, row in rows.items():
        figure = f"{row['fps']:.2f} frames/s" if "fps" in row else row["unavailable"]
        peak = f"{row['peak_gib']:.2f}" if "peak_gib" in row else ""
        print(f"| inference, {name} | {figure} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
