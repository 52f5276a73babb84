"""SemanticEvaluator against a per-class reference written from the definitions."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.metrics import SemanticEvaluator, evaluate_semantic_files

CLASS_IDS = [0, 3, 7, 12, 40]  # raw, non-contiguous ids; 40 never occurs in the random data
CLASS_NAMES = ["bg", "road", "car", "tree", "boat"]
IGNORE = 255


def reference_metrics(pairs, class_ids, ignore=IGNORE):
    """Per-class counts by boolean masks, one class at a time, then the textbook formulas."""
    tp = {c: 0 for c in class_ids}
    gt_count = {c: 0 for c in class_ids}
    pred_count = {c: 0 for c in class_ids}
    for pred, gt in pairs:
        valid = gt != ignore
        for c in class_ids:
            tp[c] += int(np.sum((gt == c) & (pred == c)))
            gt_count[c] += int(np.sum(gt == c))
            pred_count[c] += int(np.sum((pred == c) & valid))
    iou, acc = {}, {}
    for c in class_ids:
        union = gt_count[c] + pred_count[c] - tp[c]
        iou[c] = tp[c] / union if union else math.nan
        acc[c] = tp[c] / gt_count[c] if gt_count[c] else math.nan
    present_iou = [v for v in iou.values() if not math.isnan(v)]
    present_acc = [v for v in acc.values() if not math.isnan(v)]
    total = sum(gt_count.values())
    return {
        "mIoU": 100 * sum(present_iou) / len(present_iou),
        "mean_accuracy": 100 * sum(present_acc) / len(present_acc),
        "pixel_accuracy": 100 * sum(tp.values()) / total,
        "fwIoU": 100 * sum(iou[c] * gt_count[c] for c in class_ids if not math.isnan(iou[c])) / total,
        "iou": {c: 100 * v for c, v in iou.items()},
        "acc": {c: 100 * v for c, v in acc.items()},
    }


def random_pairs(seed, count=6, shape=(37, 53)):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        gt = rng.choice([0, 3, 7, 12], size=shape, p=[0.4, 0.3, 0.2, 0.1])
        gt[rng.random(shape) < 0.1] = IGNORE
        pred = gt.copy()
        noise = rng.random(shape) < 0.3
        pred[noise] = rng.choice([0, 3, 7, 12, IGNORE], size=int(noise.sum()))
        pairs.append((pred.astype(np.int64), gt.astype(np.uint8)))
    return pairs


def assert_matches_reference(result, reference):
    for key in ("mIoU", "mean_accuracy", "pixel_accuracy", "fwIoU"):
        assert result[key] == pytest.approx(reference[key], rel=1e-12), key
    for class_id, name in zip(CLASS_IDS, CLASS_NAMES):
        for key in ("iou", "acc"):
            expected = reference[key][class_id]
            got = result["per_class"][name][key]
            assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_images_match_reference(seed):
    pairs = random_pairs(seed)
    evaluator = SemanticEvaluator(CLASS_IDS, CLASS_NAMES, ignore_label=IGNORE)
    for pred, gt in pairs:
        evaluator.update(pred, gt)
    result = evaluator.compute()
    reference = reference_metrics(pairs, CLASS_IDS)
    assert_matches_reference(result, reference)
    # The class absent everywhere is nan and stays out of the means.
    assert math.isnan(result["per_class"]["boat"]["iou"])
    assert math.isnan(result["per_class"]["boat"]["acc"])
    assert 0 < result["mIoU"] < 100


def test_hand_made_image():
    # gt row-major: 3 3 7 | 7 255 12 ; pred: 3 7 7 | 255 3 12
    gt = np.array([[3, 3, 7], [7, 255, 12]])
    pred = np.array([[3, 7, 7], [255, 3, 12]])
    evaluator = SemanticEvaluator(CLASS_IDS, CLASS_NAMES)
    evaluator.update(pred, gt)
    result = evaluator.compute()
    # road: tp 1, gt 2, pred 1 (the pred 3 on the ignored pixel does not count) -> IoU 1/2
    # car: tp 1, gt 2, pred 2 -> IoU 1/3 ; tree: 1/1 ; bg and boat absent -> nan
    assert result["per_class"]["road"] == {"iou": 50.0, "acc": 50.0}
    assert result["per_class"]["car"]["iou"] == pytest.approx(100 / 3)
    assert result["per_class"]["car"]["acc"] == 50.0
    assert result["per_class"]["tree"] == {"iou": 100.0, "acc": 100.0}
    assert math.isnan(result["per_class"]["bg"]["iou"]) and math.isnan(result["per_class"]["boat"]["iou"])
    assert result["mIoU"] == pytest.approx((50 + 100 / 3 + 100) / 3)
    assert result["pixel_accuracy"] == pytest.approx(100 * 3 / 5)  # the void prediction is a miss
    assert result["mean_accuracy"] == pytest.approx((50 + 50 + 100) / 3)
    assert result["fwIoU"] == pytest.approx((50 * 2 + 100 / 3 * 2 + 100 * 1) / 5)


def test_class_only_predicted_counts_as_zero_iou():
    gt = np.full((4, 4), 3)
    pred = gt.copy()
    pred[0, 0] = 7  # car is predicted, never in the ground truth
    evaluator = SemanticEvaluator(CLASS_IDS, CLASS_NAMES)
    evaluator.update(pred, gt)
    result = evaluator.compute()
    assert result["per_class"]["car"]["iou"] == 0.0
    assert math.isnan(result["per_class"]["car"]["acc"])
    assert result["mIoU"] == pytest.approx((100 * 15 / 16 + 0.0) / 2)


def test_all_ignored_gives_nan_not_error():
    evaluator = SemanticEvaluator(CLASS_IDS, CLASS_NAMES)
    evaluator.update(np.zeros((3, 3), np.uint8), np.full((3, 3), IGNORE, np.uint8))
    result = evaluator.compute()
    assert math.isnan(result["mIoU"]) and math.isnan(result["pixel_accuracy"]) and math.isnan(result["fwIoU"])


def test_dtypes_and_torch_tensors_give_identical_counts():
    pairs = random_pairs(7, count=2)
    by_dtype = []
    for convert in (
        lambda a: a.astype(np.uint8),
        lambda a: a.astype(np.int32),
        lambda a: a.astype(np.uint16),
        lambda a: torch.from_numpy(a.astype(np.int64)),
    ):
        evaluator = SemanticEvaluator(CLASS_IDS, CLASS_NAMES)
        for pred, gt in pairs:
            evaluator.update(convert(pred), convert(gt))
        by_dtype.append(evaluator.confusion_matrix)
    for matrix in by_dtype[1:]:
        np.testing.assert_array_equal(matrix, by_dtype[0])


def test_merge_equals_single_pass_and_reset_clears():
    pairs = random_pairs(3)
    whole = SemanticEvaluator(CLASS_IDS, CLASS_NAMES)
    first, second = SemanticEvaluator(CLASS_IDS, CLASS_NAMES), SemanticEvaluator(CLASS_IDS, CLASS_NAMES)
    for index, (pred, gt) in enumerate(pairs):
        whole.update(pred, gt)
        (first if index % 2 else second).update(pred, gt)
    first.merge(second)
    np.testing.assert_array_equal(first.confusion_matrix, whole.confusion_matrix)
    first.reset()
    assert first.confusion_matrix.sum() == 0
    with pytest.raises(ValueError, match="different class_ids"):
        first.merge(SemanticEvaluator([1, 2], ["a", "b"]))


def test_matches_torchmetrics_jaccard():
    torchmetrics = pytest.importorskip("torchmetrics")
    pairs = random_pairs(11)
    evaluator = SemanticEvaluator(CLASS_IDS, CLASS_NAMES)
    lookup = np.full(256, IGNORE, np.int64)
    lookup[CLASS_IDS] = np.arange(len(CLASS_IDS))
    metric = torchmetrics.classification.MulticlassJaccardIndex(
        num_classes=len(CLASS_IDS), ignore_index=IGNORE, average="macro"
    )
    for pred, gt in pairs:
        pred = np.where(pred == IGNORE, 0, pred)  # torchmetrics has no void prediction
        evaluator.update(pred, gt)
        metric.update(torch.from_numpy(lookup[pred]), torch.from_numpy(lookup[gt]))
    assert evaluator.compute()["mIoU"] == pytest.approx(100 * metric.compute().item(), rel=1e-5)


@pytest.mark.parametrize(
    ("pred", "gt", "error", "match"),
    [
        (np.zeros((2, 2), int), np.array([[0, 5], [0, 0]]), ValueError, r"gt holds ids \[5\]"),
        (np.array([[0, 999], [0, 0]]), np.zeros((2, 2), int), ValueError, r"pred holds ids \[999\]"),
        (np.array([[0, -3], [0, 0]]), np.zeros((2, 2), int), ValueError, r"pred holds ids \[-3\]"),
        (np.zeros((2, 3), int), np.zeros((2, 2), int), ValueError, "differs from gt shape"),
        (np.zeros((2, 2), float), np.zeros((2, 2), int), TypeError, "pred: expected an integer array"),
        (np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int), ValueError, "expected 2 dimensions"),
    ],
)
def test_bad_inputs_are_refused_and_leave_counts_untouched(pred, gt, error, match):
    evaluator = SemanticEvaluator(CLASS_IDS, CLASS_NAMES)
    with pytest.raises(error, match=match):
        evaluator.update(pred, gt)
    assert evaluator.confusion_matrix.sum() == 0


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="one name per class id"):
        SemanticEvaluator([1, 2], ["a"])
    with pytest.raises(ValueError, match="appears more than once"):
        SemanticEvaluator([1, 1], ["a", "b"])
    with pytest.raises(ValueError, match="ignore_label 255 is also a class id"):
        SemanticEvaluator([1, 255], ["a", "b"])


def test_from_label_map():
    label_map = [{"id": 3, "name": "road", "color": [1, 2, 3], "isthing": 0}, {"id": 7, "name": "car", "color": [0, 0, 0], "isthing": 1}]
    evaluator = SemanticEvaluator.from_label_map(label_map)
    assert evaluator.class_ids == [3, 7] and evaluator.class_names == ["road", "car"]


def _write_png(path, array, mode):
    image = Image.fromarray(array.astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putdata(array.astype(np.uint8).ravel().tolist())
    image.save(path)


def test_png_folders_and_pairs(tmp_path):
    pairs = random_pairs(5, count=3)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for index, (pred, gt) in enumerate(pairs):
        _write_png(gt_dir / f"{index:03d}.png", gt, mode="L")
        _write_png(pred_dir / f"{index:03d}.png", pred, mode="P" if index == 1 else "L")
    expected = reference_metrics(pairs, CLASS_IDS)

    from_folders = evaluate_semantic_files(gt_dir, pred_dir, class_ids=CLASS_IDS, class_names=CLASS_NAMES)
    assert_matches_reference(from_folders, expected)

    listed = [(gt_dir / f"{i:03d}.png", pred_dir / f"{i:03d}.png") for i in range(3)]
    from_pairs = evaluate_semantic_files(listed, class_ids=CLASS_IDS, class_names=CLASS_NAMES)
    assert_matches_reference(from_pairs, expected)

    (pred_dir / "001.png").unlink()
    with pytest.raises(FileNotFoundError, match="001.png"):
        evaluate_semantic_files(gt_dir, pred_dir, class_ids=CLASS_IDS, class_names=CLASS_NAMES)
    with pytest.raises(ValueError, match="pred_dir: must be None"):
        evaluate_semantic_files(listed, pred_dir, class_ids=CLASS_IDS, class_names=CLASS_NAMES)


def test_png_of_wrong_size_is_refused(tmp_path):
    _write_png(tmp_path / "gt.png", np.zeros((4, 5)), mode="L")
    _write_png(tmp_path / "pred.png", np.zeros((5, 4)), mode="L")
    with pytest.raises(ValueError, match="pred.png is 4x5"):
        evaluate_semantic_files(
            [(tmp_path / "gt.png", tmp_path / "pred.png")], class_ids=CLASS_IDS, class_names=CLASS_NAMES
        )
