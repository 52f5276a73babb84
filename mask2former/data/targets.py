"""From raw segments to model targets and to evaluation ground truth, through the label map.

Rules (both for training targets and ground truth):
- a segment whose category is not in the label map is void;
- a crowd segment is ignored;
- void and crowd pixels not covered by a kept segment form the ``ignore_mask`` and are 255 in ``sem_seg``;
- pixels no segment covers (background of instance data, id 0 of panoptic PNGs) are 255 in ``sem_seg``;
  in panoptic data they are also ignored (unlabelled), in instance data they are plain background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np

from .label_map import LabelMap
from .records import ImageSegments, Segment

IGNORE_LABEL = 255
MODES = ("panoptic", "instance", "semantic")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"model.mode={mode!r} is not one of {list(MODES)}")
    return mode


@dataclass
class Targets:
    """Training targets at one resolution. ``masks`` is empty in semantic mode (built after transforms)."""

    labels: np.ndarray       # int64 [N] class indices
    masks: np.ndarray        # bool [N, H, W]
    sem_seg: np.ndarray      # int32 [H, W] class indices, 255 ignore
    ignore_mask: np.ndarray  # bool [H, W]


@dataclass
class GroundTruth:
    """What the evaluators need for one image, at its original resolution, in RAW category ids."""

    image_id: int
    file_name: str
    height: int
    width: int
    sem_seg: np.ndarray              # int32 [H, W] raw category ids, 255 = ignore
    panoptic_seg: np.ndarray         # int32 [H, W] segment ids, 0 = void
    segments_info: List[Dict[str, Any]]  # {id, category_id (raw), iscrowd, isthing, area}


def _kept_and_ignored(segments: List[Segment], label_map: LabelMap):
    kept, ignored = [], []
    for segment in segments:
        index = label_map.index_of(segment.category_id)
        if index is None or segment.iscrowd:
            ignored.append(segment)
        else:
            kept.append((index, segment))
    return kept, ignored


def _paint_order(kept, *, exclusive: bool):
    """Overlapping instances: paint large ones first so small ones on top stay visible."""
    if exclusive:
        return kept
    return sorted(kept, key=lambda pair: -int(pair[1].mask.sum()))


def build_targets(image_segments: ImageSegments, *, label_map: LabelMap, mode: str) -> Targets:
    """Targets at the original resolution: one mask per kept segment (things only in instance mode)."""
    check_mode(mode)
    record = image_segments.record
    shape = (record.height, record.width)
    kept, ignored = _kept_and_ignored(image_segments.segments, label_map)
    sem_seg = np.full(shape, IGNORE_LABEL, dtype=np.int32)
    covered = np.zeros(shape, dtype=bool)
    for index, segment in _paint_order(kept, exclusive=image_segments.exclusive):
        sem_seg[segment.mask] = index
        covered |= segment.mask
    ignore_mask = np.zeros(shape, dtype=bool)
    for segment in ignored:
        ignore_mask |= segment.mask
    if image_segments.exclusive:
        ignore_mask |= ~covered  # unlabelled panoptic pixels
    ignore_mask &= ~covered
    if mode == "semantic":
        selected = []
    elif mode == "instance":
        selected = [(i, s) for i, s in kept if label_map.is_thing(i)]
    else:
        selected = kept
    labels = np.array([index for index, _ in selected], dtype=np.int64)
    masks = (np.stack([segment.mask for _, segment in selected]) if selected
             else np.zeros((0,) + shape, dtype=bool))
    return Targets(labels=labels, masks=masks, sem_seg=sem_seg, ignore_mask=ignore_mask)


def semantic_masks(sem_seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One mask per class present in ``sem_seg`` (255 excluded): (labels int64 [N], masks bool [N, H, W])."""
    classes = np.unique(sem_seg)
    classes = classes[classes != IGNORE_LABEL].astype(np.int64)
    return classes, sem_seg[None] == classes[:, None, None]


def build_ground_truth(image_segments: ImageSegments, *, label_map: LabelMap) -> GroundTruth:
    """Semantic (raw ids) and panoptic ground truth at the original resolution.

    Segments whose category is not in the label map become void (0 in ``panoptic_seg``, 255 in
    ``sem_seg``); crowd segments stay in the panoptic map with ``iscrowd`` 1 (PQ ignores them) and are
    255 in ``sem_seg``.
    """
    record = image_segments.record
    shape = (record.height, record.width)
    sem_seg = np.full(shape, IGNORE_LABEL, dtype=np.int32)
    panoptic = np.zeros(shape, dtype=np.int32)
    segments_info = []
    kept, ignored = _kept_and_ignored(image_segments.segments, label_map)
    crowd = [(label_map.index_of(s.category_id), s) for s in ignored
             if label_map.index_of(s.category_id) is not None]
    next_id = 1
    for index, segment in crowd + _paint_order(kept, exclusive=image_segments.exclusive):
        segment_id = segment.segment_id if image_segments.exclusive else next_id
        next_id += 1
        panoptic[segment.mask] = segment_id
        if not segment.iscrowd:
            sem_seg[segment.mask] = segment.category_id
        segments_info.append({"id": segment_id, "category_id": segment.category_id,
                              "iscrowd": int(segment.iscrowd), "isthing": int(label_map.is_thing(index))})
    areas = dict(zip(*np.unique(panoptic, return_counts=True)))
    segments_info = [dict(info, area=int(areas.get(info["id"], 0))) for info in segments_info]
    segments_info = [info for info in segments_info if info["area"] > 0]
    return GroundTruth(image_id=record.image_id, file_name=record.file_name, height=record.height,
                       width=record.width, sem_seg=sem_seg, panoptic_seg=panoptic, segments_info=segments_info)
