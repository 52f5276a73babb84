"""PanopticEvaluator against a loop-based PQ written straight from the definition."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from mask2former.metrics import PanopticEvaluator, evaluate_panoptic_files, id_to_rgb, read_panoptic_png, rgb_to_id

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 5, "name": "dog", "isthing": 1},
    {"id": 17, "name": "sky", "isthing": 0},
    {"id": 21, "name": "grass", "isthing": 0},
]
THINGS = [1, 2, 5]
STUFF = [17, 21]


def reference_pq(images, categories):
    """PQ from the definition, one (gt segment, pred segment) pair at a time with boolean masks."""
    stats = {c["id"]: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0} for c in categories}
    for pred_seg, pred_segments, gt_seg, gt_segments in images:
        void = gt_seg == 0
        matched_gt, matched_pred = set(), set()
        for gt in gt_segments:
            if gt.get("iscrowd", 0):
                continue
            gt_mask = gt_seg == gt["id"]
            for pred in pred_segments:
                if pred["category_id"] != gt["category_id"]:
                    continue
                pred_mask = pred_seg == pred["id"]
                intersection = np.sum(gt_mask & pred_mask)
                union = np.sum(gt_mask | pred_mask) - np.sum(pred_mask & void)
                if union and intersection / union > 0.5:
                    stats[gt["category_id"]]["tp"] += 1
                    stats[gt["category_id"]]["iou"] += intersection / union
                    matched_gt.add(gt["id"])
                    matched_pred.add(pred["id"])
        for gt in gt_segments:
            if gt["id"] not in matched_gt and not gt.get("iscrowd", 0):
                stats[gt["category_id"]]["fn"] += 1
        for pred in pred_segments:
            pred_mask = pred_seg == pred["id"]
            if pred["id"] in matched_pred or not pred_mask.any():
                continue
            crowd = np.zeros_like(void)
            for gt in gt_segments:
                if gt.get("iscrowd", 0) and gt["category_id"] == pred["category_id"]:
                    crowd |= gt_seg == gt["id"]
            if np.sum(pred_mask & (void | crowd)) > 0.5 * np.sum(pred_mask):
                continue
            stats[pred["category_id"]]["fp"] += 1

    def average(ids):
        values = []
        for c in ids:
            s = stats[c]
            if s["tp"] + s["fp"] + s["fn"] == 0:
                continue
            denominator = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
            values.append((s["iou"] / denominator, s["iou"] / s["tp"] if s["tp"] else 0.0, s["tp"] / denominator))
        if not values:
            return (math.nan,) * 3
        return tuple(100 * sum(v[i] for v in values) / len(values) for i in range(3))

    result = {}
    for suffix, ids in (("", [c["id"] for c in categories]), ("_th", [c["id"] for c in categories if c["isthing"]]), ("_st", [c["id"] for c in categories if not c["isthing"]])):
        result["PQ" + suffix], result["SQ" + suffix], result["RQ" + suffix] = average(ids)
    return result, stats


def assert_close(result, reference):
    for key, expected in reference.items():
        got = result[key]
        assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected, rel=1e-12, abs=1e-12), key


def random_image(rng, shape=(48, 64)):
    """Random rectangles: stuff backdrop, thing instances, a crowd now and then, void holes."""
    gt_seg = np.zeros(shape, np.int64)
    gt_segments = []
    next_id = rng.integers(1, 1000)
    for category in STUFF:
        top = rng.integers(0, shape[0] // 2)
        gt_seg[top : top + shape[0] // 2 + 4, :] = next_id
        gt_segments.append({"id": int(next_id), "category_id": category, "iscrowd": 0})
        next_id += rng.integers(1, 50)
    for _ in range(rng.integers(2, 7)):
        y, x = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        h, w = rng.integers(4, 20), rng.integers(4, 24)
        gt_seg[y : y + h, x : x + w] = next_id
        gt_segments.append({"id": int(next_id), "category_id": int(rng.choice(THINGS)), "iscrowd": int(rng.random() < 0.2)})
        next_id += rng.integers(1, 50)
    y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
    gt_seg[y : y + rng.integers(2, 10), x : x + rng.integers(2, 12)] = 0
    present = set(np.unique(gt_seg).tolist())
    gt_segments = [s for s in gt_segments if s["id"] in present]

    # Prediction: the ground truth shifted, relabelled now and then, plus spurious boxes.
    pred_seg = np.roll(gt_seg, shift=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1)).copy()
    new_ids = {s["id"]: int(rng.integers(1, 1 << 20)) for s in gt_segments}
    pred_segments = []
    out = np.zeros_like(pred_seg)
    for segment in gt_segments:
        if rng.random() < 0.1:
            continue  # missed segment -> void
        out[pred_seg == segment["id"]] = new_ids[segment["id"]]
        category = segment["category_id"] if rng.random() > 0.15 else int(rng.choice(THINGS + STUFF))
        pred_segments.append({"id": new_ids[segment["id"]], "category_id": category})
    for _ in range(rng.integers(0, 3)):
        y, x = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        spurious = int(rng.integers(1 << 20, 1 << 21))
        out[y : y + rng.integers(3, 15), x : x + rng.integers(3, 15)] = spurious
        pred_segments.append({"id": spurious, "category_id": int(rng.choice(THINGS + STUFF))})
    present = set(np.unique(out).tolist())
    pred_segments = [s for s in pred_segments if s["id"] in present]
    return out, pred_segments, gt_seg, gt_segments


@pytest.mark.parametrize("seed", range(4))
def test_random_images_match_reference(seed):
    rng = np.random.default_rng(seed)
    images = [random_image(rng) for _ in range(12)]
    evaluator = PanopticEvaluator(CATEGORIES)
    for pred_seg, pred_segments, gt_seg, gt_segments in images:
        evaluator.update(pred_seg, pred_segments, gt_seg, gt_segments)
    result = evaluator.compute()
    reference, stats = reference_pq(images, CATEGORIES)
    assert_close(result, reference)
    for category in CATEGORIES:
        per_class = result["per_class"][category["name"]]
        expected = stats[category["id"]]
        assert (per_class["TP"], per_class["FP"], per_class["FN"]) == (expected["tp"], expected["fp"], expected["fn"])
    assert 0 < result["PQ"] < 100


def _segments(*triples):
    return [{"id": i, "category_id": c, "iscrowd": crowd} for i, c, crowd in triples]


def test_perfect_prediction_scores_100_and_absent_categories_are_nan():
    gt = np.zeros((8, 8), np.int64)
    gt[:4] = 10  # sky
    gt[4:, :4] = 11  # person
    gt[4:, 4:] = 12  # car
    pred = gt * 3  # other ids, same pixels
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(
        pred, [{"id": 30, "category_id": 17}, {"id": 33, "category_id": 1}, {"id": 36, "category_id": 2}],
        gt, _segments((10, 17, 0), (11, 1, 0), (12, 2, 0)),
    )
    result = evaluator.compute()
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert result[key] == 100.0
    assert math.isnan(result["per_class"]["dog"]["PQ"]) and math.isnan(result["per_class"]["grass"]["PQ"])


def test_void_is_left_out_of_the_union():
    gt = np.zeros((4, 10), np.int64)
    gt[:, :5] = 1  # person: 20 pixels; right half void
    pred = np.full((4, 10), 7)  # one person segment over everything: 20 on the person, 20 on void
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(pred, [{"id": 7, "category_id": 1}], gt, _segments((1, 1, 0)))
    result = evaluator.compute()
    assert result["per_class"]["person"]["TP"] == 1
    assert result["PQ"] == 100.0  # IoU 20 / (40 + 20 - 20 - 20)


def test_iou_of_exactly_one_half_does_not_match():
    gt = np.zeros((2, 4), np.int64)
    gt[:, :2] = 1  # 4 px person
    gt[:, 2:] = 2  # 4 px sky
    pred = np.zeros((2, 4), np.int64)
    pred[:, :] = 9  # person over 8 px: IoU with gt person 4 / 8 = 0.5
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(pred, [{"id": 9, "category_id": 1}], gt, _segments((1, 1, 0), (2, 17, 0)))
    counts = evaluator.compute()["per_class"]
    assert (counts["person"]["TP"], counts["person"]["FP"], counts["person"]["FN"]) == (0, 1, 1)
    assert counts["sky"]["FN"] == 1


def test_prediction_mostly_on_void_is_ignored_but_half_is_not():
    gt = np.zeros((4, 12), np.int64)
    gt[:, :6] = 1  # sky on the left, void on the right
    pred = np.zeros((4, 12), np.int64)
    pred[:, :6] = 2  # matches the sky
    pred[:, 6:12] = 3  # a car: 24 px, all on void -> ignored
    evaluator = PanopticEvaluator(CATEGORIES)
    segments = [{"id": 2, "category_id": 17}, {"id": 3, "category_id": 2}]
    evaluator.update(pred, segments, gt, _segments((1, 17, 0)))
    assert evaluator.compute()["per_class"]["car"]["FP"] == 0

    # Half on void, half on sky: not more than half -> a false positive.
    pred2 = np.zeros((4, 12), np.int64)
    pred2[:, :3] = 2
    pred2[:, 3:9] = 3  # 24 px car: 12 on the sky (columns 3..5), 12 on void (columns 6..8)
    evaluator2 = PanopticEvaluator(CATEGORIES)
    evaluator2.update(pred2, segments, gt, _segments((1, 17, 0)))
    counts = evaluator2.compute()["per_class"]
    assert counts["car"]["FP"] == 1
    sky = counts["sky"]
    assert (sky["TP"], sky["FP"], sky["FN"]) == (0, 1, 1)  # sky pred 12 px of 24: IoU 0.5, no match


def test_crowd_regions_ignore_same_category_predictions_and_never_count_as_missed():
    gt = np.zeros((4, 12), np.int64)
    gt[:, :4] = 1  # person crowd
    gt[:, 4:8] = 2  # car crowd
    gt[:, 8:] = 3  # grass
    pred = np.zeros((4, 12), np.int64)
    pred[:, :4] = 5  # person on the person crowd -> ignored
    pred[:, 4:8] = 6  # person on the car crowd -> false positive
    pred[:, 8:] = 7  # grass -> true positive
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(
        pred,
        [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 1}, {"id": 7, "category_id": 21}],
        gt,
        _segments((1, 1, 1), (2, 2, 1), (3, 21, 0)),
    )
    result = evaluator.compute()
    person, car, grass = (result["per_class"][n] for n in ("person", "car", "grass"))
    assert (person["TP"], person["FP"], person["FN"]) == (0, 1, 0)
    assert (car["TP"], car["FP"], car["FN"]) == (0, 0, 0)  # crowd: no false negative
    assert (grass["TP"], grass["FP"], grass["FN"]) == (1, 0, 0)
    assert result["PQ_st"] == 100.0 and result["PQ_th"] == 0.0
    assert result["PQ"] == pytest.approx(50.0)
    assert math.isnan(result["per_class"]["car"]["PQ"])


def test_things_and_stuff_are_averaged_separately():
    gt = np.zeros((4, 8), np.int64)
    gt[:2] = 1  # sky 16 px
    gt[2:, :4] = 2  # person 8 px
    gt[2:, 4:] = 3  # dog 8 px
    pred = np.zeros((4, 8), np.int64)
    pred[:2, :6] = 10  # sky 12 of 16 -> IoU 0.75
    pred[2:, :4] = 11  # person exact
    pred[2:, 4:] = 12  # labelled car: dog FN, car FP
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(
        pred,
        [{"id": 10, "category_id": 17}, {"id": 11, "category_id": 1}, {"id": 12, "category_id": 2}],
        gt,
        _segments((1, 17, 0), (2, 1, 0), (3, 5, 0)),
    )
    result = evaluator.compute()
    assert result["PQ_st"] == pytest.approx(75.0)
    # things: person PQ 1, car PQ 0 (FP), dog PQ 0 (FN) -> 1/3
    assert result["PQ_th"] == pytest.approx(100 / 3)
    assert result["RQ_th"] == pytest.approx(100 / 3)
    assert result["SQ_th"] == pytest.approx(100 / 3)  # SQ of a category without TP is 0
    assert result["PQ"] == pytest.approx((75 + 100) / 4)


def test_empty_predicted_segment_is_skipped():
    gt = np.full((2, 2), 1, np.int64)
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(np.full((2, 2), 4), [{"id": 4, "category_id": 17}, {"id": 8, "category_id": 2}], gt, _segments((1, 17, 0)))
    assert evaluator.compute()["per_class"]["car"]["FP"] == 0


def test_merge_equals_single_pass():
    rng = np.random.default_rng(9)
    images = [random_image(rng) for _ in range(6)]
    whole, left, right = (PanopticEvaluator(CATEGORIES) for _ in range(3))
    for index, image in enumerate(images):
        whole.update(*image)
        (left if index < 3 else right).update(*image)
    left.merge(right)
    assert left.compute()["per_class"] == whole.compute()["per_class"]
    left.reset()
    assert math.isnan(left.compute()["PQ"])


@pytest.mark.parametrize(
    ("pred_segments", "gt_segments", "match"),
    [
        ([], _segments((1, 17, 0)), r"pred_seg holds segment ids \[4\] that pred_segments does not list"),
        ([{"id": 4, "category_id": 99}], _segments((1, 17, 0)), "category_id 99, not one of"),
        ([{"id": 4, "category_id": 1}, {"id": 4, "category_id": 2}], _segments((1, 17, 0)), "must be unique"),
        ([{"id": 4, "category_id": 1}], [], r"gt_seg holds segment ids \[1\]"),
        ([{"id": 0, "category_id": 1}], _segments((1, 17, 0)), "0 is void"),
    ],
)
def test_inconsistent_inputs_are_refused(pred_segments, gt_segments, match):
    evaluator = PanopticEvaluator(CATEGORIES)
    pred = np.full((2, 2), 4)
    with pytest.raises(ValueError, match=match):
        evaluator.update(pred, pred_segments, np.full((2, 2), 1), gt_segments)
    assert evaluator.compute()["per_class"]["sky"]["FN"] == 0


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536, (1 << 24) - 1]])
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[1, 1].tolist() == [0, 0, 1]
    np.testing.assert_array_equal(rgb_to_id(rgb), ids)
    with pytest.raises(ValueError, match="ids must be in"):
        id_to_rgb(np.array([[1 << 24]]))


def test_coco_panoptic_files_match_in_memory(tmp_path):
    rng = np.random.default_rng(21)
    images = [random_image(rng) for _ in range(4)]
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt_json = {"images": [], "annotations": [], "categories": CATEGORIES}
    pred_json = {"annotations": []}
    for image_id, (pred_seg, pred_segments, gt_seg, gt_segments) in enumerate(images):
        name = f"{image_id:012d}.png"
        Image.fromarray(id_to_rgb(gt_seg)).save(gt_dir / name)
        Image.fromarray(id_to_rgb(pred_seg)).save(pred_dir / name)
        gt_json["images"].append({"id": image_id, "file_name": name.replace(".png", ".jpg"), "height": 48, "width": 64})
        gt_json["annotations"].append({"image_id": image_id, "file_name": name, "segments_info": gt_segments})
        pred_json["annotations"].append({"image_id": image_id, "file_name": name, "segments_info": pred_segments})
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))

    np.testing.assert_array_equal(read_panoptic_png(gt_dir / "000000000000.png"), images[0][2])
    from_files = evaluate_panoptic_files(tmp_path / "gt.json", gt_dir, tmp_path / "pred.json", pred_dir)
    reference, _ = reference_pq(images, CATEGORIES)
    assert_close(from_files, reference)

    pred_json["annotations"].pop()
    with pytest.raises(ValueError, match="no annotation for image_id 3"):
        evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir)
