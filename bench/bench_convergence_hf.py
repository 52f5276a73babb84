"""Convergence race: our train CLI against the Hugging Face port trained by a loop written here, on this CPU.

Both sides train the same small configuration from scratch (bench_convergence.py's: Swin embed 32, depths
[1,1,1,1]; pixel decoder 64 channels, 2 deformable layers; decoder hidden 64, 4 heads, FFN 128, 20 queries,
1024 points; parameter counts checked equal within 2 %) on the same generated COCO-panoptic data, with the same
augmentation (this project's training transform and batch order feed both), batch size, AdamW parameter
groups (backbone at 0.1x, no decay on norms, embeddings and position tables), learning rate, schedule (the
train section's defaults, from the project's schedule function) and gradient clipping (global L2 norm 0.1).
The port's loss is its own (Hungarian matching and point-sampled mask losses, the same weights).

A third run, ours with a constant rate (milestones never reached: what TAO's default milestones [88, 96] do
in a run this short), shows what the default schedule's decay at 88 % and 96 % of the run changes at its end.

Each side is its own process, started one after the other so they never share the CPU, and validates the
same images after every epoch with this project's evaluator (mIoU, PQ, mask AP on the same predictions
format). Times are seconds since the side's process started, taken when each validation result appears,
so interpreter start, data loading and validation count on both sides. A side still running at
``--minutes`` is stopped.

Writes bench/results/convergence_hf.json and prints markdown tables.

    python bench/bench_convergence_hf.py [--minutes 8] [--epochs 30] [--images 128] [--val-images 32]
                                         [--keep DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from bench_convergence import small_spec  # noqa: E402

OUT = REPO / "bench" / "results" / "convergence_hf.json"
THRESHOLDS = (80.0, 85.0, 90.0)
LEARNING_RATE = 1e-3  # from scratch; TAO's 2e-4 default is tuned for fine-tuning pretrained backbones
HF_BACKBONE_PREFIX = "model.pixel_level_module.encoder."
CONSTANT_RATE = "train.optim.milestones=[1000,2000]"  # milestones never reached
SIDES = ("ours", "ours_constant_rate", "port")


def race_spec(roots: Dict[str, Path], args: argparse.Namespace) -> Dict[str, Any]:
    """The small configuration with the train section's default schedule (only the rate is set)."""
    spec = small_spec(roots, size=args.size, epochs=args.epochs, batch_size=args.batch_size)
    spec["train"]["optim"] = {"lr": LEARNING_RATE}
    spec["train"]["checkpoint_interval"] = args.epochs  # one checkpoint: both sides spend no time on saving
    return spec


# --------------------------------------------------------------------------- the port's side

