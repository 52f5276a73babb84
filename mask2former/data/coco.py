"""COCO instance annotations (``annotations.json``): polygons, RLE (compressed or not), iscrowd.

The reader keeps the JSON in memory and decodes the masks of one image on demand, at the image's
annotated (original) size, with pycocotools.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from pycocotools import mask as mask_util

from .folders import FileLocator, open_folder
from .records import ImageRecord, ImageSegments, Segment


def read_json(path: str | Path, *, key: str) -> Any:
    """Load a JSON file named by spec key ``key``; errors name both."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: annotation file {path} does not exist")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{key}: annotation file {path} is not valid JSON: {error}") from error


def require_keys(data: Any, keys: List[str], *, path: Path) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path}: expected a JSON object with {keys}, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"annotation file {path}: missing top-level key(s) {missing}")


def segmentation_to_mask(segmentation: Any, *, height: int, width: int, where: str) -> np.ndarray:
    """Decode a COCO ``segmentation`` (polygon list, RLE with list or string counts) to bool [H, W]."""
    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) % 2:
                raise ValueError(f"{where}: a polygon must be a flat list of x, y pairs, got {polygon!r:.80}")
            if len(polygon) >= 6:  # fewer than 3 points enclose nothing (and 4 numbers would read as a box)
                polygons.append([float(v) for v in polygon])
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"{where}: RLE size {size} differs from the image size [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            rle = mask_util.frPyObjects(segmentation, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"{where}: RLE 'counts' must be a list or a string, got {type(counts).__name__}")
    else:
        raise ValueError(f"{where}: 'segmentation' must be a polygon list or an RLE {{size, counts}}, "
                         f"got {type(segmentation).__name__}")
    return mask_util.decode(rle).astype(bool)


def image_record(image: Any, position: int, *, locator: FileLocator, annotation_file: Path,
                 img_dir: str) -> ImageRecord:
    """The record of ``images[position]`` of an annotation file, its image file found in ``img_dir``."""
    try:
        image_id, file_name = int(image["id"]), str(image["file_name"])
        height, width = int(image["height"]), int(image["width"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"annotation file {annotation_file}: images[{position}] needs id, file_name, height "
                         f"and width ({error})") from error
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
        self._annotations: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
        for annotation in data["annotations"]:
            image_id = int(annotation.get("image_id", -1))
            if image_id not in self._by_id:
                raise ValueError(f"annotation file {self.annotation_file}: annotation {annotation.get('id')} refers "
                                 f"to image_id {image_id}, which is not in 'images'")
            self._annotations[image_id].append(annotation)

    @property
    def categories(self) -> List[Dict[str, Any]]:
        return list(self.data.get("categories", []))

    def record(self, image_id: int) -> ImageRecord:
        return self._by_id[image_id]

    def load_segments(self, image_id: int) -> ImageSegments:
        """Decode the instance masks of one image at its annotated size (overlaps allowed)."""
        record = self._by_id[image_id]
        segments = []
        for annotation in self._annotations.get(image_id, []):
            where = f"annotation file {self.annotation_file}, annotation {annotation.get('id')}"
            if "segmentation" not in annotation or "category_id" not in annotation:
                raise ValueError(f"{where}: needs 'segmentation' and 'category_id'")
            mask = segmentation_to_mask(annotation["segmentation"], height=record.height, width=record.width,
                                        where=where)
            segments.append(Segment(segment_id=int(annotation.get("id", len(segments) + 1)),
                                    category_id=int(annotation["category_id"]),
                                    iscrowd=bool(annotation.get("iscrowd", 0)), mask=mask))
        return ImageSegments(record=record, segments=segments, exclusive=False)
