"""Panoptic quality (PQ = SQ x RQ) with COCO panopticapi semantics, vectorised per image.

Per image, a predicted and a ground-truth segment of the same category match when their IoU is
above 0.5, where the union leaves out the predicted pixels that fall on ground-truth void (id 0).
Crowd ground truth never matches and never counts as a false negative. An unmatched prediction
is ignored (not a false positive) when more than half of it lies on void or on crowd regions of
its own category. Per category: PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP,
RQ = TP / (TP + FP/2 + FN/2); the reported values average the categories that occur (TP + FP +
FN > 0) over all, thing and stuff categories, in percent.

Three deliberate differences from panopticapi, none of which changes a COCO result: segment
areas come from the pixels (panopticapi reads the ground-truth area from the JSON), a predicted
segment listed without pixels is skipped (panopticapi raises), and the crowd area of a category
is the sum over all its crowd segments (panopticapi keeps the last one; COCO has one at most).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mask2former.metrics._common import as_unsigned, load_json, read_png, to_integer_array

VOID_ID = 0
_ID_LIMIT = 1 << 32  # segment ids must fit 32 bits so (gt, pred) pairs fit one uint64 key


class PanopticEvaluator:
    """Accumulates per-category TP/FP/FN and matched IoU over images.

    Args:
        categories: ``{id, name, isthing}`` entries (a label map's entries work as they are).
    """

    def __init__(self, categories: Sequence[dict]):
        if not categories:
            raise ValueError("categories: expected at least one {id, name, isthing} entry, got none")
        for entry in categories:
            missing = {"id", "name", "isthing"} - set(entry)
            if missing:
                raise ValueError(f"categories: entry {entry} lacks {sorted(missing)}")
        self.category_ids = [int(entry["id"]) for entry in categories]
        self.category_names = [str(entry["name"]) for entry in categories]
        for name, values in (("id", self.category_ids), ("name", self.category_names)):
            if len(set(values)) != len(values):
                raise ValueError(f"categories: every {name} must be unique, got {values}")
        self.isthing = np.array([bool(entry["isthing"]) for entry in categories])
        self._category_index = {category_id: index for index, category_id in enumerate(self.category_ids)}
        num = len(self.category_ids)
        self._tp = np.zeros(num, dtype=np.int64)
        self._fp = np.zeros(num, dtype=np.int64)
        self._fn = np.zeros(num, dtype=np.int64)
        self._iou = np.zeros(num, dtype=np.float64)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        for array in (self._tp, self._fp, self._fn, self._iou):
            array[:] = 0

    def merge(self, other: PanopticEvaluator) -> None:
        """Add the counts of another evaluator over the same categories (e.g. from another rank)."""
        if other.category_ids != self.category_ids:
            raise ValueError("merge: the other evaluator has different categories")
        self._tp += other._tp
        self._fp += other._fp
        self._fn += other._fn
        self._iou += other._iou

    def update(self, pred_seg, pred_segments: Sequence[dict], gt_seg, gt_segments: Sequence[dict]) -> None:
        """Add one image.

        Args:
            pred_seg: [H, W] integer segment ids of the prediction, 0 = void.
            pred_segments: ``{id, category_id}`` for every predicted segment id in ``pred_seg``.
            gt_seg: [H, W] integer segment ids of the ground truth, 0 = void.
            gt_segments: ``{id, category_id, iscrowd}`` for every ground-truth segment.
        """
        pred_seg = to_integer_array(pred_seg, name="pred_seg", ndim=2)
        gt_seg = to_integer_array(gt_seg, name="gt_seg", ndim=2)
        if pred_seg.shape != gt_seg.shape:
            raise ValueError(f"pred_seg shape {pred_seg.shape} differs from gt_seg shape {gt_seg.shape}")
        pred_ids, pred_cats, _ = self._segment_table(pred_segments, name="pred_segments", with_crowd=False)
        gt_ids, gt_cats, gt_crowd = self._segment_table(gt_segments, name="gt_segments", with_crowd=True)

        pair_gt, pair_pred, pair_pixels = _pair_counts(gt_seg=gt_seg, pred_seg=pred_seg)
        gt_index = _lookup(ids=gt_ids, queries=pair_gt, name="gt_seg", listed_in="gt_segments")
        pred_index = _lookup(ids=pred_ids, queries=pair_pred, name="pred_seg", listed_in="pred_segments")
        on_gt = gt_index >= 0
        on_pred = pred_index >= 0
        gt_area = np.bincount(gt_index[on_gt], weights=pair_pixels[on_gt], minlength=gt_ids.size)
        pred_area = np.bincount(pred_index[on_pred], weights=pair_pixels[on_pred], minlength=pred_ids.size)
        on_void = on_pred & (pair_gt == VOID_ID)
        pred_on_void = np.bincount(pred_index[on_void], weights=pair_pixels[on_void], minlength=pred_ids.size)

        both = on_gt & on_pred
        same_category = np.zeros(both.shape, dtype=bool)
        same_category[both] = gt_cats[gt_index[both]] == pred_cats[pred_index[both]]
        crowd_pair = np.zeros(both.shape, dtype=bool)
        crowd_pair[both] = gt_crowd[gt_index[both]]

        # True positives: IoU > 0.5 is unique per segment, segments of one image never overlap.
        candidate = same_category & ~crowd_pair
        cand_gt = gt_index[candidate]
        cand_pred = pred_index[candidate]
        intersection = pair_pixels[candidate]
        union = pred_area[cand_pred] + gt_area[cand_gt] - intersection - pred_on_void[cand_pred]
        iou = intersection / union
        match = iou > 0.5
        gt_matched = np.zeros(gt_ids.size, dtype=bool)
        gt_matched[cand_gt[match]] = True
        pred_matched = np.zeros(pred_ids.size, dtype=bool)
        pred_matched[cand_pred[match]] = True
        num_categories = len(self.category_ids)
        self._tp += np.bincount(gt_cats[cand_gt[match]], minlength=num_categories)
        self._iou += np.bincount(gt_cats[cand_gt[match]], weights=iou[match], minlength=num_categories)

        # False negatives: unmatched, non-crowd ground truth.
        missed = ~gt_matched & ~gt_crowd
        self._fn += np.bincount(gt_cats[missed], minlength=num_categories)

        # False positives: unmatched predictions with pixels, unless mostly on void or same-category crowd.
        same_crowd = same_category & crowd_pair
        pred_on_crowd = np.bincount(pred_index[same_crowd], weights=pair_pixels[same_crowd], minlength=pred_ids.size)
        ignored = (pred_on_void + pred_on_crowd) > 0.5 * pred_area
        false_pos = ~pred_matched & (pred_area > 0) & ~ignored
        self._fp += np.bincount(pred_cats[false_pos], minlength=num_categories)

    def _segment_table(self, segments: Sequence[dict], *, name: str, with_crowd: bool):
        """Segment ids, category indices and crowd flags as arrays, validated."""
        ids = np.empty(len(segments), dtype=np.int64)
        cats = np.empty(len(segments), dtype=np.intp)
        crowd = np.zeros(len(segments), dtype=bool)
        for position, segment in enumerate(segments):
            segment_id = int(segment["id"])
            if not 0 < segment_id < _ID_LIMIT:
                raise ValueError(f"{name}: segment id {segment_id} must be in 1..{_ID_LIMIT - 1} (0 is void)")
            category_id = int(segment["category_id"])
            if category_id not in self._category_index:
                raise ValueError(
                    f"{name}: segment {segment_id} has category_id {category_id}, "
                    f"not one of the evaluator's categories {self.category_ids[:20]}"
                )
            ids[position] = segment_id
            cats[position] = self._category_index[category_id]
            if with_crowd:
                crowd[position] = bool(segment.get("iscrowd", 0))
        if np.unique(ids).size != ids.size:
            raise ValueError(f"{name}: segment ids must be unique, got {ids.tolist()}")
        return ids, cats, crowd

    def compute(self) -> dict:
        """PQ/SQ/RQ over all, thing and stuff categories plus per-category values, in percent."""
        present = (self._tp + self._fp + self._fn) > 0
        denominator = self._tp + 0.5 * self._fp + 0.5 * self._fn
        pq = np.full(present.shape, np.nan)
        sq = np.full(present.shape, np.nan)
        rq = np.full(present.shape, np.nan)
        pq[present] = self._iou[present] / denominator[present]
        rq[present] = self._tp[present] / denominator[present]
        sq[present] = np.where(self._tp[present] > 0, self._iou[present] / np.maximum(self._tp[present], 1), 0.0)

        results = {}
        for suffix, selected in (("", np.ones_like(present)), ("_th", self.isthing), ("_st", ~self.isthing)):
            chosen = present & selected
            for key, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                results[key + suffix] = 100.0 * float(values[chosen].mean()) if chosen.any() else float("nan")
        results["per_class"] = {
            name: {
                "PQ": 100.0 * float(pq[index]),
                "SQ": 100.0 * float(sq[index]),
                "RQ": 100.0 * float(rq[index]),
                "TP": int(self._tp[index]),
                "FP": int(self._fp[index]),
                "FN": int(self._fn[index]),
                "isthing": bool(self.isthing[index]),
            }
            for index, name in enumerate(self.category_names)
        }
        return results


def _pair_counts(*, gt_seg: np.ndarray, pred_seg: np.ndarray):
    """(gt id, pred id, pixel count) for every co-occurring pair, from one np.unique over the image."""
    gt_flat = as_unsigned(gt_seg).ravel()
    pred_flat = as_unsigned(pred_seg).ravel()
    gt_max = int(gt_flat.max()) if gt_flat.size else 0
    pred_max = int(pred_flat.max()) if pred_flat.size else 0
    if gt_max >= _ID_LIMIT or pred_max >= _ID_LIMIT:
        raise ValueError(f"segment ids must be in 0..{_ID_LIMIT - 1}; got gt max {gt_max}, pred max {pred_max} (negative ids wrap around)")
    offset = pred_max + 1
    key_dtype = np.uint32 if (gt_max + 1) * offset <= 1 << 32 else np.uint64  # a narrower key sorts faster
    keys = gt_flat.astype(key_dtype) * key_dtype(offset) + pred_flat.astype(key_dtype)
    unique_keys, counts = np.unique(keys, return_counts=True)
    unique_keys = unique_keys.astype(np.int64)
    return unique_keys // offset, unique_keys % offset, counts.astype(np.float64)


def _lookup(*, ids: np.ndarray, queries: np.ndarray, name: str, listed_in: str) -> np.ndarray:
    """Position of each query id in ``ids``; -1 for void. Ids neither void nor listed raise."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    slot = np.searchsorted(sorted_ids, queries)
    slot_clipped = np.minimum(slot, max(ids.size - 1, 0))
    found = (slot < ids.size) & (sorted_ids[slot_clipped] == queries) if ids.size else np.zeros(queries.shape, dtype=bool)
    unknown = ~found & (queries != VOID_ID)
    if unknown.any():
        raise ValueError(f"{name} holds segment ids {queries[unknown][:10].tolist()} that {listed_in} does not list")
    return np.where(found, order[slot_clipped] if ids.size else -1, -1)


def rgb_to_id(rgb) -> np.ndarray:
    """Decode a COCO-panoptic PNG array [H, W, 3] (uint8) to segment ids: R + 256*G + 256^2*B."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"rgb_to_id: expected an [H, W, 3] array, got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.uint32)
    return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)


def id_to_rgb(ids) -> np.ndarray:
    """Encode segment ids [H, W] (0..2^24-1) as a COCO-panoptic RGB array [H, W, 3] of uint8."""
    ids = to_integer_array(ids, name="ids", ndim=2).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise ValueError(f"id_to_rgb: ids must be in 0..{(1 << 24) - 1}, got {ids.min()}..{ids.max()}")
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """Read a COCO-panoptic PNG as [H, W] segment ids."""
    return rgb_to_id(read_png(path))


def evaluate_panoptic_files(
    gt_json: str | Path | dict,
    gt_dir: str | Path,
    pred_json: str | Path | dict,
    pred_dir: str | Path,
    *,
    categories: Sequence[dict] | None = None,
) -> dict:
    """Score a COCO-panoptic prediction (JSON + PNG folder) against the ground truth.

    Every ground-truth image must have a prediction (matched by ``image_id``); predictions for
    other images are not scored. ``categories`` defaults to the ground-truth JSON's categories.
    Returns :meth:`PanopticEvaluator.compute`'s dict.
    """
    gt = load_json(gt_json, name="gt_json")
    pred = load_json(pred_json, name="pred_json")
    pred_annotations = pred["annotations"] if isinstance(pred, dict) else pred
    pred_by_image = {annotation["image_id"]: annotation for annotation in pred_annotations}
    evaluator = PanopticEvaluator(categories if categories is not None else gt["categories"])
    for gt_annotation in gt["annotations"]:
        image_id = gt_annotation["image_id"]
        if image_id not in pred_by_image:
            raise ValueError(f"pred_json has no annotation for image_id {image_id} ({gt_annotation['file_name']})")
        pred_annotation = pred_by_image[image_id]
        evaluator.update(
            pred_seg=read_panoptic_png(Path(pred_dir) / pred_annotation["file_name"]),
            pred_segments=pred_annotation["segments_info"],
            gt_seg=read_panoptic_png(Path(gt_dir) / gt_annotation["file_name"]),
            gt_segments=gt_annotation["segments_info"],
        )
    return evaluator.compute()