def build_port(config: Any):
    """The Hugging Face port with the small configuration of ``config.model``."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    model_cfg = config.model
    swin = model_cfg.backbone.swin
    head, decoder = model_cfg.sem_seg_head, model_cfg.mask_former
    backbone = SwinConfig(embed_dim=swin.embed_dim, depths=list(swin.depths), num_heads=list(swin.num_heads),
                          window_size=swin.window_size, drop_path_rate=swin.drop_path_rate,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    port_config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=head.num_classes, num_queries=decoder.num_object_queries,
        hidden_dim=decoder.hidden_dim, feature_size=head.convs_dim, mask_feature_size=head.mask_dim,
        encoder_layers=head.transformer_enc_layers, decoder_layers=decoder.dec_layers,
        num_attention_heads=decoder.nheads, dim_feedforward=decoder.dim_feedforward,
        train_num_points=decoder.train_num_points, oversample_ratio=decoder.oversample_ratio,
        importance_sample_ratio=decoder.importance_sample_ratio, class_weight=decoder.class_weight,
        mask_weight=decoder.mask_weight, dice_weight=decoder.dice_weight, no_object_weight=decoder.no_object_weight)
    return Mask2FormerForUniversalSegmentation(port_config)


def port_worker(spec_file: Path, out: Path, started: float) -> None:
    """Train the port for the spec's epochs; after each epoch validate and append a line to ``out``."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from torch.utils.data import DataLoader

    from mask2former.config import load_spec
    from mask2former.data.build import build_datasets
    from mask2former.data.dataset import collate_batch
    from mask2former.evaluation.pipeline import build_evaluator
    from mask2former.training.data_order import TrainingOrderSampler
    from mask2former.training.lightning_module import summary_metrics
    from mask2former.training.optim import build_param_groups, lr_multiplier_fn

    config = load_spec("train", spec=yaml.safe_load(spec_file.read_text()))
    torch.manual_seed(config.train.seed)
    train_set, val_set = build_datasets(config, "train"), build_datasets(config, "val")
    collate = partial(collate_batch, size_divisibility=config.dataset.augmentation.size_divisibility)
    sampler = TrainingOrderSampler(len(train_set), seed=config.train.seed)
    train_loader = DataLoader(train_set, batch_size=config.dataset.train.batch_size, sampler=sampler,
                              collate_fn=collate)
    val_loader = DataLoader(val_set, batch_size=config.dataset.val.batch_size, collate_fn=collate)
    evaluator = build_evaluator(config, val_set)
    model = build_port(config)
    optim_cfg = config.train.optim
    groups = build_param_groups(model, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                                backbone_multiplier=optim_cfg.backbone_multiplier, backbone_prefix=HF_BACKBONE_PREFIX)
    optimizer = torch.optim.AdamW(groups, lr=optim_cfg.lr,
                                  betas=(optim_cfg.momentum, 0.999), weight_decay=optim_cfg.weight_decay, fused=True)
    epochs = config.train.num_epochs
    epoch_steps = len(train_loader)  # one process: the batches of an epoch
    multiplier = lr_multiplier_fn(scheduler=optim_cfg.lr_scheduler, total_steps=epoch_steps * epochs,
                                  steps_per_epoch=epoch_steps, milestones=list(optim_cfg.milestones),
                                  gamma=optim_cfg.gamma, warmup_iters=optim_cfg.warmup_iters,
                                  warmup_factor=optim_cfg.warmup_factor, poly_power=optim_cfg.poly_power)
    scheduler = LambdaLR(optimizer, multiplier)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        for batch in train_loader:
            targets = batch["targets"]
            out_ = model(pixel_values=batch["images"], mask_labels=[t["masks"].float() for t in targets],
                         class_labels=[t["labels"] for t in targets])
            out_.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(float(out_.loss))
        model.eval()
        evaluator.reset()
        with torch.inference_mode():
            for batch in val_loader:
                outputs = model(pixel_values=batch["images"])
                raw = {"pred_logits": outputs.class_queries_logits.float(),
                       "pred_masks": outputs.masks_queries_logits.float()}
                for prediction in evaluator.host(raw, batch["metas"]):
                    evaluator.update(prediction)
        summary = summary_metrics(evaluator.compute())
        line = {"epoch": epoch + 1, "elapsed_s": round(time.time() - started, 2),
                "train_loss": sum(losses) / len(losses), **summary}
        with open(out, "a") as fh:
            fh.write(json.dumps(line) + "\n")


# --------------------------------------------------------------------------- the race

def follow(process: subprocess.Popen, read_points, *, started: float, limit_s: float) -> List[Dict[str, Any]]:
    """Wait for ``process`` (stopping it at ``limit_s``); its validation points, each with the seconds since
    ``started`` at which it first appeared (unless the point brings its own)."""
    seen: Dict[int, float] = {}

    def note() -> List[Dict[str, Any]]:
        points = read_points()
        for point in points:
            seen.setdefault(point["epoch"], round(time.time() - started, 2))
        return [dict(point, elapsed_s=point.get("elapsed_s", seen[point["epoch"]])) for point in points]

    while process.poll() is None and time.time() - started <= limit_s:
        note()
        time.sleep(0.2)
    if process.poll() is None:
        process.kill()
        process.wait()
    return [point for point in note() if point["elapsed_s"] <= limit_s]


def race(command: List[str], read_points, *, log: Path, limit_s: float) -> Dict[str, Any]:
    """Run one side's process (its output into ``log``) and follow its validation points."""
    started = time.time()
    with open(log, "w") as output:
        process = subprocess.Popen([c.replace("{started}", str(started)) for c in command], cwd=REPO,
                                   stdout=output, stderr=subprocess.STDOUT)
        curve = follow(process, read_points, started=started, limit_s=limit_s)
    finished = process.returncode == 0
    return {"curve": curve, "finished": finished, "output_tail": "" if finished else log.read_text()[-2000:]}


def run_ours(spec_file: Path, folder: Path, limit_s: float, *overrides: str) -> Dict[str, Any]:
    def points() -> List[Dict[str, Any]]:
        status = folder / "status.json"
        lines = [json.loads(line) for line in status.read_text().splitlines()] if status.is_file() else []
        losses = {line.get("epoch"): line["kpi"].get("loss") for line in lines
                  if line.get("message", "").startswith("Epoch ") and "kpi" in line}
        return [{"epoch": line["epoch"], "train_loss": losses.get(line["epoch"]),
                 **{key: line["kpi"].get(key) for key in ("mIoU", "PQ", "AP")}}
                for line in lines if line.get("message", "").startswith("Validation")]

    command = [sys.executable, "-m", "mask2former", "train", "-e", str(spec_file), "--results-dir", str(folder),
               *overrides]
    return race(command, points, log=folder.with_suffix(".log"), limit_s=limit_s)


