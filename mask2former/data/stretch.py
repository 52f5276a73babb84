"""TAO's ``dataset.<split>.target_size``: every image of a split stretched to one size when it is read.

As in TAO's Mask2Former, the image goes through Pillow's ``resize`` to ``[width, height]`` with its default
filter (bicubic) and its label maps with the nearest filter; the aspect ratio is not kept. This happens at
load, before the training augmentation or the evaluation resize, so for val/test the ground truth, the
metrics and the predictions are all at the target size.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .records import ImageRecord, ImageSegments

Size = Tuple[int, int]  # (height, width)


def target_size_of(value: Sequence[int]) -> Optional[Size]:
    """(height, width) of a spec's ``[width, height]`` target_size; one value is a square (TAO reads
    ``dataset.test.target_size: [640]`` so); None when empty (off)."""
    if not value:
        return None
    width, height = (value[0], value[0]) if len(value) == 1 else value
    return int(height), int(width)


def stretch_image(image: np.ndarray, size: Size) -> np.ndarray:
    """RGB uint8 [H, W, 3] as [height, width, 3], resampled with Pillow's bicubic filter."""
    if image.shape[:2] == size:
        return image
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(resized)


def _nearest_positions(source: int, target: int) -> np.ndarray:
    """The source positions Pillow's nearest filter takes for ``target`` output positions, asked of Pillow
    itself so a mask stretched here equals a label PNG stretched with ``Image.NEAREST``, pixel for pixel."""
    positions = Image.fromarray(np.arange(source, dtype=np.int32)[None, :])
    return np.asarray(positions.resize((target, 1), Image.Resampling.NEAREST))[0]


def stretch_record(record: ImageRecord, size: Size) -> ImageRecord:
    return dataclasses.replace(record, height=size[0], width=size[1])


def stretch_segments(image_segments: ImageSegments, size: Size) -> ImageSegments:
    """Every segment's mask and the record's size at ``size``; segments keep their ids and categories."""
    record = image_segments.record
    if (record.height, record.width) == size:
        return image_segments
    rows = _nearest_positions(record.height, size[0])[:, None]
    cols = _nearest_positions(record.width, size[1])[None, :]
    # nearest sampling copies pixels, so segments that never overlapped still never do
    segments = [dataclasses.replace(segment, mask=segment.mask[rows, cols])
                for segment in image_segments.segments]
    return ImageSegments(record=stretch_record(record, size), segments=segments, exclusive=image_segments.exclusive)
