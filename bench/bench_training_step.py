"""What each engine-side training-step change is worth, each measured against what it replaced, side by side.

On the small configuration of ``bench/bench_model.py`` (Swin embed 32, hidden 64, 20 queries, 128x128), one
thread, best of ``--reps`` repetitions after warm-up:

- optimizer: torch's plain (single-tensor) AdamW against the fused AdamW that fp32 training builds
  (``mask2former.training.optim.build_optimizer(fused=True)``), over the same parameters and gradients;
- malloc: a training step and its minor page faults in a process with glibc's defaults against one with the
  engine's settings (``mask2former.host_allocator``), each in its own worker process, alternating;
- offsets: the deformable attention's sampling grid with the pixel-to-grid scale applied through a 6-D
  ``[.., levels, 1, xy]`` broadcast (what the model did before) against one scale per projection output
  (``MSDeformAttn.forward`` now), forward and backward, for one encoder layer's query set.

Writes ``bench/results/training_step.json`` and prints a markdown table.

    python bench/bench_training_step.py [--reps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "training_step.json"
OPTIM = SimpleNamespace(type="AdamW", lr=1e-6, weight_decay=0.05, momentum=0.9, backbone_multiplier=0.1)


def _best_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def _small_model():
    import torch
    from bench_model import CONFIGS, _build

    torch.set_num_threads(1)
    model, forward, total, _ = _build("ours", CONFIGS["small_128"])
    return model.train(), forward, total


def optimizer_step(reps: int) -> Dict[str, float]:
    """AdamW's step alone, plain then fused, on the small model's parameters with real gradients."""
    import torch
    from mask2former.training.optim import build_optimizer

    model, forward, total = _small_model()
    total(forward(torch.randn(1, 3, 128, 128))).backward()
    result = {}
    for name, fused in (("plain", False), ("fused", True)):
        optimizer = build_optimizer(model, OPTIM, fused=fused)
        result[f"{name}_ms"] = _best_ms(optimizer.step, reps)
    return result


def malloc_worker(mode: str, reps: int) -> Dict[str, float]:
    """One process: a training step's time and minor page faults, with or without the engine's settings."""
    import torch
    from mask2former.host_allocator import configure_host_allocator

    applied = configure_host_allocator() if mode == "engine" else False
    model, forward, total = _small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    images = torch.randn(1, 3, 128, 128)

    def step() -> None:
        total(forward(images)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_ms = _best_ms(step, reps)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    return {"applied": applied, "step_ms": step_ms, "minor_faults_per_step": faults}


def malloc(reps: int, rounds: int) -> Dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES",
                                                                                             "LD_PRELOAD")}
    samples: Dict[str, List[Dict[str, float]]] = {"default": [], "engine": []}
    for round_index in range(rounds):
        for mode in (("default", "engine") if round_index % 2 == 0 else ("engine", "default")):
            out = subprocess.run([sys.executable, __file__, "--malloc-worker", mode, "--reps", str(reps)], env=env,
                                 capture_output=True, text=True, check=True)
            samples[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {mode: {"step_ms": min(s["step_ms"] for s in runs),
                   "minor_faults_per_step": min(s["minor_faults_per_step"] for s in runs),
                   "applied": runs[0]["applied"]} for mode, runs in samples.items()}


def offsets(reps: int) -> Dict[str, float]:
    """The sampling grid of one encoder layer (336 queries, 8 heads, 3 levels, 4 points), forward + backward."""
    import torch
    from mask2former.model.pixel_decoder.msdeform_attn import MSDeformAttn, offset_scale

    torch.set_num_threads(1)
    shapes = [(16, 16), (8, 8), (4, 4)]
    queries, heads, levels, points = sum(h * w for h, w in shapes), 8, 3, 4
    attention = MSDeformAttn(embed_dim=64, num_heads=heads, num_levels=levels, num_points=points)
    query = torch.randn(1, queries, 64, requires_grad=True)
    reference = (2 * torch.rand(queries, 2) - 1)
    scale = offset_scale(tuple(shapes), heads=heads, points=points, device=query.device, dtype=query.dtype)
    per_level = scale.view(heads, levels, points, 2)[0, :, 0, :]

    def broadcast_6d() -> torch.Tensor:  # what the model did before
        offsets = attention.sampling_offsets(query).view(1, queries, heads, levels, points, 2)
        grids = offsets * per_level.view(1, 1, 1, levels, 1, 2) + reference.view(1, queries, 1, 1, 1, 2)
        return grids.permute(3, 0, 2, 4, 1, 5).reshape(levels, heads, points, queries, 2)

    def per_output() -> torch.Tensor:  # MSDeformAttn.forward now
        offsets = (attention.sampling_offsets(query) * scale).view(1, queries, heads, levels, points, 2)
        return (offsets.permute(3, 0, 2, 4, 1, 5) + reference).reshape(levels, heads, points, queries, 2)

    torch.testing.assert_close(broadcast_6d(), per_output())
    result = {}
    for _ in range(2):  # alternate, keep the best of both passes
        for name, grid in (("broadcast_6d", broadcast_6d), ("per_output", per_output)):
            best = _best_ms(lambda: grid().sum().backward(), reps) * 1e3
            result[f"{name}_us"] = min(result.get(f"{name}_us", float("inf")), best)
    return result


def table(report: Dict[str, Any]) -> str:
    o, m, g = report["optimizer"], report["malloc"], report["offsets"]
    rows = ["| change | before | after | before / after |", "|---|---:|---:|---:|",
            f"| AdamW step (plain -> fused) | {o['plain_ms']:.2f} ms | {o['fused_ms']:.2f} ms | "
            f"{o['plain_ms'] / o['fused_ms']:.2f}x |",
            f"| training step (glibc defaults -> engine malloc settings) | {m['default']['step_ms']:.1f} ms | "
            f"{m['engine']['step_ms']:.1f} ms | {m['default']['step_ms'] / m['engine']['step_ms']:.2f}x |",
            f"| minor page faults per training step | {m['default']['minor_faults_per_step']:.0f} | "
            f"{m['engine']['minor_faults_per_step']:.0f} | |",
            f"| sampling grid of one encoder layer, forward + backward (6-D broadcast -> one scale per output) | "
            f"{g['broadcast_6d_us']:.0f} us | {g['per_output_us']:.0f} us | "
            f"{g['broadcast_6d_us'] / g['per_output_us']:.2f}x |"]
    return "\n".join(rows)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating worker pairs for the malloc row.")
    parser.add_argument("--malloc-worker", choices=["default", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.malloc_worker:
        print(json.dumps(malloc_worker(args.malloc_worker, args.reps)))
        return 0
    import torch

    report = {"environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()},
              "method": __doc__.split("\n\n")[1].strip(),
              "optimizer": optimizer_step(args.reps), "malloc": malloc(args.reps, args.rounds),
              "offsets": offsets(args.reps * 10)}
    report["environment"]["load_average_end"] = os.getloadavg()
    report["table"] = table(report)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(report["table"])
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
