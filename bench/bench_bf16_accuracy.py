"""Accuracy bf16 costs on a trained checkpoint: mIoU, PQ and mask AP of the same validation images in fp32, in
bf16 autocast with the deformable-attention pixel decoder kept in fp32, and in bf16 throughout (what evaluate
and inference run when ``precision: bf16`` is granted).

The checkpoint is the best one of a training run kept by the convergence race (its spec.yaml, data and
``ours/`` folder); the evaluate action's own model loading, data and evaluator are used. On a CPU without
AMX or AVX-512-bf16 the bf16 rows are computed by emulation: the same bf16 roundings, only slower, so the
accuracy holds and the time here does not. Writes bench/results/bf16_accuracy.json.

    python bench/bench_convergence_hf.py --keep /tmp/race && python bench/bench_bf16_accuracy.py --run /tmp/race
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = REPO / "bench" / "results" / "bf16_accuracy.json"
KEYS = ("mIoU", "PQ", "AP")
WAYS = {"fp32": ("fp32", False), "bf16, pixel decoder fp32": ("bf16", False), "bf16 throughout": ("bf16", True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a folder kept by bench_convergence_hf.py --keep")
    args = parser.parse_args()

    import torch

    from mask2former.config import load_spec
    from mask2former.data.build import build_datasets
    from mask2former.evaluation.models import load_job_runner
    from mask2former.evaluation.pipeline import build_evaluator, evaluate_runner
    from mask2former.runtime.precision import bf16_hardware

    best = json.loads((args.run / "ours" / "best_model.json").read_text())
    checkpoint = args.run / "ours" / best["checkpoint"]
    spec = yaml.safe_load((args.run / "spec.yaml").read_text())
    spec["evaluate"] = {"checkpoint": str(checkpoint), "batch_size": 4}
    config = load_spec("evaluate", spec=spec)
    runner, _, _ = load_job_runner(config, action="evaluate")
    dataset = build_datasets(config, "val")
    rows = {}
    for name, (precision, pixel_decoder_bf16) in WAYS.items():
        runner.set_precision(precision, pixel_decoder_bf16=pixel_decoder_bf16)
        start = time.perf_counter()
        metrics = evaluate_runner(runner=runner, dataset=dataset, evaluator=build_evaluator(config, dataset),
                                  dataset_cfg=config.dataset, batch_size=4, num_workers=0)
        rows[name] = {key: metrics[key] for key in KEYS} | {"seconds": round(time.perf_counter() - start, 1)}
    reference = rows["fp32"]
    for row in rows.values():
        row["minus_fp32"] = {key: row[key] - reference[key] for key in KEYS}
    report = {"benchmark": "bf16_accuracy", "checkpoint": {"epoch": best["epoch"], "mIoU_in_training": best["value"]},
              "images": len(dataset), "bf16_hardware": bf16_hardware(torch.device("cpu")) or "none (emulated)",
              "machine": {"platform": platform.platform(), "torch": torch.__version__}, "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(dataset)} validation images, checkpoint of epoch {best['epoch']}; bf16 units: "
          f"{report['bf16_hardware']}\n")
    print("| run | mIoU | PQ | AP | mIoU - fp32 | PQ - fp32 | AP - fp32 |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        delta = row["minus_fp32"]
        print(f"| {name} | {row['mIoU']:.2f} | {row['PQ']:.2f} | {row['AP']:.2f} | {delta['mIoU']:+.2f} | "
              f"{delta['PQ']:+.2f} | {delta['AP']:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
