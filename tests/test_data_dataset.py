"""Torch datasets, ground truth at original size, collate padding and building from the spec."""

import contextlib
import functools
import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mask2former.config import load_spec
from mask2former.data.build import (
    build_calibration_dataset, build_dataloader, build_datasets, build_inference_dataset)
from mask2former.data.coco_panoptic import load_panoptic_png
from mask2former.data.dataset import ImageFolderDataset, collate_batch
from mask2former.data.synthetic import generate
from mask2former.data.transforms import EvalTransform

RAW_IDS = {1, 2, 3, 7, 9, 12}
THING_IDS = {7, 9, 12}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("synthetic")
    panoptic = generate(base / "pan", dataset_format="coco_panoptic", num_images=6, size=64, seed=3, val_images=3)
    coco = generate(base / "coco", dataset_format="coco", num_images=4, size=64, seed=4)
    return {"panoptic": panoptic, "coco": coco["train"]}


def _split(root, dataset_format):
    return SimpleNamespace(type=dataset_format, img_dir=str(root / "images.tar.gz"),
                           instance_json=str(root / "annotations.json"),
                           panoptic_json=str(root / "annotations_panoptic.json"),
                           panoptic_dir=str(root / "images_panoptic.tar.gz"), batch_size=2, num_workers=0,
                           target_size=[])


def _cfg(roots, *, mode="panoptic", dataset_format="coco_panoptic", contiguous_id=False, num_classes=13, **aug):
    train_root = roots["panoptic"]["train"] if dataset_format == "coco_panoptic" else roots["coco"]
    val_root = roots["panoptic"]["val"] if dataset_format == "coco_panoptic" else roots["coco"]
    label_map = train_root / ("label_map_panoptic.json" if dataset_format == "coco_panoptic" else "label_map.json")
    augmentation = dict(train_min_size=[64], train_max_size=256, train_crop_size=[48, 48], test_min_size=48,
                        test_max_size=256, hflip_prob=0.5, color_jitter=False, crop_single_category_max_area=1.0,
                        large_scale_jitter=False, lsj_scale_range=[0.1, 2.0], size_divisibility=32)
    augmentation.update(aug)
    return SimpleNamespace(
        model=SimpleNamespace(mode=mode, sem_seg_head=SimpleNamespace(num_classes=num_classes)),
        dataset=SimpleNamespace(
            train=_split(train_root, dataset_format), val=_split(val_root, dataset_format),
            test=_split(val_root, dataset_format), label_map=str(label_map), contiguous_id=contiguous_id,
            pixel_mean=MEAN, pixel_std=STD, augmentation=SimpleNamespace(**augmentation),
            quant_calibration_dataset=SimpleNamespace(images_dir=str(train_root / "images.tar.gz"), num_images=2)))


def test_train_item_contract(roots):
    dataset = build_datasets(_cfg(roots), "train")
    assert len(dataset) == 6
    item = dataset[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 48, 48)
    n = len(item["labels"])
    assert item["labels"].dtype == torch.int64 and n > 0
    assert item["masks"].dtype == torch.bool and item["masks"].shape == (n, 48, 48)
    assert item["ignore_mask"].dtype == torch.bool and item["ignore_mask"].shape == (48, 48)
    assert item["sem_seg"].dtype == torch.int64 and item["sem_seg"].shape == (48, 48)
    assert set(item["labels"].tolist()) <= RAW_IDS  # contiguous_id false: index = raw id
    assert item["orig_size"] == (64, 64) and item["image_size"] == (48, 48)
    assert item["image_id"] == 1 and item["file_name"] == "000001.jpg"
    for label, mask in zip(item["labels"], item["masks"]):
        assert mask.any() and (item["sem_seg"][mask] == label).all()
    assert (item["sem_seg"][item["ignore_mask"]] == 255).all()


def test_semantic_mode_gives_one_mask_per_class(roots):
    dataset = build_datasets(_cfg(roots, mode="semantic"), "train")
    for index in range(3):
        item = dataset[index]
        present = sorted(set(item["sem_seg"].unique().tolist()) - {255})
        assert item["labels"].tolist() == present
        for label, mask in zip(item["labels"], item["masks"]):
            assert torch.equal(mask, item["sem_seg"] == label)


def test_instance_mode_keeps_things_only(roots):
    dataset = build_datasets(_cfg(roots, mode="instance"), "val")
    labels = set()
    for index in range(len(dataset)):
        labels |= set(dataset[index]["labels"].tolist())
    assert labels and labels <= THING_IDS


def test_contiguous_ids_map_to_positions(roots):
    dataset = build_datasets(_cfg(roots, contiguous_id=True, num_classes=6), "val")
    labels = set()
    for index in range(len(dataset)):
        labels |= set(dataset[index]["labels"].tolist())
    assert labels <= set(range(6)) and max(labels) >= 3
    assert dataset.label_map.raw_id_of(5) == 12


