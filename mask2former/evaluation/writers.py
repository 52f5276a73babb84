"""Write predictions in standard, machine-readable formats (and overlays for people).

Layout under the output folder, for an image ``sub/name.jpg``::

    semantic/sub/name.png      raw category ids (8-bit, or 16-bit when an id exceeds 254); 255 = void
    panoptic/sub/name.png      COCO-panoptic RGB id encoding (id = R + 256 G + 256^2 B)       panoptic mode
    panoptic.json              COCO-panoptic predictions: annotations (image_id, file_name, segments_info
                               {id, category_id, isthing, score, area, iscrowd}), images, categories
    instances.json             COCO results: [{image_id, category_id, segmentation (RLE), score, bbox}]
                               instance mode, and panoptic mode (thing detections of the instance head)
    overlays/sub/name.jpg      the image blended with the label map's colours, with a legend

The panoptic PNG folder is named after the JSON's stem, so ``evaluate.predictions=<dir>/panoptic.json``
finds its PNGs. The files are what mask2former.metrics' scorers and panopticapi read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image

from ..data.label_map import IGNORE_VALUE, LabelMap
from ..metrics import id_to_rgb
from ..results import write_json
from .overlays import render_overlay
from .predictions import ImagePrediction

SEMANTIC_DIR = "semantic"
PANOPTIC_JSON = "panoptic.json"
PANOPTIC_DIR = "panoptic"
INSTANCES_JSON = "instances.json"
OVERLAY_DIR = "overlays"


def prediction_png_name(file_name: str) -> str:
    """The relative PNG name of an image's prediction: the image's relative path with suffix .png."""
    return str(PurePosixPath(file_name).with_suffix(".png"))


class _JsonListStream:
    """A JSON list written one entry at a time to a temporary file, renamed into place when closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.name}.tmp")
        self._handle = open(self._tmp, "w")
        self._handle.write("[")
        self._count = 0

    def append(self, entry: Dict[str, Any]) -> None:
        self._handle.write(("," if self._count else "") + "\n" + json.dumps(entry))
        self._count += 1

    def close(self) -> None:
        self._handle.write("\n]\n")
        self._handle.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._handle.close()
        self._tmp.unlink(missing_ok=True)


class PredictionWriter:
    """Writes each image's :class:`ImagePrediction`; :meth:`close` finishes the JSON files.

    Args:
        out_dir: the output folder (created).
        label_map: names and colours; raw ids of the semantic PNGs.
        save_overlays: also write overlay images (needs the image, at the prediction's size, in :meth:`write`).
    """

    def __init__(self, *, out_dir: Path, label_map: LabelMap, save_overlays: bool) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.label_map = label_map
        self.save_overlays = save_overlays
        self._semantic_dtype = np.uint8 if max(e.id for e in label_map.entries) < IGNORE_VALUE else np.uint16
        self._panoptic_annotations: List[Dict[str, Any]] = []
        self._images: List[Dict[str, Any]] = []
        self._instances: Optional[_JsonListStream] = None
        self._names: Dict[str, str] = {}

    def write(self, prediction: ImagePrediction, *, image: Optional[np.ndarray] = None) -> None:
        png_name = prediction_png_name(prediction.file_name)
        if png_name in self._names:
            raise ValueError(f"images {self._names[png_name]!r} and {prediction.file_name!r} would both write "
                             f"{png_name}: rename one of them")
        self._names[png_name] = prediction.file_name
        height, width = prediction.orig_size
        self._images.append({"id": prediction.image_id, "file_name": prediction.file_name, "height": height,
                             "width": width})
        _save_png(self.out_dir / SEMANTIC_DIR / png_name, prediction.sem_seg.astype(self._semantic_dtype))
        if prediction.panoptic_seg is not None:
            _save_png(self.out_dir / PANOPTIC_DIR / png_name, id_to_rgb(prediction.panoptic_seg))
            self._panoptic_annotations.append({
                "image_id": prediction.image_id, "file_name": png_name,
                "segments_info": [dict(segment, iscrowd=0) for segment in prediction.segments_info]})
        if prediction.instances is not None:
            if self._instances is None:
                self._instances = _JsonListStream(self.out_dir / INSTANCES_JSON)
            for detection in prediction.instances:
                self._instances.append({"image_id": prediction.image_id, **detection})
        if self.save_overlays:
            if image is None:
                raise ValueError(f"save_overlays needs image {prediction.file_name!r}")
            overlay = render_overlay(image, prediction, self.label_map)
            target = self.out_dir / OVERLAY_DIR / PurePosixPath(png_name).with_suffix(".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            overlay.save(target, quality=90)

    def close(self) -> Dict[str, Path]:
        """Finish the JSON files; returns {artifact name: path} of what was written."""
        artifacts: Dict[str, Path] = {"semantic": self.out_dir / SEMANTIC_DIR}
        if self._panoptic_annotations:
            write_json(self.out_dir / PANOPTIC_JSON, {"annotations": self._panoptic_annotations,
                                                      "images": self._images,
                                                      "categories": self.label_map.categories()})
            artifacts["panoptic_json"] = self.out_dir / PANOPTIC_JSON
            artifacts["panoptic"] = self.out_dir / PANOPTIC_DIR
        if self._instances is not None:
            self._instances.close()
            artifacts["instances_json"] = self.out_dir / INSTANCES_JSON
        if self.save_overlays:
            artifacts["overlays"] = self.out_dir / OVERLAY_DIR
        return artifacts

    def abort(self) -> None:
        """Drop the unfinished JSON stream (the job failed)."""
        if self._instances is not None:
            self._instances.abort()


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
