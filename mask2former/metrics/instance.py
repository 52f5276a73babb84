"""Mask AP with faster-coco-eval's COCOeval (iouType "segm", up to 100 detections per image).

faster-coco-eval is COCOeval with its per-image matching and accumulation in C++: the same numbers
as pycocotools (tests/test_metrics_instance.py checks them against pycocotools' own COCOeval), about
three times faster. The evaluator gathers detections per image and hands them to it unchanged. As detectron2 does, a detection's ``bbox`` is not passed on: with a box,
COCOeval would use the box area instead of the mask area for the small/medium/large ranges.
Values are percentages; a value COCOeval cannot define (-1, e.g. APs without small objects) is nan.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_utils

from mask2former.metrics._common import load_json

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six of COCOeval.stats


class InstanceEvaluator:
    """Collects instance detections and scores them against a COCO ground truth.

    Args:
        coco_gt: a COCO instances dict (``images``, ``annotations``, ``categories``) or the path
            of its JSON file. The caller's dict is not modified.
    """

    def __init__(self, coco_gt: dict | str | Path):
        dataset = load_json(coco_gt, name="coco_gt")
        missing = {"images", "annotations", "categories"} - set(dataset)
        if missing:
            raise ValueError(f"coco_gt: a COCO instances dataset needs {sorted(missing)}")
        # COCOeval rewrites polygons to RLE inside the annotations: give it copies.
        dataset = {**dataset, "annotations": [dict(annotation) for annotation in dataset["annotations"]]}
        self._coco_gt = COCO(dataset, print_function=_quiet)
        self._image_sizes = {image["id"]: [image["height"], image["width"]] for image in dataset["images"]}
        self._category_names = {category["id"]: category["name"] for category in dataset["categories"]}
        self._detections: list[dict] = []

    def reset(self) -> None:
        """Forget the detections gathered so far."""
        self._detections = []

    def merge(self, other: InstanceEvaluator) -> None:
        """Append the detections of another evaluator on the same ground truth (e.g. another rank)."""
        if other._image_sizes != self._image_sizes or other._category_names != self._category_names:
            raise ValueError("merge: the other evaluator has a different ground truth")
        self._detections.extend(other._detections)

    def update(self, image_id: int, detections: Sequence[dict]) -> None:
        """Add one image's detections: ``{category_id, segmentation (RLE dict), score[, bbox]}`` each."""
        if image_id not in self._image_sizes:
            raise ValueError(f"image_id {image_id} is not an image of the ground truth ({len(self._image_sizes)} images)")
        expected_size = self._image_sizes[image_id]
        for position, detection in enumerate(detections):
            where = f"image_id {image_id}, detection {position}"
            category_id = detection["category_id"]
            if category_id not in self._category_names:
                raise ValueError(f"{where}: category_id {category_id} is not a ground-truth category")
            segmentation = detection["segmentation"]
            if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
                raise ValueError(f"{where}: segmentation must be an RLE dict with 'size' and 'counts'")
            if list(segmentation["size"]) != expected_size:
                raise ValueError(
                    f"{where}: mask size {list(segmentation['size'])} differs from the image's [height, width] "
                    f"{expected_size}: masks must be at the original resolution"
                )
            self._detections.append(
                {
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation,
                    "score": float(detection["score"]),
                }
            )

    def compute(self) -> dict:
        """AP, AP50, AP75, APs, APm, APl and per-category AP, in percent."""
        lines: list[str] = []
        coco_dt = self._coco_gt.loadRes([dict(detection) for detection in self._detections])
        coco_dt.print_function = _quiet
        coco_eval = COCOeval_faster(self._coco_gt, coco_dt, iouType="segm", print_function=lines.append)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        logger.debug("COCOeval segm:\n%s", "\n".join(str(line) for line in lines))  # the numbers are in the metrics
        results = {key: _percent(value) for key, value in zip(SUMMARY_KEYS, coco_eval.stats)}
        results["per_class"] = _per_category_ap(coco_eval, self._category_names)
        return results


def _quiet(*_args) -> None:
    """faster-coco-eval's progress messages, dropped."""


def _per_category_ap(coco_eval: COCOeval_faster, category_names: dict) -> dict:
    """AP per category from COCOeval's precision table (all areas, 100 detections)."""
    precision = coco_eval.eval["precision"]  # [IoU thresholds, recall points, categories, areas, max dets]
    per_class = {}
    for index, category_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, index, 0, -1]
        values = values[values > -1]
        per_class[category_names[category_id]] = {"AP": 100.0 * float(values.mean()) if values.size else float("nan")}
    return per_class


def _percent(value: float) -> float:
    return 100.0 * float(value) if value >= 0 else float("nan")


def masks_to_rle(masks) -> list[dict]:
    """Encode binary masks [N, H, W] (numpy or torch, bool or 0/1) as COCO RLE dicts with str counts."""
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks_to_rle: expected [N, H, W] masks, got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    masks = masks.view(np.uint8) if masks.dtype == np.bool_ else (masks != 0).astype(np.uint8)
    encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for rle in encoded:
        rle["counts"] = rle["counts"].decode("ascii")
    return encoded


def evaluate_coco_results_file(gt_json: str | Path | dict, results_json: str | Path | list) -> dict:
    """Score a COCO results file (a list of ``{image_id, category_id, segmentation, score}``)."""
    results = load_json(results_json, name="results_json")
    if not isinstance(results, list):
        raise ValueError(f"results_json: expected a list of detections, got {type(results).__name__}")
    by_image = defaultdict(list)
    for detection in results:
        by_image[detection["image_id"]].append(detection)
    evaluator = InstanceEvaluator(gt_json)
    for image_id, detections in by_image.items():
        evaluator.update(image_id=image_id, detections=detections)
    return evaluator.compute()

