"""AutoML benchmark: best-of-search validation mIoU against the default configuration, same total epoch budget.

On the synthetic panoptic set (tiny Swin Mask2Former, CPU): a search of ``--trials`` trials of ``--epochs``
epochs each (``--workers`` in parallel on one SQLite study) against one training of the default
configuration for ``trials * epochs`` epochs. The default configuration is the tiny architecture with
the spec's default optimiser (lr 2e-4, backbone multiplier 0.1, weight decay 0.05, momentum 0.9); the
search varies those four and the decoder's width, queries and depth. Both report the best validation
mIoU of their run (best_model.json). Writes bench/results/automl.json and prints a table.

    python bench/bench_automl.py [--trials 8] [--epochs 2] [--workers 2] [--algorithm bayesian]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mask2former import results  # noqa: E402
from mask2former.automl.search import SearchSettings, finish_search, plan_search, run_local_search  # noqa: E402
from mask2former.data.synthetic import generate  # noqa: E402

RANGES = {
    "train.optim.lr": {"valid_min": 1e-5, "valid_max": 1e-2},
    "model.mask_former.hidden_dim": {"valid_min": 16, "valid_max": 64},
    "model.mask_former.num_object_queries": {"valid_min": 6, "valid_max": 20},
    "model.mask_former.dec_layers": {"valid_min": 2, "valid_max": 4},
}
FIXED = ["dataset.augmentation.train_max_size", "dataset.augmentation.test_min_size",
         "dataset.augmentation.test_max_size"]


def split(root: Path) -> Dict[str, Any]:
    return {"type": "coco_panoptic", "img_dir": str(root / "images.tar.gz"),
            "panoptic_json": str(root / "annotations_panoptic.json"),
            "panoptic_dir": str(root / "images_panoptic.tar.gz"), "batch_size": 2, "num_workers": 0}


def default_spec(roots: Dict[str, Path], size: int) -> Dict[str, Any]:
    """The tiny architecture with every searched optimiser key at the spec's default."""
    return {
        "model": {
            "mode": "panoptic",
            "backbone": {"swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
                                  "window_size": 4, "drop_path_rate": 0.0}},
            "sem_seg_head": {"num_classes": 13, "convs_dim": 32, "mask_dim": 32, "transformer_enc_layers": 1},
            "mask_former": {"num_object_queries": 10, "hidden_dim": 32, "nheads": 4, "dim_feedforward": 64,
                            "dec_layers": 3, "train_num_points": 256},
        },
        "dataset": {"train": split(roots["train"]), "val": split(roots["val"]),
                    "label_map": str(roots["train"] / "label_map_panoptic.json"),
                    "augmentation": {"train_min_size": [size], "train_max_size": size * 2,
                                     "train_crop_size": [size, size], "test_min_size": size,
                                     "test_max_size": size * 2}},
        "train": {"seed": 7, "optim": {"milestones": [1000, 2000]}},
    }


def train_default(spec: Dict[str, Any], folder: Path, epochs: int) -> Dict[str, Any]:
    import yaml

    spec_path = folder.parent / "default_spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mask2former", "train", "-e", str(spec_path), "--results-dir",
                           str(folder), f"train.num_epochs={epochs}"], cwd=str(REPO), capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    if done.returncode != 0:
        raise SystemExit(f"default training failed: {done.stderr[-2000:]}")
    best = results.read_best(folder)
    curve = [(line["epoch"], line["kpi"]["mIoU"]) for line in results.read_status(folder)
             if line.get("status") == "RUNNING" and "mIoU" in (line.get("kpi") or {})]
    return {"epochs": epochs, "best_mIoU": best["value"], "best_epoch": best["epoch"],
            "mIoU_per_epoch": curve, "seconds": round(time.monotonic() - began, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--algorithm", default="bayesian", choices=["bayesian", "hyperband", "random"])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--val-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "automl.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-automl-") as tmp:
        work = Path(tmp)
        roots = generate(work / "data", dataset_format="coco_panoptic", num_images=args.images, size=args.size,
                         seed=1, val_images=args.val_images)
        spec = default_spec(roots, args.size)
        budget = args.trials * args.epochs

        print(f"default configuration: {budget} epochs ...", flush=True)
        default = train_default(spec, work / "default", budget)
        print(f"  best mIoU {default['best_mIoU']:.2f} at epoch {default['best_epoch']} ({default['seconds']} s)")

        print(f"search: {args.algorithm}, {args.trials} trials x {args.epochs} epochs, {args.workers} workers ...",
              flush=True)
        settings = SearchSettings(algorithm=args.algorithm, max_recommendations=args.trials, max_epochs=args.epochs,
                                  workers=args.workers, seed=args.seed, remove_parameters=FIXED,
                                  custom_ranges=RANGES)
        began = time.monotonic()
        plan = plan_search(search_dir=work / "search", settings=settings, base_spec=spec, log=lambda _: None)
        codes = run_local_search(plan, log=lambda _: None)
        found = finish_search(plan, log=lambda _: None)
        search_seconds = round(time.monotonic() - began, 1)
        trials = [{"number": r["number"], "state": r["state"], "mIoU": r["value"], "seconds": r["seconds"],
                   "parameters": {k[len("param."):]: v for k, v in r.items() if k.startswith("param.")}}
                  for r in found.rows]
        epochs_run = sum((r["last_epoch"] or 0) for r in found.rows)

    report = {
        "benchmark": "automl: best-of-search vs default configuration, same total epoch budget",
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, torch CPU",
        "data": {"format": "coco_panoptic (synthetic)", "train_images": args.images, "val_images": args.val_images,
                 "size": args.size},
        "model": "Swin embed 32 depths [1,1,1,1], pixel decoder 32 ch / 1 encoder layer, decoder 3 predictions",
        "epoch_budget": budget,
        "default": default,
        "search": {"algorithm": args.algorithm, "trials": args.trials, "epochs_per_trial": args.epochs,
                   "workers": args.workers, "epochs_run": epochs_run, "worker_exit_codes": codes,
                   "best_mIoU": found.best["value"], "best_trial": found.best["number"],
                   "best_parameters": found.best["parameters"], "counts": found.counts, "seconds": search_seconds,
                   "trials_table": trials},
        "gain_mIoU": round(found.best["value"] - default["best_mIoU"], 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'run':<34}{'epochs':>8}{'best mIoU':>12}{'wall s':>9}")
    print(f"{'default configuration':<34}{budget:>8}{default['best_mIoU']:>12.2f}{default['seconds']:>9}")
    print(f"{'search best (' + args.algorithm + ')':<34}{epochs_run:>8}{found.best['value']:>12.2f}"
          f"{search_seconds:>9}")
    for t in trials:
        value = "-" if t["mIoU"] is None else f"{t['mIoU']:.2f}"
        lr = t["parameters"].get("train.optim.lr")
        print(f"  trial {t['number']:<3} {t['state']:<9} mIoU {value:>6}  lr {lr:.2e}  "
              f"hidden {t['parameters'].get('model.mask_former.hidden_dim')}  "
              f"queries {t['parameters'].get('model.mask_former.num_object_queries')}  "
              f"dec {t['parameters'].get('model.mask_former.dec_layers')}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
