"""COCO panoptic annotations: ``annotations_panoptic.json`` + a folder (or archive) of PNGs.

Each PNG encodes segment ids as colours: id = R + 256 * G + 256^2 * B; id 0 is unlabelled (void).
``segments_info`` gives each segment's category and ``iscrowd`` flag. Every entry is checked when the file is
read (types, segment ids within the 24 bits a PNG encodes, file names inside their folders); a PNG is
refused from its header when it is larger than the pixel limit, and after decoding when its size differs
from its image's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from .coco import category_id, image_record, read_json, require_keys
from .folders import FileLocator, open_folder
from .images import ImageTooLargeError, open_image
from .json_files import json_flag, json_int, json_object, preview, relative_file_name
from .records import ImageRecord, ImageSegments, Segment

#: Segment ids a panoptic PNG can hold (24-bit RGB; 0 is void).
MAX_SEGMENT_ID = 2 ** 24 - 1


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
    try:
        with open_image(path, what="panoptic PNG") as image:
            return rgb_to_id(np.asarray(image.convert("RGB")))
    except ImageTooLargeError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"panoptic PNG {path} could not be read: {error}") from None


def _segments_info(annotation: Dict[str, Any], *, where: str) -> List[Tuple[int, int, bool]]:
    """(segment id, category id, iscrowd) of each ``segments_info`` entry."""
    entries = annotation.get("segments_info", [])
    if not isinstance(entries, list):
        raise ValueError(f"{where}: 'segments_info' must be a list, got {type(entries).__name__}")
    parsed = []
    for position, info in enumerate(entries):
        place = f"{where}, segments_info[{position}]"
        info = json_object(info, where=place)
        if "id" not in info or "category_id" not in info:
            raise ValueError(f"{place}: each segments_info entry needs id and category_id, got keys "
                             f"{preview(sorted(info))}")
        parsed.append((json_int(info["id"], where=place, name="id", low=1, high=MAX_SEGMENT_ID),
                       category_id(info["category_id"], where=place),
                       json_flag(info.get("iscrowd", 0), where=place, name="iscrowd")))
    return parsed


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
        annotations: Dict[int, Tuple[str, List[Tuple[int, int, bool]]]] = {}
        for position, annotation in enumerate(data["annotations"]):
            where = f"annotation file {self.annotation_file}, annotations[{position}]"
            annotation = json_object(annotation, where=where)
            if "image_id" not in annotation or "file_name" not in annotation:
                raise ValueError(f"annotation file {self.annotation_file}: every annotation needs image_id and "
                                 f"file_name, got keys {preview(sorted(annotation))}")
            annotations[json_int(annotation["image_id"], where=where, name="image_id")] = (
                relative_file_name(annotation["file_name"], where=where, name="file_name"),
                _segments_info(annotation, where=where))
        self.records: List[ImageRecord] = []
        self._segments_info: Dict[int, List[Tuple[int, int, bool]]] = {}
        for position, image in enumerate(data["images"]):
            record = image_record(image, position, locator=image_locator, annotation_file=self.annotation_file,
                                  img_dir=str(img_dir))
            image_id = record.image_id
            if image_id not in annotations:
                raise ValueError(f"annotation file {self.annotation_file}: image {record.file_name!r} (id {image_id}) "
                                 f"has no entry in 'annotations'")
            png_name, segments_info = annotations[image_id]
            png_path = png_locator.find(png_name)
            if png_path is None:
                raise FileNotFoundError(f"annotation file {self.annotation_file} names panoptic PNG "
                                        f"{png_name!r} (image id {image_id}), which is not in {panoptic_dir}")
            self.records.append(dataclasses.replace(record, panoptic_path=png_path))
            self._segments_info[image_id] = segments_info
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
        segments = [Segment(segment_id=segment_id, category_id=category, iscrowd=iscrowd, mask=ids == segment_id)
                    for segment_id, category, iscrowd in self._segments_info[image_id]]
        return ImageSegments(record=record, segments=segments, exclusive=True)
