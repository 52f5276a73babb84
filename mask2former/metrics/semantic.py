"""Semantic segmentation metrics from a confusion matrix: mIoU, fwIoU, pixel and mean accuracy.

Predictions and ground truth are label maps of raw dataset category ids at the image's original
resolution; ``ignore_label`` (255) marks unlabelled ground-truth pixels, which are left out, and
prediction pixels that carry no class (void), which count as misses for the ground-truth class.

Per class: IoU = TP / (TP + FP + FN), nan where the class is in neither the ground truth nor the
prediction (union 0); accuracy = TP / ground-truth pixels, nan where the class is absent from the
ground truth. mIoU and mean accuracy are nan-means over classes; fwIoU weighs each IoU by the
class's share of ground-truth pixels. All values are percentages (0..100), as detectron2 reports.

A class that is predicted but absent from the ground truth therefore counts with IoU 0, as in
torchmetrics' macro Jaccard index and detectron2 before 2021; detectron2's SemSegEvaluator now
leaves such classes out. Over a whole validation set the two agree unless a class is predicted
somewhere but labelled nowhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mask2former.metrics._common import lookup, read_png, to_integer_array


class SemanticEvaluator:
    """Accumulates a confusion matrix over images and reports mIoU-family metrics.

    Args:
        class_ids: raw category ids of the label map, one per class.
        class_names: display names, in the order of ``class_ids`` (keys of ``per_class``).
        ignore_label: the id that marks ignored ground truth and void predictions.
    """

    def __init__(self, class_ids: Sequence[int], class_names: Sequence[str], ignore_label: int = 255):
        class_ids = [int(class_id) for class_id in class_ids]
        class_names = [str(name) for name in class_names]
        if not class_ids:
            raise ValueError("class_ids: expected at least one class id, got an empty list")
        if len(class_ids) != len(class_names):
            raise ValueError(
                f"class_names: expected one name per class id ({len(class_ids)}), got {len(class_names)}"
            )
        _require_unique(class_ids, name="class_ids")
        _require_unique(class_names, name="class_names")
        if min(class_ids) < 0:
            raise ValueError(f"class_ids: expected non-negative ids, got {min(class_ids)}")
        if ignore_label < 0:
            raise ValueError(f"ignore_label: expected a non-negative id, got {ignore_label}")
        if ignore_label in class_ids:
            raise ValueError(f"ignore_label {ignore_label} is also a class id; pick an id outside class_ids")

        self.class_ids = class_ids
        self.class_names = class_names
        self.ignore_label = int(ignore_label)
        self._num_bins = len(class_ids) + 1  # the last bin: ignored ground truth / void prediction
        self._gt_lut, self._pred_lut = self._build_lookups()
        self._confusion = np.zeros((self._num_bins, self._num_bins), dtype=np.int64)

    @classmethod
    def from_label_map(cls, label_map: Sequence[dict], ignore_label: int = 255) -> SemanticEvaluator:
        """Build from a label map: a list of ``{id, name, ...}`` entries."""
        return cls(
            class_ids=[entry["id"] for entry in label_map],
            class_names=[entry["name"] for entry in label_map],
            ignore_label=ignore_label,
        )

    def _build_lookups(self) -> tuple[np.ndarray, np.ndarray]:
        """Lookup tables from raw id to flat confusion-matrix offsets.

        The ground-truth table holds ``row * bins``, the prediction table the column, so one add
        gives the flat bin. Unknown ids map to offsets past the matrix; the table's last entry is
        such a sentinel, and :func:`lookup` sends every id out of the table's range there.
        """
        bins = self._num_bins
        size = max(max(self.class_ids), self.ignore_label) + 2
        gt_lut = np.full(size, bins * bins, dtype=np.intp)
        pred_lut = np.full(size, bins * bins + bins, dtype=np.intp)
        for index, class_id in enumerate(self.class_ids):
            gt_lut[class_id] = index * bins
            pred_lut[class_id] = index
        gt_lut[self.ignore_label] = (bins - 1) * bins
        pred_lut[self.ignore_label] = bins - 1
        return gt_lut, pred_lut

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._confusion[:] = 0

    @property
    def confusion_matrix(self) -> np.ndarray:
        """A copy of the counts: rows ground truth, columns prediction, last row/column ignore/void."""
        return self._confusion.copy()

    def update(self, pred, gt) -> None:
        """Add one image: ``pred`` and ``gt`` are [H, W] integer maps of raw ids (or ``ignore_label``)."""
        pred = to_integer_array(pred, name="pred", ndim=2)
        gt = to_integer_array(gt, name="gt", ndim=2)
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}: resize to the original size")
        bins = self._num_bins
        flat = lookup(self._gt_lut, gt)
        flat += lookup(self._pred_lut, pred)
        counts = np.bincount(flat.ravel(), minlength=bins * bins)
        if counts.size > bins * bins:
            self._raise_unknown_ids(pred=pred, gt=gt)
        self._confusion += counts.reshape(bins, bins)

    def _raise_unknown_ids(self, *, pred: np.ndarray, gt: np.ndarray) -> None:
        allowed = set(self.class_ids) | {self.ignore_label}
        for name, array in (("gt", gt), ("pred", pred)):
            unknown = sorted(set(np.unique(array).tolist()) - allowed)
            if unknown:
                raise ValueError(
                    f"{name} holds ids {unknown[:10]} that are neither class ids of the label map "
                    f"({self.class_ids[:10]}{'...' if len(self.class_ids) > 10 else ''}) "
                    f"nor ignore_label {self.ignore_label}"
                )

    def merge(self, other: SemanticEvaluator) -> None:
        """Add the counts of another evaluator over the same classes (e.g. from another rank)."""
        if other.class_ids != self.class_ids or other.ignore_label != self.ignore_label:
            raise ValueError("merge: the other evaluator has different class_ids or ignore_label")
        self._confusion += other._confusion

    def compute(self) -> dict:
        """Metrics over everything accumulated, in percent; nan where undefined."""
        num_classes = self._num_bins - 1
        confusion = self._confusion[:num_classes].astype(np.float64)  # drop ignored ground truth
        true_pos = np.diagonal(confusion)[:num_classes]
        gt_pixels = confusion.sum(axis=1)  # includes void predictions on the class
        pred_pixels = confusion[:, :num_classes].sum(axis=0)
        union = gt_pixels + pred_pixels - true_pos
        iou = _safe_ratio(true_pos, union)
        acc = _safe_ratio(true_pos, gt_pixels)
        total = gt_pixels.sum()
        iou_present = ~np.isnan(iou)
        return {
            "mIoU": 100.0 * _nan_mean(iou),
            "fwIoU": 100.0 * float((iou[iou_present] * gt_pixels[iou_present]).sum() / total) if total else float("nan"),
            "pixel_accuracy": 100.0 * float(true_pos.sum() / total) if total else float("nan"),
            "mean_accuracy": 100.0 * _nan_mean(acc),
            "per_class": {
                name: {"iou": 100.0 * float(iou[index]), "acc": 100.0 * float(acc[index])}
                for index, name in enumerate(self.class_names)
            },
        }


def evaluate_semantic_files(
    gt_dir_or_pairs: str | Path | Iterable[tuple[str | Path, str | Path]],
    pred_dir: str | Path | None = None,
    *,
    class_ids: Sequence[int],
    class_names: Sequence[str],
    ignore_label: int = 255,
) -> dict:
    """Score semantic PNGs (single channel, raw ids, ``ignore_label`` = ignore/void).

    ``gt_dir_or_pairs`` is either a folder of ground-truth PNGs, each scored against the PNG of
    the same name in ``pred_dir``, or an iterable of ``(gt_png, pred_png)`` path pairs (then
    ``pred_dir`` must be None). Returns :meth:`SemanticEvaluator.compute`'s dict.
    """
    evaluator = SemanticEvaluator(class_ids=class_ids, class_names=class_names, ignore_label=ignore_label)
    for gt_path, pred_path in _semantic_pairs(gt_dir_or_pairs, pred_dir):
        gt = read_png(gt_path)
        pred = read_png(pred_path)
        if gt.ndim != 2 or pred.ndim != 2:
            raise ValueError(
                f"expected single-channel PNGs of raw ids, got shapes {gt.shape} ({gt_path}) and {pred.shape} ({pred_path})"
            )
        if gt.shape != pred.shape:
            raise ValueError(f"{pred_path} is {pred.shape[1]}x{pred.shape[0]}, its ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}")
        evaluator.update(pred=pred, gt=gt)
    return evaluator.compute()


def _semantic_pairs(gt_dir_or_pairs, pred_dir) -> list[tuple[Path, Path]]:
    if isinstance(gt_dir_or_pairs, (str, Path)):
        gt_dir = Path(gt_dir_or_pairs)
        if not gt_dir.is_dir():
            raise NotADirectoryError(f"gt_dir_or_pairs: {gt_dir} is not a folder")
        if pred_dir is None:
            raise ValueError("pred_dir: required when gt_dir_or_pairs is a folder")
        gt_paths = sorted(gt_dir.glob("*.png"))
        if not gt_paths:
            raise FileNotFoundError(f"no .png files in the ground-truth folder {gt_dir}")
        return [(gt_path, Path(pred_dir) / gt_path.name) for gt_path in gt_paths]
    if pred_dir is not None:
        raise ValueError("pred_dir: must be None when gt_dir_or_pairs lists (gt, pred) path pairs")
    pairs = [(Path(gt_path), Path(pred_path)) for gt_path, pred_path in gt_dir_or_pairs]
    if not pairs:
        raise ValueError("gt_dir_or_pairs: got no (gt, pred) pairs")
    return pairs


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, nan where the denominator is 0."""
    out = np.full(numerator.shape, np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _nan_mean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


def _require_unique(values: list, *, name: str) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{name}: {value!r} appears more than once")
        seen.add(value)
