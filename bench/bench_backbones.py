"""Benchmark: Mask2Former on EfficientViT-l1 and EfficientViT-b2 against Swin-T, one run, same head.

Each model: 133 classes, 100 queries, the default pixel decoder and decoder (6 encoder layers, 10
predictions), random weights (speed does not depend on them), batch 1 at ``--size`` x ``--size``:

- parameters and GFLOPs of one inference forward (``torch.utils.flop_counter.FlopCounterMode``; it counts
  convolutions and matrix products at 2 FLOPs per multiply-add, not the deformable attention's
  grid_sample);
- PyTorch eager inference (the network under ``inference_mode``) and a training step (forward in train
  mode, a sum over every output, backward, the fused AdamW fp32 training builds): best of ``--runs`` after
  one warm-up;
- ONNX Runtime latency of the exported inference model (the export action's exporter and simplifier),
  best of ``--runs`` after one warm-up, with the parity check against PyTorch.

The models are measured one after another, in rounds when ``--rounds`` > 1, so a busy machine slows them
alike; read the ratios to Swin-T.

    python bench/bench_backbones.py [--size 512] [--runs 3] [--rounds 1] [--threads N]

Prints a markdown table and writes ``bench/results/backbones.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime  # noqa: E402

from mask2former.config import load_spec  # noqa: E402
from mask2former.export.onnx_export import export_onnx  # noqa: E402
from mask2former.export.parity import check_parity, sample_inputs  # noqa: E402
from mask2former.export.simplify import simplify_onnx  # noqa: E402
from mask2former.model import build_model  # noqa: E402
from mask2former.runtime.inference_model import InferenceModel  # noqa: E402
from mask2former.runtime.onnx_runner import OnnxRunner  # noqa: E402
from mask2former.training.optim import build_optimizer  # noqa: E402

HEAD = {"model.sem_seg_head.num_classes": 133, "model.mask_former.num_object_queries": 100}
MODELS = {
    "Swin-T": {"model.backbone.type": "swin", "model.backbone.swin.type": "tiny"},
    "EfficientViT-l1": {"model.backbone.type": "efficientvit", "model.backbone.efficientvit.name": "l1"},
    "EfficientViT-b2": {"model.backbone.type": "efficientvit", "model.backbone.efficientvit.name": "b2"},
}
RESULTS = Path(__file__).resolve().parent / "results" / "backbones.json"


def _best_s(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _total(out: Dict[str, Any]) -> torch.Tensor:
    loss = out["pred_logits"].sum() + out["pred_masks"].sum()
    for aux in out.get("aux_outputs", []):
        loss = loss + aux["pred_logits"].sum() + aux["pred_masks"].sum()
    return loss


def measure(name: str, *, size: int, runs: int, threads: int, work: Path) -> Dict[str, Any]:
    overrides = {**MODELS[name], **HEAD, "model.mode": "panoptic", "export.checkpoint": "unused.pth"}
    config = load_spec("export", overrides=overrides)
    torch.manual_seed(0)
    network = build_model(config.model)
    images = torch.randn(1, 3, size, size)
    row: Dict[str, Any] = {"model": name, "parameters": sum(p.numel() for p in network.parameters()),
                           "backbone_parameters": sum(p.numel() for p in network.backbone.parameters())}

    network.eval()
    with FlopCounterMode(display=False) as counter:  # grad mode: its module tracker hooks need it
        network(images)
    row["gflops"] = counter.get_total_flops() / 1e9
    with torch.inference_mode():
        row["inference_s"] = _best_s(lambda: network(images), runs)

    network.train()
    optimizer = build_optimizer(network, SimpleNamespace(type="AdamW", lr=1e-6, weight_decay=0.05, momentum=0.9,
                                                         backbone_multiplier=0.1), fused=True)

    def train_step() -> None:
        _total(network(images)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row["train_step_s"] = _best_s(train_step, runs)
    del optimizer

    network.eval()
    model = InferenceModel(network, mode="panoptic", topk=config.model.test_topk_per_image).eval()
    raw, slim = work / f"{name}.raw.onnx", work / f"{name}.onnx"
    export_onnx(model, raw, output_names=model.output_names, input_height=size, input_width=size, batch_size=-1)
    simplify_onnx(raw, slim)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    runner = OnnxRunner(slim, session_options=options)
    inputs = sample_inputs(batch=1, channels=3, height=size, width=size, count=1, seed=0)
    parity = check_parity(model, runner, inputs, tolerance=1e-3)
    row["onnx_parity_max_abs_diff"] = parity.max_abs_diff
    row["onnxruntime_s"] = _best_s(lambda: runner(inputs[0]), runs)
    return row


def table(rows: List[Dict[str, Any]]) -> str:
    base = next(row for row in rows if row["model"] == "Swin-T")
    lines = ["| Mask2Former on | params (backbone) | GFLOPs | PyTorch inference | training step | ONNX Runtime | "
             "parity |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        def cell(key: str) -> str:
            return f"{row[key]:.2f} s ({base[key] / row[key]:.2f}x)"

        lines.append(f"| {row['model']} | {row['parameters'] / 1e6:.1f}M ({row['backbone_parameters'] / 1e6:.1f}M) | "
                     f"{row['gflops']:.0f} ({row['gflops'] / base['gflops']:.2f}) | {cell('inference_s')} | "
                     f"{cell('train_step_s')} | {cell('onnxruntime_s')} | {row['onnx_parity_max_abs_diff']:.1g} |")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: all)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    samples: Dict[str, List[Dict[str, Any]]] = {name: [] for name in args.models}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for name in args.models:
                samples[name].append(measure(name, size=args.size, runs=args.runs, threads=threads, work=Path(work)))
                print(json.dumps(samples[name][-1]), flush=True)
    timed = ("inference_s", "train_step_s", "onnxruntime_s")
    rows = [{**runs[0], **{key: min(run[key] for run in runs) for key in timed}} for runs in samples.values()]
    machine = {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": threads,
               "size": args.size, "runs": args.runs, "rounds": args.rounds}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"machine": machine, "rows": rows, "samples": samples}, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