def test_ground_truth_stays_at_original_size(roots):
    dataset = build_datasets(_cfg(roots, test_min_size=40), "val")
    item = dataset[1]
    assert item["image_size"] == (40, 40)
    truth = dataset.load_ground_truth(item["image_id"])
    assert truth.sem_seg.shape == truth.panoptic_seg.shape == (64, 64)
    png = load_panoptic_png(dataset.records[1].panoptic_path)
    np.testing.assert_array_equal(truth.panoptic_seg, png)
    for info in truth.segments_info:
        assert info["area"] == int((png == info["id"]).sum())
        if not info["iscrowd"]:
            assert (truth.sem_seg[png == info["id"]] == info["category_id"]).all()
    assert set(np.unique(truth.sem_seg).tolist()) <= RAW_IDS | {255}


@pytest.mark.parametrize("dataset_format", ["coco_panoptic", "coco"])
def test_instance_ground_truth_scores_perfectly_against_itself(roots, dataset_format):
    dataset = build_datasets(_cfg(roots, dataset_format=dataset_format, mode="instance"), "val")
    truth = dataset.coco_instance_ground_truth()
    assert {c["id"] for c in truth["categories"]} == THING_IDS
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = truth
        coco.createIndex()
        detections = [dict(a, score=1.0) for a in truth["annotations"] if not a["iscrowd"]]
        evaluator = COCOeval(coco, coco.loadRes(detections), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_collate_pads_to_divisible_size():
    def item(h, w, n):
        return {"image": torch.ones(3, h, w), "labels": torch.arange(n), "masks": torch.ones(n, h, w, dtype=torch.bool),
                "ignore_mask": torch.zeros(h, w, dtype=torch.bool), "sem_seg": torch.full((h, w), 4),
                "image_id": h, "file_name": f"{h}.jpg", "orig_size": (2 * h, 2 * w), "image_size": (h, w)}

    batch = collate_batch([item(40, 70, 2), item(65, 30, 0)], size_divisibility=32)
    assert batch["images"].shape == (2, 3, 96, 96)
    assert batch["images"][0, :, :40, :70].eq(1).all() and batch["images"][0, :, 40:].eq(0).all()
    first, second = batch["targets"]
    assert first["masks"].shape == (2, 96, 96) and second["masks"].shape == (0, 96, 96)
    assert first["masks"][:, :40, :70].all() and not first["masks"][:, 40:].any()
    assert not first["ignore_mask"][:40, :70].any() and first["ignore_mask"][40:].all()
    assert first["ignore_mask"][:, 70:].all() and (first["sem_seg"][:, 70:] == 255).all()
    assert (second["sem_seg"][:65, :30] == 4).all()
    assert batch["metas"][1] == {"image_id": 65, "file_name": "65.jpg", "orig_size": (130, 60),
                                 "image_size": (65, 30), "padded_size": (96, 96)}
    with pytest.raises(ValueError, match="size_divisibility"):
        collate_batch([item(4, 4, 0)], size_divisibility=0)


def test_dataloader_batches_and_seeded_augmentation(roots):
    cfg = _cfg(roots, large_scale_jitter=True, train_crop_size=[64, 64], color_jitter=True)
    dataset = build_datasets(cfg, "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=False,
                                         collate_fn=functools.partial(collate_batch, size_divisibility=32))
    torch.manual_seed(7)
    batch = next(iter(loader))
    assert batch["images"].shape == (3, 3, 64, 64)
    assert [m["image_size"] for m in batch["metas"]] == [(64, 64)] * 3
    torch.manual_seed(7)
    again = next(iter(loader))
    assert torch.equal(batch["images"], again["images"])
    torch.manual_seed(8)
    assert not torch.equal(next(iter(loader))["images"], batch["images"])


def test_worker_processes_draw_different_augmentations(roots):
    dataset = build_datasets(_cfg(roots, train_crop_size=[32, 32]), "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, shuffle=False,
                                         collate_fn=functools.partial(collate_batch, size_divisibility=32))
    torch.manual_seed(0)
    first = [batch["images"] for batch in loader]
    torch.manual_seed(0)
    second = [batch["images"] for batch in loader]
    torch.manual_seed(1)
    third = [batch["images"] for batch in loader]
    assert len(first) == 6 and all(torch.equal(a, b) for a, b in zip(first, second))  # seeded: reproducible
    assert not all(torch.equal(a, c) for a, c in zip(first, third))


def test_image_folder_dataset_over_folder_and_archive(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name, size in (("B.JPG", (30, 20)), ("a.png", (20, 30)), ("sub/c.JPEG", (40, 40))):
        Image.new("RGB", size, (10, 200, 10)).save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    (folder / "readme.txt").write_text("skip me")
    transform = EvalTransform(test_min_size=16, test_max_size=64, pixel_mean=MEAN, pixel_std=STD)
    dataset = ImageFolderDataset(root=str(folder), transform=transform)
    assert [dataset[i]["file_name"] for i in range(len(dataset))] == ["B.JPG", "a.png", "sub/c.JPEG"]
    item = dataset[0]
    assert item["orig_size"] == (20, 30) and item["image_size"] == (16, 24) and item["image"].shape == (3, 16, 24)
    batch = collate_batch([dataset[0], dataset[1]], size_divisibility=32)
    assert batch["images"].shape == (2, 3, 32, 32) and batch["targets"] == [{}, {}]
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="top")
    from_archive = ImageFolderDataset(root=str(archive), transform=transform, max_images=2)
    assert [from_archive[i]["file_name"] for i in range(len(from_archive))] == ["top/B.JPG", "top/a.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpg, .jpeg or .png"):
        ImageFolderDataset(root=str(empty), transform=transform)


def test_dataloader_builder_keeps_every_eval_image(roots):
    cfg = _cfg(roots)
    loader = build_dataloader(cfg, "val")  # 3 images, batch 2: the partial batch is kept
    batches = list(loader)
    assert [b["images"].shape[0] for b in batches] == [2, 1]
    assert [m["image_id"] for b in batches for m in b["metas"]] == [1, 2, 3]
    assert batches[0]["images"].shape[-2:] == (64, 64)  # 48 px padded to a multiple of 32
    assert len(list(build_dataloader(cfg, "train"))) == 3


def test_inference_and_calibration_builders(roots):
    cfg = _cfg(roots)
    assert len(build_inference_dataset(cfg)) == 3
    calibration = build_calibration_dataset(cfg)
    assert len(calibration) == 2 and calibration[0]["image"].shape == (3, 48, 48)


def test_exif_rotated_image_against_unrotated_annotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 20)).save(tmp_path / "images" / "r.jpg", exif=exif.tobytes())
    (tmp_path / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "r.jpg", "height": 20, "width": 40}], "annotations": [],
        "categories": [{"id": 1, "name": "a"}]}))
    (tmp_path / "label_map.json").write_text(json.dumps([{"id": 1, "name": "a"}]))
    cfg = SimpleNamespace(
        model=SimpleNamespace(mode="instance", sem_seg_head=SimpleNamespace(num_classes=2)),
        dataset=SimpleNamespace(
            val=SimpleNamespace(type="coco", img_dir=str(tmp_path / "images"),
                                instance_json=str(tmp_path / "annotations.json"), panoptic_json=None,
                                panoptic_dir=None, target_size=[]),
            label_map=str(tmp_path / "label_map.json"), contiguous_id=False, pixel_mean=MEAN, pixel_std=STD,
            augmentation=SimpleNamespace(test_min_size=16, test_max_size=64)))
    with pytest.raises(ValueError, match="EXIF orientation"):
        build_datasets(cfg, "val")[0]


