"""ADE-style semantic annotations (NVIDIA TAO's ``ade`` dataset type): a JSONL list of image/label pairs.

``annot_file`` holds one JSON object per line, ``{"img": "images/a.jpg", "segm": "annotations/a.png"}``; blank
lines are skipped. Both paths are relative to ``root_dir`` (a folder, or a ``.tar.gz`` extracted once next to
itself; files may sit at its root or inside its one top folder) and must stay inside it. With ``root_dir``
empty (TAO's default) they are relative to the annot_file's folder, and absolute paths are taken as they are,
as TAO reads them.

A label PNG is 8-bit grayscale (mode ``L``) of its image's size. Each pixel value is a category id, looked up
in the label map like any raw id; 0 is unlabelled and ignored (as TAO, which drops label 0), and so is a value
the label map does not list. Each category present becomes one segment, so the data serve
``model.mode: semantic``. Image sizes are read from the label PNGs' headers when the file is read, so a missing
or oversized file stops a job before any training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .folders import FileLocator, open_folder
from .images import ImageTooLargeError, open_image
from .json_files import JSON_MEMORY_FACTOR, json_object, preview, relative_file_name
from .records import ImageRecord, ImageSegments, Segment

LABEL_MODE = "L"
UNLABELLED = 0


def _read_lines(path: Path, *, key: str) -> List[Dict[str, Any]]:
    """The objects of a JSONL file; errors name the file and the line."""
    if not path.is_file():
        raise FileNotFoundError(f"{key}: annotation file {path} does not exist")
    import psutil

    size = path.stat().st_size
    if size * JSON_MEMORY_FACTOR > psutil.virtual_memory().available:
        raise ValueError(f"{key}: annotation file {path} is {size / 2 ** 20:.0f} MiB, more than this host can read")
    entries = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"annotation file {path}, line {number}"
            try:
                entry = json.loads(raw)
            except UnicodeDecodeError:
                raise ValueError(f"{where} is not UTF-8 text") from None
            except (json.JSONDecodeError, RecursionError, ValueError) as error:
                raise ValueError(f"{where} is not a JSON object: {error}") from None
            entry = json_object(entry, where=where)
            missing = [name for name in ("img", "segm") if name not in entry]
            if missing:
                raise ValueError(f"{where}: needs 'img' and 'segm' (missing {missing}), got keys "
                                 f"{preview(sorted(entry))}")
            entries.append({"img": entry["img"], "segm": entry["segm"], "where": where})
    if not entries:
        raise ValueError(f"{key}: annotation file {path} lists no image (expected one {{\"img\", \"segm\"}} "
                         "object per line)")
    return entries


class AdeReader:
    """Images and semantic segments of an ADE-style JSONL annotation file; ``spec_section`` (e.g.
    ``dataset.val``) only names the spec keys in error messages."""

    def __init__(self, *, annotation_file: str | Path, root_dir: Optional[str | Path] = None,
                 spec_section: str = "dataset.<split>") -> None:
        self.annotation_file = Path(annotation_file)
        entries = _read_lines(self.annotation_file, key=f"{spec_section}.annot_file")
        self._contained = bool(root_dir)
        if self._contained:
            self._locator: Optional[FileLocator] = FileLocator(open_folder(root_dir, key=f"{spec_section}.root_dir"))
            self._where_files = f"{spec_section}.root_dir={str(root_dir)!r}"
        else:
            self._locator = None
            self._where_files = f"the folder of {self.annotation_file}"
        self.records: List[ImageRecord] = []
        for image_id, entry in enumerate(entries):
            image = self._file(entry["img"], where=entry["where"], name="img")
            label = self._file(entry["segm"], where=entry["where"], name="segm")
            height, width = self._label_size(label)
            self.records.append(ImageRecord(image_id=image_id, file_name=str(entry["img"]), path=image,
                                            height=height, width=width, panoptic_path=label))
        self._by_id = {record.image_id: record for record in self.records}

    def _file(self, value: Any, *, where: str, name: str) -> Path:
        if self._contained:
            relative = relative_file_name(value, where=where, name=name)
            found = self._locator.find(relative)
        else:
            if not isinstance(value, str) or not value or "\0" in value:
                raise ValueError(f"{where}: '{name}' must be a non-empty path, got {preview(value)}")
            candidate = Path(value) if os.path.isabs(value) else self.annotation_file.parent / value
            found = candidate if candidate.is_file() else None
        if found is None:
            raise FileNotFoundError(f"{where} names {name} {value!r}, which is not in {self._where_files}")
        return found

    @staticmethod
    def _label_size(path: Path) -> tuple[int, int]:
        try:
            with open_image(path, what="label PNG") as image:
                width, height = image.size
        except ImageTooLargeError:
            raise
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"label PNG {path} could not be read: {error}") from None
        return height, width

    @property
    def categories(self) -> List[Dict[str, Any]]:
        return []

    def record(self, image_id: int) -> ImageRecord:
        return self._by_id[image_id]

    def load_labels(self, image_id: int) -> np.ndarray:
        """The category ids of one label PNG, uint8 [H, W] (0 unlabelled)."""
        record = self._by_id[image_id]
        try:
            with open_image(record.panoptic_path, what="label PNG") as image:
                if image.mode != LABEL_MODE:
                    raise ValueError(f"label PNG {record.panoptic_path} is mode {image.mode}; ade labels are 8-bit "
                                     "grayscale PNGs (mode L) whose values are category ids")
                labels = np.asarray(image)
        except (ImageTooLargeError, ValueError):
            raise
        except (OSError, SyntaxError) as error:
            raise ValueError(f"label PNG {record.panoptic_path} could not be read: {error}") from None
        return labels

    def load_segments(self, image_id: int) -> ImageSegments:
        """One segment per category present (0 left out: its pixels are unlabelled, hence ignored)."""
        record = self._by_id[image_id]
        labels = self.load_labels(image_id)
        categories = np.unique(labels)
        segments = [Segment(segment_id=int(category), category_id=int(category), iscrowd=False,
                            mask=labels == category)
                    for category in categories.tolist() if category != UNLABELLED]
        return ImageSegments(record=record, segments=segments, exclusive=True)
