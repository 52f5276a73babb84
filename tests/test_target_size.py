"""TAO's dataset.<split>.target_size: every image of a split is stretched to [width, height] when it is read
(Pillow's bicubic resize for the image, nearest for its labels, aspect ratio not kept), so training, the
ground truth, the metrics and the inference outputs are all at that size."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from mask2former import results
from mask2former.cli import main
from mask2former.config import SpecError, load_spec
from mask2former.data.build import build_datasets, build_inference_dataset
from mask2former.data.coco_panoptic import rgb_to_id
from mask2former.data.synthetic import generate
from train_support import make_data, tiny_spec, write_spec

WIDTH, HEIGHT = 80, 10  # a 40 x 20 image stretched twice as wide and half as high


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


@pytest.fixture
def rectangles(tmp_path):
    """A 40 x 20 COCO instance image with a class-1 box at x 10..19, y 4..11 and a class-2 box at x 30..39,
    y 12..19."""
    (tmp_path / "images").mkdir()
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, :, 0] = np.arange(40, dtype=np.uint8)[None, :] * 6
    image[:, :, 1] = np.arange(20, dtype=np.uint8)[:, None] * 12
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    first, second = np.zeros((20, 40), bool), np.zeros((20, 40), bool)
    first[4:12, 10:20] = True
    second[12:20, 30:40] = True
    (tmp_path / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": _rle(first)},
                        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": _rle(second)}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    (tmp_path / "label_map.json").write_text(json.dumps([{"id": 1, "name": "a", "isthing": 1},
                                                         {"id": 2, "name": "b", "isthing": 1}]))
    return tmp_path


def _val_config(root: Path, target_size):
    return load_spec("train", overrides={
        "model.mode": "instance", "model.sem_seg_head.num_classes": 3,
        "dataset.label_map": str(root / "label_map.json"),
        "dataset.train.type": "coco", "dataset.train.img_dir": str(root / "images"),
        "dataset.train.instance_json": str(root / "annotations.json"),
        "dataset.val.type": "coco", "dataset.val.img_dir": str(root / "images"),
        "dataset.val.instance_json": str(root / "annotations.json"), "dataset.val.target_size": target_size,
        "dataset.augmentation.test_min_size": 32, "dataset.augmentation.test_max_size": 256})


def test_an_image_and_its_masks_come_out_of_load_stretched_to_width_by_height(rectangles):
    dataset = build_datasets(_val_config(rectangles, [WIDTH, HEIGHT]), "val")
    image = dataset.load_image(1)
    taos = np.asarray(Image.open(rectangles / "images" / "a.png").convert("RGB").resize((WIDTH, HEIGHT)))
    np.testing.assert_array_equal(image, taos)  # Pillow's default filter on [width, height], as TAO calls it

    truth = dataset.load_ground_truth(1)
    expected = np.full((HEIGHT, WIDTH), 255)
    expected[2:6, 20:40] = 1  # x doubled, y halved
    expected[6:10, 60:80] = 2
    np.testing.assert_array_equal(truth.sem_seg, expected)  # category ids only: nothing interpolated
    assert (truth.height, truth.width) == (HEIGHT, WIDTH)

    item = dataset[0]
    assert item["orig_size"] == (HEIGHT, WIDTH) and dataset.records[0].width == WIDTH
    assert item["image_size"] == (32, 256)  # then the evaluation resize, from the stretched image
    assert item["labels"].tolist() == [1, 2] and item["masks"].dtype == torch.bool

    instances = dataset.coco_instance_ground_truth()
    assert instances["images"] == [{"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH}]
    assert [a["bbox"] for a in instances["annotations"]] == [[20.0, 2.0, 20.0, 4.0], [60.0, 6.0, 20.0, 4.0]]


@pytest.mark.parametrize("dataset_format", ["coco_panoptic", "ade"])
def test_label_pngs_stretch_as_tao_stretches_them(tmp_path, dataset_format):
    """Each segment equals TAO's nearest resize of the whole label PNG, pixel for pixel."""
    root = generate(tmp_path, dataset_format=dataset_format, num_images=2, size=64, seed=1)["train"]
    if dataset_format == "ade":
        split = {"dataset.train.type": "ade", "dataset.train.annot_file": str(root / "annotations.jsonl"),
                 "dataset.train.root_dir": str(root / "root.tar.gz"), "dataset.label_map": str(root / "label_map.json"),
                 "model.mode": "semantic"}
    else:
        split = {"dataset.train.type": "coco_panoptic", "dataset.train.img_dir": str(root / "images.tar.gz"),
                 "dataset.train.panoptic_json": str(root / "annotations_panoptic.json"),
                 "dataset.train.panoptic_dir": str(root / "images_panoptic.tar.gz"),
                 "dataset.label_map": str(root / "label_map_panoptic.json")}
    config = load_spec("train", overrides={**split, "model.sem_seg_head.num_classes": 13,
                                           "dataset.train.target_size": [96, 40]})
    dataset = build_datasets(config, "train")
    for record in dataset.records:
        png = record.panoptic_path  # the label PNG of either format
        if dataset_format == "ade":
            taos = np.asarray(Image.open(png).convert("L").resize((96, 40), Image.NEAREST))
        else:
            taos = rgb_to_id(np.asarray(Image.open(png).convert("RGB").resize((96, 40), Image.NEAREST)))
        segments = dataset.load_segments(record.image_id).segments
        assert segments and dataset.load_image(record.image_id).shape == (40, 96, 3)
        for segment in segments:
            np.testing.assert_array_equal(segment.mask, taos == segment.segment_id)
    item = dataset[0]
    assert item["orig_size"] == (40, 96) and item["image"].shape[-2:] == item["masks"].shape[-2:]


