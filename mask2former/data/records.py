"""Plain records shared by the annotation readers: one image, its segments at original resolution."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One image of an annotation file. ``height``/``width`` are the annotated (displayed) size."""

    image_id: int
    file_name: str
    path: Path
    height: int
    width: int
    panoptic_path: Optional[Path] = None


@dataclass
class Segment:
    """One annotated region at original resolution.

    ``segment_id`` is the annotation id (COCO instance) or the panoptic segment id (COCO panoptic);
    ``category_id`` is the raw dataset id, mapped to a class index later through the label map.
    """

    segment_id: int
    category_id: int
    iscrowd: bool
    mask: np.ndarray  # bool [H, W]


@dataclass
class ImageSegments:
    """All segments of one image. ``exclusive`` is true when segments never overlap (panoptic)."""

    record: ImageRecord
    segments: List[Segment] = field(default_factory=list)
    exclusive: bool = False
