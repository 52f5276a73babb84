"""Build datasets and transforms from the typed spec (``cfg.dataset``, ``cfg.model``; attribute access)."""

from __future__ import annotations

import functools
from typing import Any

from torch.utils.data import DataLoader

from .ade import AdeReader
from .coco import CocoInstanceReader
from .coco_panoptic import CocoPanopticReader
from .dataset import ImageFolderDataset, SegmentationDataset, collate_batch
from .label_map import LabelMap
from .stretch import target_size_of
from .transforms import EvalTransform, TrainTransform

SPLITS = ("train", "val", "test")


def build_train_transform(dataset_cfg: Any) -> TrainTransform:
    aug = dataset_cfg.augmentation
    return TrainTransform(
        train_min_size=list(aug.train_min_size), train_max_size=aug.train_max_size,
        train_crop_size=list(aug.train_crop_size), hflip_prob=aug.hflip_prob, color_jitter=aug.color_jitter,
        crop_single_category_max_area=aug.crop_single_category_max_area,
        large_scale_jitter=aug.large_scale_jitter, lsj_scale_range=list(aug.lsj_scale_range),
        pixel_mean=list(dataset_cfg.pixel_mean), pixel_std=list(dataset_cfg.pixel_std))


def build_eval_transform(dataset_cfg: Any) -> EvalTransform:
    aug = dataset_cfg.augmentation
    return EvalTransform(test_min_size=aug.test_min_size, test_max_size=aug.test_max_size,
                         pixel_mean=list(dataset_cfg.pixel_mean), pixel_std=list(dataset_cfg.pixel_std))


def build_label_map(cfg: Any) -> LabelMap:
    if not cfg.dataset.label_map:
        raise ValueError("dataset.label_map is not set: expected the path of label_map.json / "
                         "label_map_panoptic.json")
    return LabelMap.load(cfg.dataset.label_map, contiguous_id=cfg.dataset.contiguous_id,
                         num_classes=cfg.model.sem_seg_head.num_classes)


def _require(section: Any, names: list[str], *, prefix: str, kind: str) -> None:
    missing = [f"{prefix}.{name}" for name in names if not getattr(section, name)]
    if missing:
        raise ValueError(f"{prefix}.type is {kind!r}, which needs {', '.join(missing)} to be set")


def build_reader(section: Any, *, prefix: str):
    """The annotation reader of one split section (``dataset.train`` / ``val`` / ``test``)."""
    if section.type == "coco":
        _require(section, ["img_dir", "instance_json"], prefix=prefix, kind="coco")
        return CocoInstanceReader(annotation_file=section.instance_json, img_dir=section.img_dir,
                                  spec_section=prefix)
    if section.type == "coco_panoptic":
        _require(section, ["img_dir", "panoptic_json", "panoptic_dir"], prefix=prefix, kind="coco_panoptic")
        return CocoPanopticReader(annotation_file=section.panoptic_json, img_dir=section.img_dir,
                                  panoptic_dir=section.panoptic_dir, spec_section=prefix)
    if section.type == "ade":
        _require(section, ["annot_file"], prefix=prefix, kind="ade")
        return AdeReader(annotation_file=section.annot_file, root_dir=section.root_dir or None, spec_section=prefix)
    raise ValueError(f"{prefix}.type={section.type!r} is not one of ['coco', 'coco_panoptic', 'ade']")


def build_datasets(cfg: Any, split: str) -> SegmentationDataset:
    """The annotated dataset of ``split`` (train: training augmentation; val/test: evaluation resize), its
    images and segments stretched to ``dataset.<split>.target_size`` if set."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    prefix = f"dataset.{split}"
    section = getattr(cfg.dataset, split)
    reader = build_reader(section, prefix=prefix)
    transform = build_train_transform(cfg.dataset) if split == "train" else build_eval_transform(cfg.dataset)
    return SegmentationDataset(reader=reader, label_map=build_label_map(cfg), transform=transform,
                               mode=cfg.model.mode, target_size=target_size_of(section.target_size))


def build_inference_dataset(cfg: Any) -> ImageFolderDataset:
    """Images of ``dataset.test.img_dir`` (folder or archive), stretched to ``dataset.test.target_size`` if
    set, resized as for evaluation."""
    if not cfg.dataset.test.img_dir:
        raise ValueError("dataset.test.img_dir is not set: expected a folder or images.tar.gz of images")
    return ImageFolderDataset(root=cfg.dataset.test.img_dir, transform=build_eval_transform(cfg.dataset),
                              key="dataset.test.img_dir", target_size=target_size_of(cfg.dataset.test.target_size))


def build_calibration_dataset(cfg: Any) -> ImageFolderDataset:
    """The first ``num_images`` images of ``dataset.quant_calibration_dataset.images_dir``."""
    calibration = cfg.dataset.quant_calibration_dataset
    if not calibration.images_dir:
        raise ValueError("dataset.quant_calibration_dataset.images_dir is not set: expected a folder or "
                         "images.tar.gz of calibration images")
    return ImageFolderDataset(root=calibration.images_dir, transform=build_eval_transform(cfg.dataset),
                              key="dataset.quant_calibration_dataset.images_dir",
                              max_images=calibration.num_images)


def build_dataloader(cfg: Any, split: str) -> DataLoader:
    """A DataLoader over :func:`build_datasets` with ``dataset.<split>.batch_size`` / ``num_workers``:
    shuffled for train; for val/test in order and keeping the last partial batch (every image is
    evaluated). Lightning swaps in a distributed sampler under DDP."""
    dataset = build_datasets(cfg, split)
    section = getattr(cfg.dataset, split)
    return DataLoader(
        dataset, batch_size=section.batch_size, shuffle=split == "train", num_workers=section.num_workers,
        drop_last=False, persistent_workers=section.num_workers > 0,
        collate_fn=functools.partial(collate_batch, size_divisibility=cfg.dataset.augmentation.size_divisibility))
