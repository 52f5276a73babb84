"""InstanceEvaluator (faster-coco-eval) against pycocotools' COCOeval, the reference, run directly on the same detections."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mask2former.metrics import InstanceEvaluator, evaluate_coco_results_file, masks_to_rle

HEIGHT, WIDTH = 40, 60


def box_mask(y0, x0, y1, x1, shape=(HEIGHT, WIDTH)):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def rle_of(mask):
    return masks_to_rle(mask[None])[0]


def ground_truth():
    """Two images; polygons, a compressed RLE, an uncompressed RLE and a crowd; 'bird' never occurs."""
    crowd_rle = mask_utils.encode(np.asfortranarray(box_mask(0, 40, 20, 60).astype(np.uint8)))
    crowd_rle["counts"] = crowd_rle["counts"].decode("ascii")
    uncompressed = {"size": [HEIGHT, WIDTH], "counts": [HEIGHT * 5, HEIGHT * 10, HEIGHT * 45]}  # columns 5..14
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]], "area": 324.0, "bbox": [2, 2, 18, 18]},
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": rle_of(box_mask(25, 5, 38, 30)), "area": 325.0, "bbox": [5, 25, 25, 13]},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": crowd_rle, "area": 400.0, "bbox": [40, 0, 20, 20]},
        {"id": 4, "image_id": 2, "category_id": 2, "iscrowd": 0, "segmentation": uncompressed, "area": 400.0, "bbox": [5, 0, 10, 40]},
        {"id": 5, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": [[30, 5, 36, 5, 36, 9, 30, 9]], "area": 24.0, "bbox": [30, 5, 6, 4]},
        {"id": 6, "image_id": 2, "category_id": 2, "iscrowd": 0, "segmentation": rle_of(box_mask(10, 40, 39, 59)), "area": 551.0, "bbox": [40, 10, 19, 29]},
    ]
    return {
        "images": [{"id": 1, "height": HEIGHT, "width": WIDTH, "file_name": "a.jpg"}, {"id": 2, "height": HEIGHT, "width": WIDTH, "file_name": "b.jpg"}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}, {"id": 3, "name": "bird"}],
    }


def detections():
    """Per image: good, sloppy, duplicate, crowd-covering and wrong-class detections."""
    return {
        1: [
            {"category_id": 1, "segmentation": rle_of(box_mask(2, 2, 20, 21)), "score": 0.9},
            {"category_id": 1, "segmentation": rle_of(box_mask(0, 0, 12, 12)), "score": 0.6},
            {"category_id": 1, "segmentation": rle_of(box_mask(0, 42, 18, 60)), "score": 0.7},  # on the crowd
            {"category_id": 2, "segmentation": rle_of(box_mask(24, 8, 38, 30)), "score": 0.8},
            {"category_id": 3, "segmentation": rle_of(box_mask(25, 5, 38, 30)), "score": 0.3},
        ],
        2: [
            {"category_id": 2, "segmentation": rle_of(box_mask(0, 5, 40, 13)), "score": 0.95},
            {"category_id": 2, "segmentation": rle_of(box_mask(12, 40, 39, 59)), "score": 0.5},
            {"category_id": 1, "segmentation": rle_of(box_mask(5, 30, 10, 37)), "score": 0.4},
            {"category_id": 1, "segmentation": rle_of(box_mask(20, 20, 30, 30)), "score": 0.85},
        ],
    }


def direct_cocoeval(gt_dict, per_image):
    """COCOeval exactly as its README runs it, on copies, plus detectron2's per-category AP."""
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt_dict)
    coco_gt.createIndex()
    results = [{"image_id": image_id, **copy.deepcopy(d)} for image_id, dets in per_image.items() for d in dets]
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    per_class = {}
    for index, category_id in enumerate(coco_eval.params.catIds):
        precision = coco_eval.eval["precision"][:, :, index, 0, -1]
        precision = precision[precision > -1]
        per_class[coco_gt.cats[category_id]["name"]] = 100 * precision.mean() if precision.size else math.nan
    return coco_eval.stats, per_class


def assert_same_as_direct(result, stats, per_class):
    for key, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), stats):
        expected = 100 * value if value >= 0 else math.nan
        assert (math.isnan(expected) and math.isnan(result[key])) or result[key] == pytest.approx(expected, abs=1e-12), key
    for name, expected in per_class.items():
        got = result["per_class"][name]["AP"]
        assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected, abs=1e-12), name


def test_mask_ap_equals_direct_cocoeval():
    gt = ground_truth()
    evaluator = InstanceEvaluator(gt)
    for image_id, dets in detections().items():
        evaluator.update(image_id, dets)
    result = evaluator.compute()
    stats, per_class = direct_cocoeval(gt, detections())
    assert_same_as_direct(result, stats, per_class)
    assert 0 < result["AP"] < 100
    assert math.isnan(result["per_class"]["bird"]["AP"])  # no ground truth for bird
    assert result["per_class"]["car"]["AP"] > result["per_class"]["person"]["AP"]


def test_evaluating_twice_and_leaving_the_callers_data_alone():
    gt = ground_truth()
    before = copy.deepcopy(gt)
    dets = detections()
    dets_before = copy.deepcopy(dets)
    evaluator = InstanceEvaluator(gt)
    for image_id, image_dets in dets.items():
        evaluator.update(image_id, image_dets)
    first = evaluator.compute()
    second = evaluator.compute()
    assert first["AP"] == second["AP"]
    assert gt == before and dets == dets_before


