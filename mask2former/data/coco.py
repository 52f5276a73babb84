"""COCO instance annotations (``annotations.json``): polygons, RLE (compressed or not), iscrowd.

The reader keeps the JSON in memory and decodes the masks of one image on demand, at the image's
annotated (original) size, with pycocotools. Every field is checked when the file is read (types, id
ranges, image sizes within the pixel limit, file names inside the image folder), so a malformed file
stops a job before any training or evaluation, with a message naming the file and the entry.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from .folders import FileLocator, open_folder
from .json_files import MAX_CATEGORY_ID, json_flag, json_int, json_object, load_json_file, preview, \
    relative_file_name
from .records import ImageRecord, ImageSegments, Segment


def read_json(path: str | Path, *, key: str) -> Any:
    """Load a JSON file named by spec key ``key`` with bounded work (:func:`load_json_file`); errors name both."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: annotation file {path} does not exist")
    return load_json_file(path, describe=f"{key}: annotation file")


def require_keys(data: Any, keys: List[str], *, path: Path) -> None:
    """``data`` is an object holding the lists ``keys``."""
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path}: expected a JSON object with {keys}, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"annotation file {path}: missing top-level key(s) {missing}")
    for key in keys:
        if not isinstance(data[key], list):
            raise ValueError(f"annotation file {path}: '{key}' must be a list, got {type(data[key]).__name__}")


def category_id(value: Any, *, where: str) -> int:
    """A raw category id: 0..2^31-1 (ids a label map does not list are void, as upstream)."""
    return json_int(value, where=where, name="category_id", high=MAX_CATEGORY_ID)


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _polygon(polygon: Any, *, where: str) -> List[float]:
    if not isinstance(polygon, list) or len(polygon) % 2:
        raise ValueError(f"{where}: a polygon must be a flat list of x, y pairs, got {preview(polygon)}")
    if not all(_finite_number(v) for v in polygon):
        raise ValueError(f"{where}: polygon coordinates must be finite numbers, got {preview(polygon)}")
    return [float(v) for v in polygon]


