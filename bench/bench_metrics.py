"""Benchmark the metrics against the reference engines on synthetic data.

One run, the same synthetic images for every engine (panoptic ground truth with things, stuff and
void, and noisy predictions made from it):

- mask AP: ``InstanceEvaluator`` vs pycocotools' COCOeval called directly (and faster-coco-eval
  when it is installed);
- PQ: ``PanopticEvaluator`` vs ``torchmetrics.detection.PanopticQuality``;
- mIoU: ``SemanticEvaluator`` vs ``torchmetrics.classification.MulticlassJaccardIndex``.

Inputs are prepared before the clocks start, in each engine's own format, so only update and
compute are timed. Prints a markdown table and writes ``bench/results/metrics.json``.

    python bench/bench_metrics.py [--images 500] [--size 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask2former.metrics import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator, masks_to_rle  # noqa: E402

THINGS = [1, 2, 3, 5, 7, 9, 11, 14]  # raw, non-contiguous category ids
STUFF = [20, 23, 31, 40, 44]
VOID_CATEGORY = 0  # torchmetrics: a category outside things and stuff is void
IGNORE = 255


def make_image(rng: np.random.Generator, size: int):
    """Ground truth and prediction for one image, as panoptic id maps plus segment lists.

    Ground truth: stuff bands, 3-10 thing instances (ellipses and boxes), void blobs. The
    prediction shifts and grows or shrinks every segment, relabels a few, drops a few and adds
    spurious ones; it leaves no pixel void (torchmetrics treats predicted void unlike panopticapi).
    """
    yy, xx = np.mgrid[:size, :size]
    gt = np.zeros((size, size), np.int64)
    pred = np.zeros((size, size), np.int64)
    gt_segments, pred_segments, next_id = [], [], 1

    stuff = rng.choice(STUFF, size=int(rng.integers(2, 4)), replace=False)
    cuts = np.sort(rng.choice(np.arange(size // 8, size - size // 8), size=len(stuff) - 1, replace=False))
    edges = [0, *cuts.tolist(), size]
    for index, category in enumerate(stuff):
        gt[edges[index] : edges[index + 1]] = next_id
        jitter = int(rng.integers(-size // 16, size // 16 + 1))
        top = 0 if index == 0 else edges[index] + jitter
        pred[max(top, 0) :] = next_id
        gt_segments.append({"id": next_id, "category_id": int(category), "iscrowd": 0})
        pred_segments.append({"id": next_id, "category_id": int(category)})
        next_id += 1

    for _ in range(int(rng.integers(3, 11))):
        cy, cx = rng.integers(0, size, size=2)
        ry, rx = rng.integers(size // 32, size // 5, size=2)
        category = int(rng.choice(THINGS))
        shape = "ellipse" if rng.random() < 0.6 else "box"
        gt_mask = _shape(shape, yy, xx, cy, cx, ry, rx)
        gt[gt_mask] = next_id
        gt_segments.append({"id": next_id, "category_id": category, "iscrowd": 0})
        if rng.random() > 0.1:  # 10 % missed
            dy, dx = rng.integers(-max(ry // 3, 1), max(ry // 3, 1) + 1), rng.integers(-max(rx // 3, 1), max(rx // 3, 1) + 1)
            scale = rng.uniform(0.8, 1.2)
            pred_mask = _shape(shape, yy, xx, cy + dy, cx + dx, max(int(ry * scale), 1), max(int(rx * scale), 1))
            pred[pred_mask] = next_id
            label = category if rng.random() > 0.1 else int(rng.choice(THINGS))
            pred_segments.append({"id": next_id, "category_id": label})
        next_id += 1

    for _ in range(int(rng.integers(0, 3))):  # spurious detections
        cy, cx = rng.integers(0, size, size=2)
        ry, rx = rng.integers(size // 40, size // 10, size=2)
        pred[_shape("ellipse", yy, xx, cy, cx, ry, rx)] = next_id
        pred_segments.append({"id": next_id, "category_id": int(rng.choice(THINGS))})
        next_id += 1

    for _ in range(int(rng.integers(1, 4))):  # void in the ground truth
        cy, cx = rng.integers(0, size, size=2)
        gt[_shape("box", yy, xx, cy, cx, *rng.integers(2, size // 12, size=2))] = 0

    gt_present, pred_present = set(np.unique(gt).tolist()), set(np.unique(pred).tolist())
    gt_segments = [s for s in gt_segments if s["id"] in gt_present]
    pred_segments = [s for s in pred_segments if s["id"] in pred_present]
    scores = {s["id"]: float(rng.uniform(0.3, 1.0)) for s in pred_segments}
    return gt, gt_segments, pred, pred_segments, scores


def _shape(kind, yy, xx, cy, cx, ry, rx):
    if kind == "ellipse":
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)


def category_map(seg: np.ndarray, segments: list[dict], void: int) -> np.ndarray:
    """Per-pixel category id of a panoptic map, ``void`` where no segment."""
    lookup = {s["id"]: s["category_id"] for s in segments}
    ids, inverse = np.unique(seg, return_inverse=True)
    return np.array([lookup.get(int(i), void) for i in ids], np.int64)[inverse].reshape(seg.shape)


def instance_map(seg: np.ndarray, segments: list[dict]) -> np.ndarray:
    """Per-pixel instance id for things (the segment id), 0 for stuff and void."""
    things = {s["id"] for s in segments if s["category_id"] in THINGS}
    return np.where(np.isin(seg, list(things)), seg, 0)


def build_dataset(images: int, size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    contiguous = np.full(256, IGNORE, np.int64)
    contiguous[THINGS + STUFF] = np.arange(len(THINGS + STUFF))
    data = {"panoptic": [], "semantic": [], "tm_panoptic": [], "tm_semantic": [], "detections": {}}
    coco_gt = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c, "name": f"thing{c}"} for c in THINGS],
    }
    for image_id in range(1, images + 1):
        gt, gt_segments, pred, pred_segments, scores = make_image(rng, size)
        data["panoptic"].append((pred, pred_segments, gt, gt_segments))
        gt_sem = category_map(gt, gt_segments, void=IGNORE).astype(np.uint8)
        pred_sem = category_map(pred, pred_segments, void=IGNORE).astype(np.uint8)
        data["semantic"].append((pred_sem, gt_sem))
        data["tm_semantic"].append(
            (torch.from_numpy(contiguous[pred_sem][None]), torch.from_numpy(contiguous[gt_sem][None]))
        )
        tm_gt = np.stack([category_map(gt, gt_segments, void=VOID_CATEGORY), instance_map(gt, gt_segments)], -1)
        tm_pred = np.stack([category_map(pred, pred_segments, void=VOID_CATEGORY), instance_map(pred, pred_segments)], -1)
        data["tm_panoptic"].append((torch.from_numpy(tm_pred[None]), torch.from_numpy(tm_gt[None])))

        coco_gt["images"].append({"id": image_id, "height": size, "width": size, "file_name": f"{image_id}.jpg"})
        gt_things = [s for s in gt_segments if s["category_id"] in THINGS]
        for segment, rle in zip(gt_things, masks_to_rle(np.stack([gt == s["id"] for s in gt_things]) if gt_things else np.zeros((0, size, size), bool))):
            coco_gt["annotations"].append(
                {
                    "id": len(coco_gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": segment["category_id"],
                    "segmentation": rle,
                    "area": float(np.sum(gt == segment["id"])),
                    "bbox": _bbox(gt == segment["id"]),
                    "iscrowd": 0,
                }
            )
        pred_things = [s for s in pred_segments if s["category_id"] in THINGS]
        rles = masks_to_rle(np.stack([pred == s["id"] for s in pred_things])) if pred_things else []
        data["detections"][image_id] = [
            {"category_id": s["category_id"], "segmentation": rle, "score": scores[s["id"]]}
            for s, rle in zip(pred_things, rles)
        ]
    data["coco_gt"] = coco_gt
    return data


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def timed(function):
    """(seconds, value) of one call."""
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def interleaved_best(repeats: int, engines, budget_s: float = 60.0):
    """Time each engine up to ``repeats`` times, alternating between them; keep each one's fastest.

    ``engines`` is a list of ``(function, setup)``: ``setup``, when not None, makes a fresh
    argument for each call outside the clock (pycocotools' ``loadRes`` writes into the detections
    it gets). Alternating and keeping the best run make the ratio robust to the load of a shared
    machine changing during the run; an engine stops repeating once its runs have taken
    ``budget_s`` in all, so a very slow one is timed once rather than skipped.
    Returns ``[(seconds, value, runs), ...]`` in the order of ``engines``.
    """
    runs = [[] for _ in engines]
    for _ in range(repeats):
        for (function, setup), engine_runs in zip(engines, runs):
            if sum(seconds for seconds, _ in engine_runs) >= budget_s:
                continue
            if setup is None:
                engine_runs.append(timed(function))
            else:
                argument = setup()
                engine_runs.append(timed(lambda: function(argument)))
    return [(*min(engine_runs, key=lambda run: run[0]), len(engine_runs)) for engine_runs in runs]


# ---- mask AP ---------------------------------------------------------------------------------


def ours_ap(data):
    evaluator = InstanceEvaluator(data["coco_gt"])
    for image_id, detections in data["detections"].items():
        evaluator.update(image_id, detections)
    return evaluator.compute()["AP"]


def _results_list(data):
    return [{"image_id": i, **d} for i, dets in data["detections"].items() for d in dets]


def pycocotools_ap(data, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = data["coco_gt"]
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return 100 * coco_eval.stats[0]


def faster_coco_eval_ap(data, results):
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(data["coco_gt"])
        coco_eval = COCOeval_faster(coco_gt, coco_gt.loadRes(results), "segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return 100 * coco_eval.stats[0]


# ---- PQ --------------------------------------------------------------------------------------


def ours_pq(data):
    evaluator = PanopticEvaluator(
        [{"id": c, "name": str(c), "isthing": c in THINGS} for c in THINGS + STUFF]
    )
    for pred, pred_segments, gt, gt_segments in data["panoptic"]:
        evaluator.update(pred, pred_segments, gt, gt_segments)
    return evaluator.compute()["PQ"]


def torchmetrics_pq(data):
    from torchmetrics.detection import PanopticQuality

    metric = PanopticQuality(things=set(THINGS), stuffs=set(STUFF))
    for pred, target in data["tm_panoptic"]:
        metric.update(pred, target)
    return 100 * metric.compute().item()


# ---- mIoU ------------------------------------------------------------------------------------


def ours_miou(data):
    evaluator = SemanticEvaluator(THINGS + STUFF, [str(c) for c in THINGS + STUFF], ignore_label=IGNORE)
    for pred, gt in data["semantic"]:
        evaluator.update(pred, gt)
    return evaluator.compute()["mIoU"]


def torchmetrics_miou(data, *, validate_args: bool):
    from torchmetrics.classification import MulticlassJaccardIndex

    metric = MulticlassJaccardIndex(
        num_classes=len(THINGS + STUFF), ignore_index=IGNORE, average="macro", validate_args=validate_args
    )
    for pred, target in data["tm_semantic"]:
        metric.update(pred, target)
    return 100 * metric.compute().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of up to N timed runs per engine, alternating (60 s budget each)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "metrics.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    prepare_s, data = timed(lambda: build_dataset(args.images, args.size, args.seed))
    print(f"prepared {args.images} images of {args.size}x{args.size} in {prepare_s:.1f} s", file=sys.stderr)

    rows = []

    def compare(metric, ours, theirs_name, theirs, theirs_setup=None):
        (ours_s, ours_value, ours_runs), (theirs_s, theirs_value, theirs_runs) = interleaved_best(
            args.repeats, [(ours, None), (theirs, theirs_setup)]
        )
        rows.append(
            {
                "metric": metric,
                "reference": theirs_name,
                "ours_s": ours_s,
                "reference_s": theirs_s,
                "ratio": ours_s / theirs_s,
                "ours_value": ours_value,
                "reference_value": theirs_value,
                "abs_diff": abs(ours_value - theirs_value),
                "ours_runs": ours_runs,
                "reference_runs": theirs_runs,
            }
        )

    fresh_results = lambda: copy.deepcopy(_results_list(data))  # noqa: E731
    compare("mask AP", lambda: ours_ap(data), "pycocotools COCOeval", lambda r: pycocotools_ap(data, r), fresh_results)
    if importlib.util.find_spec("faster_coco_eval") is not None:
        compare("mask AP", lambda: ours_ap(data), "faster-coco-eval", lambda r: faster_coco_eval_ap(data, r), fresh_results)
    compare("PQ", lambda: ours_pq(data), "torchmetrics PanopticQuality", lambda: torchmetrics_pq(data))
    compare("mIoU", lambda: ours_miou(data), "torchmetrics MulticlassJaccardIndex", lambda: torchmetrics_miou(data, validate_args=True))
    compare(
        "mIoU",
        lambda: ours_miou(data),
        "torchmetrics MulticlassJaccardIndex (validate_args=False)",
        lambda: torchmetrics_miou(data, validate_args=False),
    )

    print(f"\n{args.images} synthetic images, {args.size}x{args.size}, best of up to {args.repeats} runs (runs in brackets)\n")
    print("| metric | reference | ours (s) | reference (s) | ours / reference | our value | reference value |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['metric']} | {row['reference']} | {row['ours_s']:.3f} ({row['ours_runs']}) | "
            f"{row['reference_s']:.3f} ({row['reference_runs']}) | {row['ratio']:.3f}x | "
            f"{row['ours_value']:.4f} | {row['reference_value']:.4f} |"
        )
    for row in rows:
        if not math.isclose(row["ours_value"], row["reference_value"], abs_tol=1e-3):
            print(f"WARNING: {row['metric']} differs from {row['reference']} by {row['abs_diff']:.6f}", file=sys.stderr)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "images": args.images,
        "size": args.size,
        "seed": args.seed,
        "repeats": args.repeats,
        "machine": {"python": platform.python_version(), "processor": platform.machine(), "torch": torch.__version__},
        "rows": rows,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
