"""Training-step peak memory and time at Swin-T 512: the Hugging Face port, ours keeping the pixel decoder's
activations, and ours recomputing its encoder layers in the backward pass (``train.recompute_pixel_decoder``,
the default).

Each run is its own worker process (``bench_model.py``'s model builders and fused AdamW, the engine's malloc
settings for ours), alternating over ``--rounds``: ``--warmup`` training steps (they grow the heap and
allocate AdamW's state), then ``--steps`` timed steps; the peak RSS (VmHWM) of the whole process and the
best step time. Writes ``bench/results/training_memory.json`` and prints a markdown table.

    python bench/bench_training_memory.py [--rounds 2] [--steps 2] [--warmup 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "training_memory.json"
RUNS = ("hf", "ours_keep", "ours_recompute")


def worker(run: str, *, steps: int, warmup: int, threads: int) -> dict:
    import torch

    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    import bench_model

    torch.set_num_threads(threads)
    impl = "hf" if run == "hf" else "ours"
    if impl == "ours":
        from mask2former.host_allocator import configure_host_allocator

        configure_host_allocator()
    cfg = bench_model.CONFIGS["swin_t_512"]
    model, forward, total, training_optimizer = bench_model._build(impl, cfg)
    if impl == "ours":
        model.pixel_decoder.encoder.recompute_layers = run == "ours_recompute"
    images = torch.randn(1, 3, *cfg["image"], generator=torch.Generator().manual_seed(1))
    model.train()
    optimizer = training_optimizer()
    built_mib = bench_model._rss_kib("VmRSS") / 1024

    def step():
        total(forward(images)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"run": run, "built_mib": built_mib, "peak_mib": bench_model._rss_kib("VmHWM") / 1024,
            "step_s": min(times), "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, steps=args.steps, warmup=args.warmup, threads=args.threads)))
        return 0
    samples = {run: [] for run in RUNS}
    for _ in range(args.rounds):
        for run in RUNS:
            done = subprocess.run([sys.executable, __file__, "--worker", run, "--steps", str(args.steps), "--warmup",
                                   str(args.warmup), "--threads", str(args.threads)], capture_output=True, text=True,
                                  check=True, cwd=REPO)
            samples[run].append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {run: {"peak_mib": min(s["peak_mib"] for s in found), "step_s": min(s["step_s"] for s in found),
                  "built_mib": min(s["built_mib"] for s in found), "params_m": found[0]["params_m"]}
            for run, found in samples.items()}
    report = {"benchmark": "training_memory", "config": "Swin-T 512 (bench_model.py swin_t_512), batch 1",
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
              "settings": vars(args), "best": best, "samples": samples}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    hf = best["hf"]
    print("| run | peak RSS MiB | / HF | best step s | / HF |\n|---|---:|---:|---:|---:|")
    for run, row in best.items():
        print(f"| {run} | {row['peak_mib']:.0f} | {row['peak_mib'] / hf['peak_mib']:.2f}x | {row['step_s']:.2f} | "
              f"{row['step_s'] / hf['step_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