def segmentation_to_mask(segmentation: Any, *, height: int, width: int, where: str) -> np.ndarray:
    """Decode a COCO ``segmentation`` (polygon list, RLE with list or string counts) to bool [H, W]."""
    if isinstance(segmentation, list):
        polygons = [_polygon(polygon, where=where) for polygon in segmentation]
        # fewer than 3 points enclose nothing (and 4 numbers would read as a box)
        polygons = [polygon for polygon in polygons if len(polygon) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if not isinstance(size, list) or size != [height, width]:
            raise ValueError(f"{where}: RLE size {preview(size)} differs from the image size [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= height * width for c in counts) \
                    or sum(counts) != height * width:
                raise ValueError(f"{where}: RLE 'counts' must be non-negative integers adding up to {height * width} "
                                 f"(height x width), got {preview(counts)}")
            rle = mask_util.frPyObjects(segmentation, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": size, "counts": counts.encode("ascii", "replace") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"{where}: RLE 'counts' must be a list or a string, got {type(counts).__name__}")
    else:
        raise ValueError(f"{where}: 'segmentation' must be a polygon list or an RLE {{size, counts}}, "
                         f"got {type(segmentation).__name__}")
    try:
        return mask_util.decode(rle).astype(bool)
    except ValueError as error:  # pycocotools checks compressed counts against the size as it decodes
        raise ValueError(f"{where}: the RLE mask cannot be decoded ({error})") from None


def image_size(height: Any, width: Any, *, where: str) -> Tuple[int, int]:
    """(height, width) of an annotated image: positive integers within Pillow's pixel limit."""
    height = json_int(height, where=where, name="height", low=1)
    width = json_int(width, where=where, name="width", low=1)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > limit:
        raise ValueError(f"{where}: {width}x{height} is {height * width} pixels, more than the {limit} pixels images "
                         "may have")
    return height, width


def image_record(image: Any, position: int, *, locator: FileLocator, annotation_file: Path,
                 img_dir: str) -> ImageRecord:
    """The record of ``images[position]`` of an annotation file, its image file found in ``img_dir``."""
    where = f"annotation file {annotation_file}, images[{position}]"
    image = json_object(image, where=where)
    missing = [key for key in ("id", "file_name", "height", "width") if key not in image]
    if missing:
        raise ValueError(f"annotation file {annotation_file}: images[{position}] needs id, file_name, height and "
                         f"width (missing {missing})")
    image_id = json_int(image["id"], where=where, name="id")
    file_name = relative_file_name(image["file_name"], where=where, name="file_name")
    height, width = image_size(image["height"], image["width"], where=where)
    path = locator.find(file_name)
    if path is None:
        raise FileNotFoundError(f"annotation file {annotation_file} names image {file_name!r} (id {image_id}), "
                                f"which is not in {img_dir}")
    return ImageRecord(image_id=image_id, file_name=file_name, path=path, height=height, width=width)


class CocoInstanceReader:
    """Images and instance segments of a COCO instance annotation file.

    ``img_dir`` is a folder or a ``.tar.gz`` archive (extracted once next to itself); ``spec_section``
    (e.g. ``dataset.train``) only names the spec keys in error messages.
    """

    def __init__(self, *, annotation_file: str | Path, img_dir: str | Path,
                 spec_section: str = "dataset.<split>") -> None:
        self.annotation_file = Path(annotation_file)
        data = read_json(self.annotation_file, key=f"{spec_section}.instance_json")
        require_keys(data, ["images", "annotations"], path=self.annotation_file)
        self.data: Dict[str, Any] = data
        locator = FileLocator(open_folder(img_dir, key=f"{spec_section}.img_dir"))
        self.records = [image_record(image, position, locator=locator, annotation_file=self.annotation_file,
                                     img_dir=str(img_dir)) for position, image in enumerate(data["images"])]
        self._by_id = {record.image_id: record for record in self.records}
        if len(self._by_id) != len(self.records):
            raise ValueError(f"annotation file {self.annotation_file}: image ids are not unique")
        self._annotations: Dict[int, List[_Instance]] = defaultdict(list)
        for position, annotation in enumerate(data["annotations"]):
            instance = _Instance.read(annotation, where=f"annotation file {self.annotation_file}, "
                                                        f"annotations[{position}]")
            if instance.image_id not in self._by_id:
                raise ValueError(f"annotation file {self.annotation_file}: annotation {instance.annotation_id} refers "
                                 f"to image_id {instance.image_id}, which is not in 'images'")
            self._annotations[instance.image_id].append(instance)

    @property
    def categories(self) -> List[Dict[str, Any]]:
        return list(self.data.get("categories", []))

    def record(self, image_id: int) -> ImageRecord:
        return self._by_id[image_id]

    def load_segments(self, image_id: int) -> ImageSegments:
        """Decode the instance masks of one image at its annotated size (overlaps allowed)."""
        record = self._by_id[image_id]
        segments = []
        for instance in self._annotations.get(image_id, []):
            where = f"annotation file {self.annotation_file}, annotation {instance.annotation_id}"
            mask = segmentation_to_mask(instance.segmentation, height=record.height, width=record.width, where=where)
            segment_id = len(segments) + 1 if instance.annotation_id is None else instance.annotation_id
            segments.append(Segment(segment_id=segment_id, category_id=instance.category_id,
                                    iscrowd=instance.iscrowd, mask=mask))
        return ImageSegments(record=record, segments=segments, exclusive=False)


@dataclass(frozen=True)
class _Instance:
    """One entry of ``annotations``, its scalar fields checked; the segmentation is decoded on demand."""

    annotation_id: Optional[int]  # None when the entry has no id
    image_id: int
    category_id: int
    iscrowd: bool
    segmentation: Any

    @classmethod
    def read(cls, annotation: Any, *, where: str) -> "_Instance":
        annotation = json_object(annotation, where=where)
        if "segmentation" not in annotation or "category_id" not in annotation:
            raise ValueError(f"{where}: needs 'segmentation' and 'category_id'")
        return cls(annotation_id=json_int(annotation["id"], where=where, name="id") if "id" in annotation else None,
                   image_id=json_int(annotation.get("image_id"), where=where, name="image_id"),
                   category_id=category_id(annotation["category_id"], where=where),
                   iscrowd=json_flag(annotation.get("iscrowd", 0), where=where, name="iscrowd"),
                   segmentation=annotation["segmentation"])
