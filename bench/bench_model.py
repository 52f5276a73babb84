"""Benchmark this package's Mask2Former against the Hugging Face port at the same configuration.

For each configuration (Swin-T / 133 classes / 100 queries / one 512x512 image, and a small test
configuration at 128x128) and each implementation, a separate worker process builds the model and
measures:

- inference: eval mode, ``torch.inference_mode``, one forward pass;
- training step: forward, a loss summing every output (final and auxiliary predictions), backward,
  AdamW step, with the AdamW each side's training uses: the fused kernel on both (the Hugging Face
  Trainer's default optimizer on torch >= 2.8 is ``adamw_torch_fused``; this package's fp32 training
  builds fused AdamW over its parameter groups);
- the same training step with torch's plain (single-tensor) AdamW on both sides;
- peak RSS of the process during each phase (the kernel's high-water mark, reset before the phase),
  and the rise of that peak above the RSS with the model built.

A third worker runs the port in a process with the engine's glibc malloc settings
(:mod:`mask2former.host_allocator`, which every engine process applies at its start), to show what those
settings alone are worth. Workers alternate over ``--rounds`` rounds so load from other processes
hits all alike; the summary takes the best (minimum) time over all repetitions of all rounds (the
run least disturbed by other processes on a shared machine) and the median peak memory. Prints a
markdown table and writes ``bench/results/model.json`` (every sample, with the load average when
each worker started).

    python bench/bench_model.py [--rounds 4] [--configs swin_t_512 small_128] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "model.json"
PHASES = ("inference", "train", "train_plain_adamw")
#: Workers: this package (which sets glibc malloc up as the engine's processes do), the Hugging Face port as
#: its users run it, and the port in a process with the engine's malloc settings (what they alone are worth).
IMPLS = ("ours", "hf", "hf_engine_malloc")
ENGINE_ALLOCATOR = ("ours", "hf_engine_malloc")

CONFIGS: Dict[str, Dict[str, Any]] = {
    "swin_t_512": {
        "description": "Swin-T, 133 classes, 100 queries, hidden 256, 6 encoder / 10 decoder layers, 1x3x512x512",
        "swin": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
        "num_classes": 133, "num_queries": 100, "hidden_dim": 256, "convs_dim": 256, "mask_dim": 256,
        "dim_feedforward": 2048, "encoder_layers": 6, "dec_layers": 10, "nheads": 8,
        "image": [512, 512], "reps": {"inference": 3, "train": 3}, "warmup": {"inference": 1, "train": 2},
    },
    "small_128": {
        "description": "Swin embed 32 depths [1,1,1,1] heads [1,2,4,8], hidden 64, 20 queries, 133 classes, "
                       "6 encoder / 10 decoder layers, 1x3x128x128",
        "swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 7},
        "num_classes": 133, "num_queries": 20, "hidden_dim": 64, "convs_dim": 64, "mask_dim": 64,
        "dim_feedforward": 2048, "encoder_layers": 6, "dec_layers": 10, "nheads": 8,
        "image": [128, 128], "reps": {"inference": 10, "train": 10}, "warmup": {"inference": 2, "train": 3},
    },
}


# --------------------------------------------------------------------------- worker side

def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _build(impl: str, cfg: Dict[str, Any]):
    """(model, forward, total loss, the optimizer that side's training builds)."""
    import torch

    torch.manual_seed(0)
    swin = cfg["swin"]
    if impl.startswith("hf"):
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

        backbone = SwinConfig(**swin, drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"])
        config = Mask2FormerConfig(
            backbone_config=backbone, num_labels=cfg["num_classes"], num_queries=cfg["num_queries"],
            hidden_dim=cfg["hidden_dim"], feature_size=cfg["convs_dim"], mask_feature_size=cfg["mask_dim"],
            dim_feedforward=cfg["dim_feedforward"], encoder_layers=cfg["encoder_layers"],
            decoder_layers=cfg["dec_layers"], num_attention_heads=cfg["nheads"],
        )
        model = Mask2FormerForUniversalSegmentation(config)

        def forward(images):
            return model(pixel_values=images, output_auxiliary_logits=model.training)

        def total(out):
            loss = out.class_queries_logits.sum() + out.masks_queries_logits.sum()
            for aux in out.auxiliary_logits or []:
                loss = loss + aux["class_queries_logits"].sum() + aux["masks_queries_logits"].sum()
            return loss

        def training_optimizer():
            return torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05, fused=True)
    else:
        sys.path.insert(0, str(ROOT))
        from types import SimpleNamespace

        from mask2former.model import build_backbone, build_mask2former
        from mask2former.training.optim import build_optimizer

        backbone = build_backbone(type=None, drop_path_rate=0.3, **swin)
        model = build_mask2former(
            backbone=backbone, num_classes=cfg["num_classes"], num_queries=cfg["num_queries"],
            hidden_dim=cfg["hidden_dim"], convs_dim=cfg["convs_dim"], mask_dim=cfg["mask_dim"],
            dim_feedforward=cfg["dim_feedforward"], transformer_enc_layers=cfg["encoder_layers"],
            dec_layers=cfg["dec_layers"], nheads=cfg["nheads"],
        )

        def forward(images):
            return model(images)

        def total(out):
            loss = out["pred_logits"].sum() + out["pred_masks"].sum()
            for aux in out.get("aux_outputs", []):
                loss = loss + aux["pred_logits"].sum() + aux["pred_masks"].sum()
            return loss

        def training_optimizer():
            optim = SimpleNamespace(type="AdamW", lr=1e-6, weight_decay=0.05, momentum=0.9, backbone_multiplier=0.1)
            return build_optimizer(model, optim, fused=True)
    return model, forward, total, training_optimizer


def _timed(fn, reps: int, warmup: int) -> Dict[str, List[float]]:
    for _ in range(warmup):  # the first steps also grow the heap and allocate AdamW's state
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall_s": wall, "cpu_s": cpu}


def worker(impl: str, config_name: str, threads: int) -> Dict[str, Any]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if impl in ENGINE_ALLOCATOR:
        sys.path.insert(0, str(ROOT))
        from mask2former.host_allocator import configure_host_allocator

        configure_host_allocator()  # as every engine process does at its start
    cfg = CONFIGS[config_name]
    model, forward, total, training_optimizer = _build(impl, cfg)
    images = torch.randn(1, 3, *cfg["image"], generator=torch.Generator().manual_seed(1))
    result: Dict[str, Any] = {"impl": impl, "config": config_name, "threads": torch.get_num_threads(),
                              "load_average": os.getloadavg(),
                              "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                              "rss_model_built_mib": _rss_kib("VmRSS") / 1024}

    model.eval()
    peak_resettable = _reset_peak_rss()
    base = _rss_kib("VmRSS")
    with torch.inference_mode():
        result["inference"] = _timed(lambda: forward(images), cfg["reps"]["inference"], cfg["warmup"]["inference"])
    result["inference"]["peak_rss_mib"] = _rss_kib("VmHWM") / 1024
    result["inference"]["peak_rise_mib"] = (_rss_kib("VmHWM") - base) / 1024

    model.train()
    optimizers = {"train": training_optimizer(),
                  "train_plain_adamw": torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)}
    for phase, optimizer in optimizers.items():
        def train_step():
            loss = total(forward(images))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _reset_peak_rss()
        base = _rss_kib("VmRSS")
        result[phase] = _timed(train_step, cfg["reps"]["train"], cfg["warmup"]["train"])
        result[phase]["peak_rss_mib"] = _rss_kib("VmHWM") / 1024
        result[phase]["peak_rise_mib"] = (_rss_kib("VmHWM") - base) / 1024
        optimizers[phase] = None  # its state goes before the next phase measures its peak
    result["peak_rss_resettable"] = peak_resettable
    return result


# --------------------------------------------------------------------------- driver side

def _run_worker(impl: str, config_name: str, threads: int) -> Dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", impl, "--configs", config_name, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker on {config_name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"params_m": samples[0]["params_m"]}
    for phase in PHASES:
        out[phase] = {
            "best_wall_s": min(v for s in samples for v in s[phase]["wall_s"]),
            "median_wall_s": statistics.median(v for s in samples for v in s[phase]["wall_s"]),
            "best_cpu_s": min(v for s in samples for v in s[phase]["cpu_s"]),
            "peak_rss_mib": statistics.median(s[phase]["peak_rss_mib"] for s in samples),
            "peak_rise_mib": statistics.median(s[phase]["peak_rise_mib"] for s in samples),
        }
    return out


def _table(report: Dict[str, Any]) -> str:
    lines = ["| configuration | measure | Hugging Face | HF + engine malloc | this package | HF / ours "
             "| HF + engine malloc / ours |",
             "|---|---|---|---|---|---|---|"]
    rows = [("inference", "best_wall_s", "inference time (s, best)"),
            ("inference", "median_wall_s", "inference time (s, median)"),
            ("inference", "best_cpu_s", "inference CPU time (s, best)"),
            ("train", "best_wall_s", "training step time (s, best)"),
            ("train", "median_wall_s", "training step time (s, median)"),
            ("train", "best_cpu_s", "training step CPU time (s, best)"),
            ("train_plain_adamw", "best_wall_s", "training step, plain AdamW on both (s, best)"),
            ("inference", "peak_rss_mib", "inference peak RSS (MiB)"),
            ("inference", "peak_rise_mib", "inference peak RSS over model (MiB)"),
            ("train", "peak_rss_mib", "training peak RSS (MiB)"),
            ("train", "peak_rise_mib", "training peak RSS over model (MiB)")]
    for name, result in report["configs"].items():
        hf, hf_malloc, ours = result["hf"], result["hf_engine_malloc"], result["ours"]
        for phase, key, label in rows:
            a, m, b = hf[phase][key], hf_malloc[phase][key], ours[phase][key]
            fmt = "{:.3f}" if key.endswith("_s") else "{:.0f}"
            lines.append(f"| {name} | {label} | {fmt.format(a)} | {fmt.format(m)} | {fmt.format(b)} | {a / b:.2f}x "
                         f"| {m / b:.2f}x |")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=4, help="Worker pairs per configuration (alternating).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch default).")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.configs[0], args.threads)))
        return 0

    import torch
    import transformers

    report: Dict[str, Any] = {
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "machine": platform.processor() or platform.machine(),
                        "load_average_start": os.getloadavg()},
        "method": __doc__.split("\n\n")[1].strip(),
        "configs": {},
    }
    for name in args.configs:
        samples: Dict[str, List[Dict[str, Any]]] = {impl: [] for impl in IMPLS}
        for round_index in range(args.rounds):
            order = IMPLS if round_index % 2 == 0 else IMPLS[::-1]
            for impl in order:
                samples[impl].append(_run_worker(impl, name, args.threads))
                print(f"{name} round {round_index + 1}/{args.rounds} {impl}: inference "
                      f"{min(samples[impl][-1]['inference']['wall_s']):.3f} s, train "
                      f"{min(samples[impl][-1]['train']['wall_s']):.3f} s, train with plain AdamW "
                      f"{min(samples[impl][-1]['train_plain_adamw']['wall_s']):.3f} s", file=sys.stderr, flush=True)
        report["configs"][name] = {"description": CONFIGS[name]["description"],
                                   **{impl: _summary(samples[impl]) for impl in IMPLS},
                                   "samples": samples}
    report["environment"]["load_average_end"] = os.getloadavg()
    table = _table(report)
    report["table"] = table
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(table)
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
