"""bf16 inference against fp32 and against the Hugging Face port, in one process on this CPU.

Swin-T Mask2Former at ``bench_model.py``'s configuration (133 classes, 100 queries, one 512x512 image), the
model's forward pass three ways: fp32; bf16 autocast with the pixel decoder kept in fp32; bf16 autocast
everywhere (what ``evaluate.precision=bf16`` / ``inference.precision=bf16`` run); and the port's fp32 forward.
Alternating rounds, best time of each. For each bf16 way: the share of pixels whose semantic class
(argmax of the semantic scores) is the fp32 one and the largest difference of the mask probabilities
(random weights: a trained model's mIoU difference is what ``evaluate`` records in metrics.json). The
CPU's bf16 units are named: without AMX or AVX-512-bf16 PyTorch emulates bf16 (the jobs then run fp32).
Writes ``bench/results/bf16.json``.

    python bench/bench_bf16.py [--rounds 3] [--threads 2] [--config swin_t_512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))

import bench_model  # noqa: E402
from mask2former.model.postprocess import semantic_scores  # noqa: E402
from mask2former.runtime.precision import bf16_hardware  # noqa: E402

OUT = REPO / "bench" / "results" / "bf16.json"
WAYS = ("fp32", "bf16, pixel decoder fp32", "bf16 throughout")


def run_ours(model, images: torch.Tensor, way: str):
    """Our model's raw outputs, in ``way``."""
    model.pixel_decoder.fp32_under_autocast = way != "bf16 throughout"
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=way != "fp32"):
        outputs = model(images)
    return outputs["pred_logits"].float(), outputs["pred_masks"].float()


def timed(function):
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each way's best time is kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default="swin_t_512", choices=list(bench_model.CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = bench_model.CONFIGS[args.config]
    ours, _, _, _ = bench_model._build("ours", cfg)
    hf, hf_forward, _, _ = bench_model._build("hf", cfg)
    ours.eval()
    hf.eval()
    images = torch.randn(1, 3, *cfg["image"], generator=torch.Generator().manual_seed(1))
    run_ours(ours, images, "bf16 throughout")  # warm-up (the first bf16 call packs weights)
    with torch.inference_mode():
        hf_forward(images)
    times = {way: [] for way in ("Hugging Face fp32", *WAYS)}
    outputs = {}
    for _ in range(args.rounds):
        with torch.inference_mode():
            times["Hugging Face fp32"].append(timed(lambda: hf_forward(images))[0])
        for way in WAYS:
            seconds, outputs[way] = timed(lambda: run_ours(ours, images, way))
            times[way].append(seconds)
    best = {way: min(found) for way, found in times.items()}
    reference = semantic_scores(*outputs["fp32"]).argmax(1)
    rows = {}
    for way in ("Hugging Face fp32", *WAYS):
        row = {"seconds": best[way], "vs_hf_fp32": best[way] / best["Hugging Face fp32"],
               "vs_our_fp32": best[way] / best["fp32"]}
        if way in WAYS:
            row["same_semantic_class"] = (semantic_scores(*outputs[way]).argmax(1) == reference).float().mean().item()
            row["max_mask_prob_diff"] = (outputs[way][1].sigmoid() - outputs["fp32"][1].sigmoid()).abs().max().item()
        rows[way] = row
    report = {"benchmark": "bf16", "config": cfg["description"], "cpu_bf16_units": bf16_hardware(torch.device("cpu"))
              or "none", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                     "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                     "threads": torch.get_num_threads(), "load_average_1m": os.getloadavg()[0]},
              "weights": "random", "rounds": args.rounds, "rows": rows, "samples": times}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{cfg['description']}; CPU bf16 units: {report['cpu_bf16_units']}; best of {args.rounds}\n")
    print("| run | s per image | vs HF fp32 | vs our fp32 | same semantic class as fp32 | max mask prob difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for way, row in rows.items():
        agree = f"{100 * row['same_semantic_class']:.2f} %" if "same_semantic_class" in row else ""
        diff = f"{row['max_mask_prob_diff']:.4f}" if "max_mask_prob_diff" in row else ""
        print(f"| {way} | {row['seconds']:.3f} | {row['vs_hf_fp32']:.2f}x | {row['vs_our_fp32']:.2f}x | {agree} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