def test_bbox_in_detections_does_not_change_mask_areas():
    with_boxes = {
        image_id: [{**d, "bbox": [0.0, 0.0, float(WIDTH), float(HEIGHT)]} for d in dets] for image_id, dets in detections().items()
    }
    plain, boxed = InstanceEvaluator(ground_truth()), InstanceEvaluator(ground_truth())
    for image_id in (1, 2):
        plain.update(image_id, detections()[image_id])
        boxed.update(image_id, with_boxes[image_id])
    assert plain.compute()["APs"] == boxed.compute()["APs"]


def test_no_detections_gives_zero_ap():
    evaluator = InstanceEvaluator(ground_truth())
    evaluator.update(1, [])
    result = evaluator.compute()
    assert result["AP"] == 0.0 and result["AP50"] == 0.0
    assert result["per_class"]["person"]["AP"] == 0.0
    assert math.isnan(result["per_class"]["bird"]["AP"])


def test_results_file_and_json_path(tmp_path):
    gt_path = tmp_path / "instances.json"
    gt_path.write_text(json.dumps(ground_truth()))
    results = [{"image_id": image_id, **d} for image_id, dets in detections().items() for d in dets]
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    from_file = evaluate_coco_results_file(gt_path, results_path)
    stats, per_class = direct_cocoeval(ground_truth(), detections())
    assert_same_as_direct(from_file, stats, per_class)


def test_merge_equals_single_evaluator():
    whole, first, second = (InstanceEvaluator(ground_truth()) for _ in range(3))
    for image_id, dets in detections().items():
        whole.update(image_id, dets)
    first.update(1, detections()[1])
    second.update(2, detections()[2])
    first.merge(second)
    assert first.compute()["AP"] == whole.compute()["AP"]
    first.reset()
    assert first.compute()["AP"] == 0.0


@pytest.mark.parametrize(
    ("image_id", "detection", "match"),
    [
        (7, {"category_id": 1, "segmentation": rle_of(box_mask(0, 0, 2, 2)), "score": 0.5}, "image_id 7 is not an image"),
        (1, {"category_id": 9, "segmentation": rle_of(box_mask(0, 0, 2, 2)), "score": 0.5}, "category_id 9 is not"),
        (1, {"category_id": 1, "segmentation": rle_of(np.ones((20, 30), bool)), "score": 0.5}, r"mask size \[20, 30\] differs"),
        (1, {"category_id": 1, "segmentation": [[0, 0, 1, 1, 2, 0]], "score": 0.5}, "must be an RLE dict"),
    ],
)
def test_bad_detections_are_refused(image_id, detection, match):
    evaluator = InstanceEvaluator(ground_truth())
    with pytest.raises(ValueError, match=match):
        evaluator.update(image_id, [detection])


def test_masks_to_rle_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 17, 23)) > 0.5
    rles = masks_to_rle(masks)
    assert all(isinstance(rle["counts"], str) and rle["size"] == [17, 23] for rle in rles)
    np.testing.assert_array_equal(mask_utils.decode(rles).transpose(2, 0, 1).astype(bool), masks)
    from_tensor = masks_to_rle(torch.from_numpy(masks.astype(np.float32)))
    assert [r["counts"] for r in from_tensor] == [r["counts"] for r in rles]
    assert masks_to_rle(np.zeros((0, 5, 5), bool)) == []
    json.dumps(rles)  # JSON-safe


def random_scene(seed, images=24, size=128):
    """Random boxes of every area range (small, medium, large), crowds, and up to 120 noisy detections per image."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 4, 7)]}
    per_image = {}
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "height": size, "width": size + 8})
        per_image[image_id] = []
        for _ in range(int(rng.integers(0, 8))):
            y0, x0 = (int(v) for v in rng.integers(0, size // 2, size=2))
            h, w = (int(v) for v in rng.integers(2, size - y0, size=1).tolist() + rng.integers(2, size - x0, size=1).tolist())
            mask = box_mask(y0, x0, y0 + h, x0 + w, shape=(size, size + 8))
            category = int(rng.choice([1, 2, 4, 7]))
            gt["annotations"].append(
                {"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": category, "segmentation": rle_of(mask),
                 "area": float(mask.sum()), "bbox": [x0, y0, w, h], "iscrowd": int(rng.random() < 0.1)}
            )
            for _ in range(int(rng.integers(0, 20 if image_id > 1 else 120))):
                dy, dx = (int(v) for v in rng.integers(-3, 4, size=2))
                det = box_mask(max(y0 + dy, 0), max(x0 + dx, 0), y0 + h + dy, x0 + w + dx, shape=(size, size + 8))
                per_image[image_id].append(
                    {"category_id": category if rng.random() < 0.8 else int(rng.choice([1, 2, 4, 7])),
                     "segmentation": rle_of(det), "score": float(rng.random())}
                )
    return gt, per_image


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_ap_equals_pycocotools_on_random_scenes(seed):
    gt, per_image = random_scene(seed)
    evaluator = InstanceEvaluator(gt)
    for image_id, dets in per_image.items():
        evaluator.update(image_id, dets)
    result = evaluator.compute()
    stats, per_class = direct_cocoeval(gt, per_image)
    assert_same_as_direct(result, stats, per_class)
    assert all(not math.isnan(result[key]) for key in ("APs", "APm", "APl"))