def test_a_target_size_that_is_not_width_by_height_is_refused_naming_the_key():
    base = {"dataset.train.img_dir": "/d/images", "dataset.train.panoptic_json": "/d/p.json",
            "dataset.train.panoptic_dir": "/d/p", "dataset.label_map": "/d/label_map.json"}
    with pytest.raises(SpecError, match=re.escape("dataset.val.target_size [640] is not a size: expected "
                                                  "[width, height]")):
        load_spec("train", overrides={**base, "dataset.val.target_size": [640]})
    for value in ([640, 480, 3], [640, 0]):
        with pytest.raises(SpecError, match=re.escape("dataset.train.target_size")):
            load_spec("train", overrides={**base, "dataset.train.target_size": value})
    config = load_spec("train", overrides={**base, "dataset.train.target_size": [640, 480]})
    assert config.dataset.train.target_size == [640, 480]


def test_one_value_for_the_test_split_is_a_square_as_in_tao(tmp_path):
    root = generate(tmp_path, dataset_format="coco", num_images=1, size=32, seed=0)["train"]
    config = load_spec("inference", overrides={"inference.checkpoint": "/m.pth",
                                               "dataset.test.img_dir": str(root / "images.tar.gz"),
                                               "dataset.test.target_size": [48]})
    assert build_inference_dataset(config)[0]["orig_size"] == (48, 48)


@pytest.mark.slow
def test_train_evaluate_and_infer_with_target_sizes(tmp_path):
    roots = make_data(tmp_path / "data", images=2, val_images=1, size=64)
    spec = tiny_spec(roots)
    spec["dataset"]["train"]["target_size"] = [80, 48]
    spec["dataset"]["val"]["target_size"] = [96, 40]
    spec["dataset"]["test"] = {"img_dir": str(roots["val"] / "images.tar.gz"), "target_size": [96, 40]}
    spec_path = write_spec(tmp_path / "spec.yaml", spec)
    assert main(["train", "-e", str(spec_path), "--results-dir", str(tmp_path / "train")]) == 0, \
        results.read_status(tmp_path / "train")[-1:]
    assert 0 <= results.read_metrics(tmp_path / "train")["mIoU"] <= 100

    assert main(["evaluate", "-e", str(spec_path), "--results-dir", str(tmp_path / "eval"),
                 f"evaluate.checkpoint={tmp_path / 'train'}"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name in ("mIoU", "PQ"):
        assert 0 <= metrics[name] <= 100, (name, metrics[name])

    assert main(["inference", "-e", str(spec_path), "--results-dir", str(tmp_path / "infer"),
                 f"inference.checkpoint={tmp_path / 'train'}", "inference.save_overlays=true"]) == 0
    masks = sorted((tmp_path / "infer" / "panoptic").rglob("*.png")) + \
        sorted((tmp_path / "infer" / "semantic").rglob("*.png"))
    assert len(masks) == 2 and {Image.open(p).size for p in masks} == {(96, 40)}  # outputs at the target size
    overlays = sorted((tmp_path / "infer" / "overlays").rglob("*.jpg"))
    assert len(overlays) == 1 and {Image.open(p).height for p in overlays} == {40}  # the legend widens them