def test_builder_errors_name_the_keys(roots):
    cfg = _cfg(roots)
    cfg.dataset.label_map = None
    with pytest.raises(ValueError, match="dataset.label_map is not set"):
        build_datasets(cfg, "train")
    cfg = _cfg(roots)
    cfg.dataset.val.type, cfg.dataset.val.instance_json = "coco", None
    with pytest.raises(ValueError, match="dataset.val.instance_json"):
        build_datasets(cfg, "val")
    with pytest.raises(ValueError, match="split 'eval'"):
        build_datasets(_cfg(roots), "eval")
    with pytest.raises(ValueError, match="12.*model.sem_seg_head.num_classes"):
        build_datasets(_cfg(roots, num_classes=10), "train")


def test_build_from_the_real_spec(roots):
    root = roots["panoptic"]["train"]
    cfg = load_spec("train", overrides={
        "results_dir": str(root / "results"), "model.sem_seg_head.num_classes": 13,
        "dataset.label_map": str(root / "label_map_panoptic.json"), "dataset.train.type": "coco_panoptic",
        "dataset.train.img_dir": str(root / "images.tar.gz"),
        "dataset.train.panoptic_json": str(root / "annotations_panoptic.json"),
        "dataset.train.panoptic_dir": str(root / "images_panoptic.tar.gz"),
        "dataset.augmentation.train_min_size": [64], "dataset.augmentation.train_crop_size": [64, 64]})
    item = build_datasets(cfg, "train")[0]
    assert item["image"].shape == (3, 64, 64)
