"""Overlay images for people: the prediction painted over the image in the label map's colours, segment
boundaries drawn, and a legend of the categories shown (name and colour) on the right."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from ..data.label_map import IGNORE_VALUE, LabelMap
from .predictions import ImagePrediction

ALPHA = 0.5
# Instance-mode overlays show detections at or above this score (the files keep all of them).
OVERLAY_MIN_SCORE = 0.5
LEGEND_ROW = 18
LEGEND_WIDTH = 180
BOUNDARY = np.array([255, 255, 255], dtype=np.float32)


def _boundaries(ids: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another id."""
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def _paint(prediction: ImagePrediction, label_map: LabelMap) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """(colour [H, W, 3] float, region ids [H, W] (0 = unpainted), raw category ids shown)."""
    colors = {entry.id: np.array(entry.color, dtype=np.float32) for entry in label_map.entries}
    height, width = prediction.orig_size
    color = np.zeros((height, width, 3), dtype=np.float32)
    regions = np.zeros((height, width), dtype=np.int64)
    shown: List[int] = []
    if prediction.panoptic_seg is not None:
        for segment in sorted(prediction.segments_info, key=lambda s: -s["area"]):
            mask = prediction.panoptic_seg == segment["id"]
            shade = 1.0 - 0.2 * (segment["id"] % 3) if segment["isthing"] else 1.0  # tell touching things apart
            color[mask] = colors[segment["category_id"]] * shade
            regions[mask] = segment["id"]
            shown.append(segment["category_id"])
    elif prediction.instances is not None:
        kept = sorted((d for d in prediction.instances if d["score"] >= OVERLAY_MIN_SCORE), key=lambda d: d["score"])
        for number, detection in enumerate(kept, start=1):  # low scores first, the best on top
            mask = mask_utils.decode(detection["segmentation"]).astype(bool)
            color[mask] = colors[detection["category_id"]]
            regions[mask] = number
            shown.append(detection["category_id"])
    else:
        for raw_id in np.unique(prediction.sem_seg).tolist():
            if raw_id == IGNORE_VALUE:
                continue
            mask = prediction.sem_seg == raw_id
            color[mask] = colors[raw_id]
            regions[mask] = raw_id + 1
            shown.append(raw_id)
    return color, regions, list(dict.fromkeys(shown))


def render_overlay(image: np.ndarray, prediction: ImagePrediction, label_map: LabelMap) -> Image.Image:
    """The RGB overlay of ``prediction`` on ``image`` (uint8 [H, W, 3] at the original size), legend on the
    right."""
    if image.shape[:2] != tuple(prediction.orig_size):
        raise ValueError(f"overlay of {prediction.file_name}: image is {image.shape[1]}x{image.shape[0]} but the "
                         f"prediction is {prediction.orig_size[1]}x{prediction.orig_size[0]}")
    color, regions, shown = _paint(prediction, label_map)
    painted = (regions > 0)[..., None]
    blended = np.where(painted, image.astype(np.float32) * (1 - ALPHA) + color * ALPHA, image.astype(np.float32))
    blended[_boundaries(regions)] = BOUNDARY
    picture = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    return _with_legend(picture, shown, label_map)


def _with_legend(picture: Image.Image, shown: List[int], label_map: LabelMap) -> Image.Image:
    entries: Dict[int, Tuple[str, Tuple[int, int, int]]] = {e.id: (e.name, e.color) for e in label_map.entries}
    rows = max(1, len(shown))
    height = max(picture.height, LEGEND_ROW * rows + 8)
    canvas = Image.new("RGB", (picture.width + LEGEND_WIDTH, height), (32, 32, 32))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    left = picture.width + 6
    if not shown:
        draw.text((left, 4), "nothing detected", fill=(220, 220, 220), font=font)
    for row, raw_id in enumerate(shown):
        name, rgb = entries[raw_id]
        top = 4 + row * LEGEND_ROW
        draw.rectangle([left, top, left + 12, top + 12], fill=tuple(rgb), outline=(255, 255, 255))
        draw.text((left + 18, top), f"{name} ({raw_id})", fill=(230, 230, 230), font=font)
    return canvas
