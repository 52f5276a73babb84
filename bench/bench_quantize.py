"""Benchmark: int8 quantization vs the fp32 model (size, latency, accuracy) on synthetic data.

One run: train a small Mask2Former on a synthetic COCO-panoptic set with the train action (or take
``--checkpoint``), quantize it with the quantize action (torchao int8 weight-only by default) and read
its report: serialized weight size (target <= 35% of fp32), median latency per image on the same
inputs, and mIoU / PQ of both models on the synthetic val set (target: mIoU drop <= 1 point).

    python bench/bench_quantize.py [--epochs 6] [--images 48] [--val-images 16] [--size 128]
                                   [--backend torchao] [--checkpoint model.pth]

Prints a markdown table and writes ``bench/results/quantize.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask2former import results  # noqa: E402
from mask2former.cli import main as cli  # noqa: E402
from mask2former.data.synthetic import write_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quantize.json"
MODEL = {"model.mode": "panoptic", "model.backbone.swin.embed_dim": 32, "model.backbone.swin.depths": [1, 1, 1, 1],
         "model.backbone.swin.num_heads": [1, 2, 4, 8], "model.backbone.swin.drop_path_rate": 0.0,
         "model.sem_seg_head.num_classes": 13, "model.sem_seg_head.convs_dim": 32, "model.sem_seg_head.mask_dim": 32,
         "model.sem_seg_head.transformer_enc_layers": 1, "model.mask_former.num_object_queries": 10,
         "model.mask_former.hidden_dim": 64, "model.mask_former.nheads": 4, "model.mask_former.dim_feedforward": 128,
         "model.mask_former.dec_layers": 3, "model.mask_former.train_num_points": 1024}
SIZE_TARGET, DROP_TARGET = 0.35, 1.0


def _words(overrides):
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in overrides.items()]


def _split(name: str, root: Path):
    return {f"dataset.{name}.type": "coco_panoptic", f"dataset.{name}.img_dir": str(root / "images.tar.gz"),
            f"dataset.{name}.panoptic_json": str(root / "annotations_panoptic.json"),
            f"dataset.{name}.panoptic_dir": str(root / "images_panoptic.tar.gz"), f"dataset.{name}.num_workers": 0}


def _run(action: str, out: Path, overrides) -> None:
    code = cli([action, "--results-dir", str(out), *_words(overrides)])
    if code != 0:
        raise SystemExit(f"{action} failed: {results.read_status(out)[-1]['message']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--val-images", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="torchao", choices=["torchao", "modelopt.pytorch", "modelopt.onnx"])
    parser.add_argument("--checkpoint", help="a trained checkpoint of the MODEL configuration (skips training)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        train_root = write_dataset(work / "train", dataset_format="coco_panoptic", num_images=args.images,
                                   size=args.size, seed=args.seed, stream=0)
        val_root = write_dataset(work / "val", dataset_format="coco_panoptic", num_images=args.val_images,
                                 size=args.size, seed=args.seed, stream=1)
        data = dict(_split("val", val_root), **{
            "dataset.label_map": str(val_root / "label_map_panoptic.json"),
            "dataset.augmentation.test_min_size": args.size, "dataset.augmentation.test_max_size": args.size})
        checkpoint = args.checkpoint
        train_metrics = None
        if checkpoint is None:
            train_out = work / "train_job"
            _run("train", train_out, dict(MODEL, **data, **_split("train", train_root), **{
                "train.num_epochs": args.epochs, "train.optim.lr": 5e-4, "train.seed": args.seed,
                "dataset.train.batch_size": 4, "dataset.augmentation.train_min_size": [args.size],
                "dataset.augmentation.train_max_size": args.size,
                "dataset.augmentation.train_crop_size": [args.size, args.size]}))
            checkpoint = str(results.resolve_parent_model(train_out, kind="checkpoint"))
            train_metrics = {k: results.read_metrics(train_out).get(k) for k in ("mIoU", "PQ", "AP")}
        quant_out = work / "quantize_job"
        extra = {"quantize.backend": args.backend, "quantize.model_path": checkpoint}
        if args.backend != "torchao":
            extra.update({"quantize.mode": "static_ptq",
                          "dataset.quant_calibration_dataset.images_dir": str(train_root / "images.tar.gz"),
                          "dataset.quant_calibration_dataset.num_images": 16})
        _run("quantize", quant_out, dict(MODEL, **data, **extra))
        report = json.loads((quant_out / "quantize_report.json").read_text())

    accuracy = report["accuracy"]
    row = {"backend": args.backend, "mode": report["mode"], "input": [args.size, args.size],
           "epochs": args.epochs if args.checkpoint is None else None, "train_metrics": train_metrics,
           "size_ratio": report["size"]["ratio"], "fp32_bytes": report["size"]["fp32_bytes"],
           "quantized_bytes": report["size"]["quantized_bytes"], "latency_fp32_ms": report["latency"]["fp32_ms"],
           "latency_quantized_ms": report["latency"]["quantized_ms"], "accuracy": accuracy,
           "selection": report["selection"]}
    row["size_target_met"] = row["size_ratio"] <= SIZE_TARGET
    drop = accuracy.get("drop", {}).get("mIoU")
    row["mIoU_drop"] = drop
    row["drop_target_met"] = drop is not None and drop <= DROP_TARGET
    machine = {"python": platform.python_version(), "processor": platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"machine": machine, "rows": [row]}, indent=2) + "\n")

    fp32, quantized = accuracy["fp32"], accuracy["quantized"]
    print("| backend | size (of fp32) | latency fp32 ms | latency int8 ms | mIoU fp32 | mIoU int8 | drop | PQ fp32 | PQ int8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.backend} | {row['size_ratio']:.1%} | {row['latency_fp32_ms']:.1f} | {row['latency_quantized_ms']:.1f} | "
          f"{fp32['mIoU']:.2f} | {quantized['mIoU']:.2f} | {drop:.2f} | {fp32.get('PQ', float('nan')):.2f} | "
          f"{quantized.get('PQ', float('nan')):.2f} |")
    print(f"targets: size <= {SIZE_TARGET:.0%}: {'met' if row['size_target_met'] else 'NOT met'}; mIoU drop <= "
          f"{DROP_TARGET} point: {'met' if row['drop_target_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