def run_port(spec_file: Path, out: Path, limit_s: float) -> Dict[str, Any]:
    def points() -> List[Dict[str, Any]]:
        return [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []

    command = [sys.executable, __file__, "--port-worker", str(spec_file), str(out), "{started}"]
    return race(command, points, log=out.with_suffix(".log"), limit_s=limit_s)


def parameter_counts(spec: Dict[str, Any]) -> Dict[str, int]:
    from mask2former.config import load_spec
    from mask2former.training.session import build_network

    config = load_spec("train", spec=copy.deepcopy(spec))
    ours, _ = build_network(config)
    return {"ours": sum(p.numel() for p in ours.parameters()),
            "port": sum(p.numel() for p in build_port(config).parameters())}


def summarise(curve: List[Dict[str, Any]]) -> Dict[str, Any]:
    best = max(curve, key=lambda p: p["mIoU"], default=None)
    reached = {f"{t:.0f}": next((p["elapsed_s"] for p in curve if p["mIoU"] >= t), None) for t in THRESHOLDS}
    return {"best_mIoU": best and best["mIoU"], "best_epoch": best and best["epoch"],
            "last_mIoU": curve[-1]["mIoU"] if curve else None, "epochs_done": len(curve), "seconds_to": reached}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="each side's wall-clock budget")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--val-images", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--keep", type=Path, help="keep the generated data and our run (its checkpoints) here")
    parser.add_argument("--port-worker", nargs=3, metavar=("SPEC", "OUT", "STARTED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.port_worker:
        spec_file, out, started = args.port_worker
        port_worker(Path(spec_file), Path(out), float(started))
        return 0

    import torch

    from mask2former.data.synthetic import generate

    limit_s = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="bench-race-") as scratch:
        tmp = args.keep or Path(scratch)
        roots = generate(Path(tmp) / "data", dataset_format="coco_panoptic", num_images=args.images,
                         size=args.size, seed=0, val_images=args.val_images)
        spec = race_spec(roots, args)
        spec_file = Path(tmp) / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        params = parameter_counts(spec)
        if abs(params["ours"] / params["port"] - 1) > 0.02:
            raise SystemExit(f"parameter counts differ by more than 2 %: {params}")
        load_before = os.getloadavg()[0]
        ours = run_ours(spec_file, Path(tmp) / "ours", limit_s)
        # what TAO trains with its default milestones in a run this short: a constant rate to the last step
        constant = run_ours(spec_file, Path(tmp) / "ours_constant_rate", limit_s, CONSTANT_RATE)
        port = run_port(spec_file, Path(tmp) / "port.jsonl", limit_s)
        load_after = os.getloadavg()[0]
    report = {
        "benchmark": "convergence_hf",
        "machine": {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
                    "amx": "amx_bf16" in _cpu_flags(), "avx512_bf16": "avx512_bf16" in _cpu_flags(),
                    "load_average_1m": [load_before, load_after]},
        "versions": _versions(torch),
        "settings": {key: value for key, value in vars(args).items() if key not in ("port_worker", "keep")},
        "learning_rate": LEARNING_RATE, "parameters": params,
        "ours": {**ours, **summarise(ours["curve"])},
        "ours_constant_rate": {**constant, **summarise(constant["curve"])},
        "port": {**port, **summarise(port["curve"])},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    return 0 if ours["finished"] and constant["finished"] else 1


def print_tables(report: Dict[str, Any]) -> None:
    print(f"parameters: ours {report['parameters']['ours']:,}, port {report['parameters']['port']:,}\n")
    print("| side | epoch | s | train loss | mIoU | PQ | AP |\n|---|---:|---:|---:|---:|---:|---:|")
    for side in SIDES:
        for p in report[side]["curve"]:
            loss = "" if p.get("train_loss") is None else f"{p['train_loss']:.2f}"
            print(f"| {side} | {p['epoch']} | {p['elapsed_s']:.0f} | {loss} | {p['mIoU']:.1f} | {p['PQ']:.1f} | "
                  f"{p['AP']:.1f} |")
    print("\n| side | s to 80 | s to 85 | s to 90 | best mIoU (epoch) | last mIoU |\n|---|---:|---:|---:|---:|---:|")
    for side in SIDES:
        s = report[side]
        to = [("-" if s["seconds_to"][k] is None else f"{s['seconds_to'][k]:.0f}") for k in ("80", "85", "90")]
        best = "-" if s["best_mIoU"] is None else f"{s['best_mIoU']:.1f} ({s['best_epoch']})"
        last = "-" if s["last_mIoU"] is None else f"{s['last_mIoU']:.1f}"
        print(f"| {side} | {' | '.join(to)} | {best} | {last} |")
    for side in SIDES:
        if report[side]["output_tail"]:
            print(f"\n{side} failed:\n{report[side]['output_tail']}")


def _cpu_flags() -> set:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_model() -> Optional[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _versions(torch) -> Dict[str, str]:
    import pytorch_lightning
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "pytorch_lightning": pytorch_lightning.__version__}


if __name__ == "__main__":
    sys.exit(main())
