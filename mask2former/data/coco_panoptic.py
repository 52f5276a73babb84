"""COCO panoptic annotations: ``annotations_panoptic.json`` + a folder (or archive) of PNGs.

Each PNG encodes segment ids as colours: id = R + 256 * G + 256^2 * B; id 0 is unlabelled (void).
``segments_info`` gives each segment's category and ``iscrowd`` flag.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from PIL import Image

from .coco import image_record, read_json, require_keys
from .folders import FileLocator, open_folder
from .records import ImageRecord, ImageSegments, Segment


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Decode a panoptic PNG's RGB array [H, W, 3] to segment ids int32 [H, W]."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Encode segment ids [H, W] as a panoptic PNG's RGB uint8 [H, W, 3]."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


def load_panoptic_png(path: Path) -> np.ndarray:
    """Read a panoptic PNG as segment ids int32 [H, W]."""
    with Image.open(path) as image:
        return rgb_to_id(np.asarray(image.convert("RGB")))


class CocoPanopticReader:
    """Images and panoptic segments of a COCO panoptic annotation file.

    ``img_dir`` and ``panoptic_dir`` are folders or ``.tar.gz`` archives (extracted once next to
    themselves); ``spec_section`` (e.g. ``dataset.val``) only names the spec keys in error messages.
    """

    def __init__(self, *, annotation_file: str | Path, img_dir: str | Path, panoptic_dir: str | Path,
                 spec_section: str = "dataset.<split>") -> None:
        self.annotation_file = Path(annotation_file)
        data = read_json(self.annotation_file, key=f"{spec_section}.panoptic_json")
        require_keys(data, ["images", "annotations"], path=self.annotation_file)
        self.data: Dict[str, Any] = data
        image_locator = FileLocator(open_folder(img_dir, key=f"{spec_section}.img_dir"))
        png_locator = FileLocator(open_folder(panoptic_dir, key=f"{spec_section}.panoptic_dir"))
        annotations: Dict[int, Dict[str, Any]] = {}
        for annotation in data["annotations"]:
            if "image_id" not in annotation or "file_name" not in annotation:
                raise ValueError(f"annotation file {self.annotation_file}: every annotation needs image_id and "
                                 f"file_name, got keys {sorted(annotation)}")
            annotations[int(annotation["image_id"])] = annotation
        self.records: List[ImageRecord] = []
        self._segments_info: Dict[int, List[Dict[str, Any]]] = {}
        for position, image in enumerate(data["images"]):
            record = image_record(image, position, locator=image_locator, annotation_file=self.annotation_file,
                                  img_dir=str(img_dir))
            image_id = record.image_id
            annotation = annotations.get(image_id)
            if annotation is None:
                raise ValueError(f"annotation file {self.annotation_file}: image {record.file_name!r} (id {image_id}) "
                                 f"has no entry in 'annotations'")
            png_path = png_locator.find(str(annotation["file_name"]))
            if png_path is None:
                raise FileNotFoundError(f"annotation file {self.annotation_file} names panoptic PNG "
                                        f"{annotation['file_name']!r} (image id {image_id}), which is not in "
                                        f"{panoptic_dir}")
            self.records.append(dataclasses.replace(record, panoptic_path=png_path))
            self._segments_info[image_id] = list(annotation.get("segments_info", []))
        self._by_id = {record.image_id: record for record in self.records}
        if len(self._by_id) != len(self.records):
            raise ValueError(f"annotation file {self.annotation_file}: image ids are not unique")

    @property
    def categories(self) -> List[Dict[str, Any]]:
        return list(self.data.get("categories", []))

    def record(self, image_id: int) -> ImageRecord:
        return self._by_id[image_id]

    def load_segments(self, image_id: int) -> ImageSegments:
        """Decode the panoptic PNG of one image into non-overlapping segments (void pixels in none)."""
        record = self._by_id[image_id]
        ids = load_panoptic_png(record.panoptic_path)
        if ids.shape != (record.height, record.width):
            raise ValueError(f"panoptic PNG {record.panoptic_path} is {ids.shape[1]}x{ids.shape[0]} but annotation "
                             f"file {self.annotation_file} says image {record.image_id} is "
                             f"{record.width}x{record.height}")
        segments = []
        for info in self._segments_info[image_id]:
            try:
                segment_id, category_id = int(info["id"]), int(info["category_id"])
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"annotation file {self.annotation_file}, image {image_id}: each segments_info entry "
                                 f"needs id and category_id ({error})") from error
            segments.append(Segment(segment_id=segment_id, category_id=category_id,
                                    iscrowd=bool(info.get("iscrowd", 0)), mask=ids == segment_id))
        return ImageSegments(record=record, segments=segments, exclusive=True)
