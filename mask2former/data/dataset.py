"""Torch datasets for training, evaluation and inference, and the batch collate function.

Item of :class:`SegmentationDataset`::

    {"image": float32 [3, h, w] (normalised), "labels": int64 [N] class indices, "masks": bool [N, h, w],
     "ignore_mask": bool [h, w], "sem_seg": int64 [h, w] (class indices, 255 ignore),
     "image_id": int, "file_name": str, "orig_size": (H, W), "image_size": (h, w)}

Targets follow ``model.mode``: one mask per segment (panoptic), per thing segment (instance), or per
class present (semantic). Evaluation ground truth at the ORIGINAL resolution comes separately from
:meth:`SegmentationDataset.load_ground_truth`, so evaluators never depend on the resized input.

With a ``target_size`` (TAO's ``dataset.<split>.target_size``) every image and its segments are stretched to
it as they are read (:mod:`.stretch`): the records, ``orig_size`` and the ground truth are then at that size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from pycocotools import mask as mask_util
from torch.utils.data import Dataset, default_collate

from .ade import AdeReader
from .coco import CocoInstanceReader
from .coco_panoptic import CocoPanopticReader
from .folders import open_folder
from .images import list_images, load_rgb
from .label_map import LabelMap
from .records import ImageSegments
from .stretch import Size, stretch_image, stretch_record, stretch_segments
from .targets import GroundTruth, build_ground_truth, build_targets, check_mode, semantic_masks
from .transforms import IGNORE_LABEL, EvalTransform, Sample, TrainTransform

Reader = Union[CocoInstanceReader, CocoPanopticReader, AdeReader]
Transform = Union[TrainTransform, EvalTransform]


def _random_generator(transform: Transform) -> Optional[np.random.Generator]:
    """A numpy generator seeded from torch's RNG (per-worker seeded by the DataLoader) for random
    transforms; None for deterministic ones, so evaluation never consumes training randomness."""
    if not isinstance(transform, TrainTransform):
        return None
    return np.random.default_rng(torch.randint(0, 2 ** 62, (2,)).tolist())


class SegmentationDataset(Dataset):
    """Annotated images (COCO instance, COCO panoptic or ADE label PNGs) as model inputs and targets."""

    def __init__(self, *, reader: Reader, label_map: LabelMap, transform: Transform, mode: str,
                 target_size: Optional[Size] = None) -> None:
        self.reader = reader
        self.label_map = label_map
        self.transform = transform
        self.mode = check_mode(mode)
        self.target_size = target_size
        self.records = [stretch_record(record, target_size) if target_size else record for record in reader.records]

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, image_id: int) -> np.ndarray:
        """The image as RGB uint8 [H, W, 3] at its record's size (the target size, if any)."""
        record = self.reader.record(image_id)
        image = load_rgb(record.path)
        if image.shape[:2] != (record.height, record.width):
            hint = (" (the EXIF orientation swaps width and height: the annotation was made on the unrotated "
                    "image)" if image.shape[:2] == (record.width, record.height) else "")
            raise ValueError(f"image {record.path} is {image.shape[1]}x{image.shape[0]} but annotation file "
                             f"{self.reader.annotation_file} says {record.width}x{record.height}{hint}")
        return stretch_image(image, self.target_size) if self.target_size else image

    def load_segments(self, image_id: int) -> ImageSegments:
        """The image's annotated segments at its record's size (the target size, if any)."""
        segments = self.reader.load_segments(image_id)
        return stretch_segments(segments, self.target_size) if self.target_size else segments

    def __getitem__(self, index: int) -> Dict[str, Any]:
        record = self.records[index]
        image = self.load_image(record.image_id)
        targets = build_targets(self.load_segments(record.image_id), label_map=self.label_map, mode=self.mode)
        sample = Sample(image=image, masks=targets.masks, labels=targets.labels, sem_seg=targets.sem_seg,
                        ignore_mask=targets.ignore_mask)
        sample = self.transform(sample, _random_generator(self.transform))
        labels, masks = sample.labels, sample.masks
        if self.mode == "semantic":
            labels, masks = semantic_masks(sample.sem_seg)
        return {
            "image": torch.from_numpy(sample.image),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)),
            "ignore_mask": torch.from_numpy(np.ascontiguousarray(sample.ignore_mask, dtype=bool)),
            "sem_seg": torch.from_numpy(sample.sem_seg.astype(np.int64)),
            "image_id": record.image_id,
            "file_name": record.file_name,
            "orig_size": (record.height, record.width),
            "image_size": sample.size,
        }

    def image_ids(self) -> List[int]:
        return [record.image_id for record in self.records]

    def load_ground_truth(self, image_id: int) -> GroundTruth:
        """Semantic (raw ids, 255 ignore) and panoptic ground truth of one image at its record's size."""
        return build_ground_truth(self.load_segments(image_id), label_map=self.label_map)

    def coco_instance_ground_truth(self) -> Dict[str, Any]:
        """COCO instance ground truth (RLE masks) of the label map's thing classes, for mask AP.

        Built from the reader's segments, so it exists for COCO panoptic data too (things as instances).
        """
        thing_ids = {self.label_map.raw_id_of(i) for i in self.label_map.thing_classes}
        images, annotations = [], []
        for record in self.records:
            images.append({"id": record.image_id, "file_name": record.file_name, "height": record.height,
                           "width": record.width})
            for segment in self.load_segments(record.image_id).segments:
                if segment.category_id not in thing_ids or not segment.mask.any():
                    continue
                rle = mask_util.encode(np.asfortranarray(segment.mask.astype(np.uint8)))
                annotations.append({
                    "id": len(annotations) + 1, "image_id": record.image_id, "category_id": segment.category_id,
                    "iscrowd": int(segment.iscrowd), "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                })
        categories = [c for c in self.label_map.categories() if c["id"] in thing_ids]
        return {"images": images, "annotations": annotations, "categories": categories}


class ImageFolderDataset(Dataset):
    """Unannotated images (jpg/jpeg/png in any letter case) from a folder or archive, for inference
    and calibration. Items: {"image", "image_id" (position), "file_name" (relative path), "orig_size",
    "image_size"}; with a ``target_size`` every image is stretched to it first, and ``orig_size`` is it."""

    def __init__(self, *, root: str, transform: EvalTransform, key: str = "dataset.test.img_dir",
                 max_images: Optional[int] = None, target_size: Optional[Size] = None) -> None:
        folder = open_folder(root, key=key)
        paths = list_images(folder)
        if not paths:
            raise FileNotFoundError(f"{key}={root!r} holds no .jpg, .jpeg or .png images")
        self.folder = folder
        self.paths = paths[:max_images] if max_images is not None else paths
        self.transform = transform
        self.target_size = target_size

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, path: Path) -> np.ndarray:
        """An image of the folder as RGB uint8 [H, W, 3], stretched to the target size if any."""
        image = load_rgb(path)
        return stretch_image(image, self.target_size) if self.target_size else image

    def __getitem__(self, index: int) -> Dict[str, Any]:
        path = self.paths[index]
        image = self.load_image(path)
        sample = self.transform(Sample(image=image))
        return {
            "image": torch.from_numpy(sample.image),
            "image_id": index,
            "file_name": path.relative_to(self.folder).as_posix(),
            "orig_size": (int(image.shape[0]), int(image.shape[1])),
            "image_size": sample.size,
        }


META_KEYS = ("image_id", "file_name", "orig_size", "image_size")


def _pad_2d(tensor: torch.Tensor, height: int, width: int, value) -> torch.Tensor:
    """Pad the last two dims at the bottom/right; the tensor itself when it already has that size."""
    if tuple(tensor.shape[-2:]) == (height, width):
        return tensor
    out = tensor.new_full(tensor.shape[:-2] + (height, width), value)
    out[..., :tensor.shape[-2], :tensor.shape[-1]] = tensor
    return out


def collate_batch(items: Sequence[Dict[str, Any]], size_divisibility: int) -> Dict[str, Any]:
    """Pad a list of items to one size divisible by ``size_divisibility`` (bottom/right).

    Returns {"images": float32 [B, 3, H, W] (padding 0 after normalisation), "targets": one dict per item
    with labels / masks (padding False) / ignore_mask (padding True) / sem_seg (padding 255), empty for
    unannotated items, "metas": one dict per item with image_id, file_name, orig_size, image_size and
    padded_size}.
    """
    if not items:
        raise ValueError("collate_batch needs at least one item")
    if size_divisibility < 1:
        raise ValueError(f"dataset.augmentation.size_divisibility must be >= 1, got {size_divisibility}")
    height = max(int(item["image"].shape[-2]) for item in items)
    width = max(int(item["image"].shape[-1]) for item in items)
    height = int(math.ceil(height / size_divisibility) * size_divisibility)
    width = int(math.ceil(width / size_divisibility) * size_divisibility)
    # default_collate stacks straight into shared memory inside DataLoader workers (one copy less)
    images = default_collate([_pad_2d(item["image"], height, width, 0.0) for item in items])
    targets, metas = [], []
    for item in items:
        target = {}
        if "labels" in item:
            target = {"labels": item["labels"],
                      "masks": _pad_2d(item["masks"], height, width, False),
                      "ignore_mask": _pad_2d(item["ignore_mask"], height, width, True),
                      "sem_seg": _pad_2d(item["sem_seg"], height, width, IGNORE_LABEL)}
        targets.append(target)
        metas.append({key: item[key] for key in META_KEYS} | {"padded_size": (height, width)})
    return {"images": images, "targets": targets, "metas": metas}
