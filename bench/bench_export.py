"""Benchmark: PyTorch eager vs onnxruntime on the same exported model and the same inputs.

One run: build the model (random weights: speed does not depend on them), wrap it in the inference model
(network + tensor stage of post-processing, the exported graph), export it with the export action's code
(mask2former.export: legacy exporter, onnxslim), check parity, then time both runtimes on the same
normalised input batches, alternating batch by batch so a busy machine slows both alike. Target:
onnxruntime no slower than PyTorch eager.

    python bench/bench_export.py [--model swin-t|tiny] [--height 512] [--width 512] [--mode panoptic]
                                 [--runs 5] [--threads N]

Prints a markdown table and writes ``bench/results/export.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime  # noqa: E402

from mask2former.config import load_spec  # noqa: E402
from mask2former.export.onnx_export import export_onnx  # noqa: E402
from mask2former.export.parity import check_parity, sample_inputs  # noqa: E402
from mask2former.export.simplify import simplify_onnx  # noqa: E402
from mask2former.model import build_model  # noqa: E402
from mask2former.runtime.inference_model import InferenceModel  # noqa: E402
from mask2former.runtime.onnx_runner import OnnxRunner  # noqa: E402

MODELS = {
    # upstream COCO-panoptic Swin-T: 133 classes, 100 queries, 6 deformable encoder layers, 10 predictions
    "swin-t": {"model.backbone.swin.type": "tiny", "model.sem_seg_head.num_classes": 133},
    # the test configuration
    "tiny": {"model.backbone.swin.embed_dim": 32, "model.backbone.swin.depths": [1, 1, 1, 1],
             "model.backbone.swin.num_heads": [1, 2, 4, 8], "model.sem_seg_head.num_classes": 13,
             "model.sem_seg_head.convs_dim": 32, "model.sem_seg_head.mask_dim": 32,
             "model.sem_seg_head.transformer_enc_layers": 1, "model.mask_former.num_object_queries": 10,
             "model.mask_former.hidden_dim": 32, "model.mask_former.nheads": 4,
             "model.mask_former.dim_feedforward": 64, "model.mask_former.dec_layers": 3},
}
RESULTS = Path(__file__).resolve().parent / "results" / "export.json"


def _time_ms(fn, images) -> float:
    started = time.perf_counter()
    fn(images)
    return (time.perf_counter() - started) * 1000.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="swin-t")
    parser.add_argument("--mode", choices=["semantic", "instance", "panoptic"], default="panoptic")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5, help="timed batches per runtime (batch 1)")
    parser.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: all)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    overrides = dict(MODELS[args.model], **{"model.mode": args.mode, "export.checkpoint": "unused.pth"})
    config = load_spec("export", overrides=overrides)
    torch.manual_seed(0)
    network = build_model(config.model).eval()
    model = InferenceModel(network, mode=args.mode, topk=config.model.test_topk_per_image).eval()
    parameters = sum(p.numel() for p in network.parameters())

    with tempfile.TemporaryDirectory() as work:
        raw, slim = Path(work) / "raw.onnx", Path(work) / "model.onnx"
        started = time.perf_counter()
        export_onnx(model, raw, output_names=model.output_names, input_height=args.height, input_width=args.width,
                    batch_size=-1)
        export_s = time.perf_counter() - started
        simplification = simplify_onnx(raw, slim)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        runner = OnnxRunner(slim, session_options=options)
        inputs = sample_inputs(batch=1, channels=3, height=args.height, width=args.width, count=args.runs, seed=0)
        parity = check_parity(model, runner, inputs[:1], tolerance=1e-3)
        with torch.inference_mode():
            model(inputs[0])
            runner(inputs[0])
            torch_ms, ort_ms = [], []
            for images in inputs:
                torch_ms.append(_time_ms(model, images))
                ort_ms.append(_time_ms(runner, images))
        onnx_bytes = slim.stat().st_size

    row = {"model": args.model, "mode": args.mode, "input": [args.height, args.width], "batch": 1,
           "parameters": parameters, "threads": threads, "runs": args.runs,
           "torch_eager_ms": statistics.median(torch_ms), "onnxruntime_ms": statistics.median(ort_ms),
           "torch_eager_ms_all": torch_ms, "onnxruntime_ms_all": ort_ms,
           "export_s": export_s, "simplify": simplification.to_dict(), "onnx_bytes": onnx_bytes,
           "parity_max_abs_diff": parity.max_abs_diff, "parity_passed": parity.passed}
    row["speedup"] = row["torch_eager_ms"] / row["onnxruntime_ms"]
    row["target_met"] = row["onnxruntime_ms"] <= row["torch_eager_ms"]
    machine = {"python": platform.python_version(), "processor": platform.machine(), "torch": torch.__version__,
               "onnxruntime": onnxruntime.__version__, "cpu_threads": threads}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"machine": machine, "rows": [row]}, indent=2) + "\n")

    print(f"| model | input | params | PyTorch eager ms | onnxruntime ms | speedup | parity max diff |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.model} ({args.mode}) | {args.height}x{args.width} | {parameters / 1e6:.1f}M | "
          f"{row['torch_eager_ms']:.1f} | {row['onnxruntime_ms']:.1f} | {row['speedup']:.2f}x | "
          f"{row['parity_max_abs_diff']:.2g} |")
    print(f"export {export_s:.1f} s; {simplification.message} in {simplification.seconds:.1f} s; "
          f"target (onnxruntime no slower): {'met' if row['target_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
