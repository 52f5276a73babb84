"""Augmentation and resizing for training, evaluation and inference (numpy + PIL, no torchvision).

Every geometric step moves the image and all its targets together: the image with bilinear
interpolation, instance masks / ``sem_seg`` / ``ignore_mask`` with nearest (pixel-centre aligned, the
same sampling grid as the image). Void in ``sem_seg`` is 255.

Training (``dataset.augmentation``):
- both start with a horizontal flip with probability ``hflip_prob`` (done first, on the smallest
  arrays; flipping commutes with the steps below);
- default: shortest edge resized to a random choice of ``train_min_size`` (longest edge capped by
  ``train_max_size``), a crop of ``train_crop_size`` where no class may cover more than
  ``crop_single_category_max_area`` of the labelled pixels (up to 10 tries), optional colour jitter;
- ``large_scale_jitter``: resize to a random factor in ``lsj_scale_range`` of the crop size (aspect
  ratio kept), random crop to at most ``train_crop_size`` (same class cap), optional colour jitter,
  then pad to exactly ``train_crop_size``.
Evaluation/inference: shortest edge ``test_min_size`` with the longest edge capped by ``test_max_size``.
Images end normalised with ``pixel_mean``/``pixel_std`` (TAO's 0..1 scale). Padding areas hold 0 in the
normalised image, False in masks, True in ``ignore_mask`` and 255 in ``sem_seg``; batches are padded to
a multiple of ``size_divisibility`` by :func:`mask2former.data.dataset.collate_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

IGNORE_LABEL = 255
CROP_TRIES = 10


@dataclass
class Sample:
    """An image and its optional targets, all [H, W] aligned. Targets are None for inference images.

    ``image`` is uint8 [H, W, 3] for the geometric and colour steps; :class:`Normalize` turns it into
    float32 [3, H, W] (the model's layout) and sets ``normalized``.
    """

    image: np.ndarray
    masks: Optional[np.ndarray] = None        # bool [N, H, W]
    labels: Optional[np.ndarray] = None       # int64 [N]
    sem_seg: Optional[np.ndarray] = None      # int32 [H, W], 255 ignore
    ignore_mask: Optional[np.ndarray] = None  # bool [H, W]
    normalized: bool = False

    @property
    def size(self) -> Tuple[int, int]:
        if self.normalized:
            return int(self.image.shape[1]), int(self.image.shape[2])
        return int(self.image.shape[0]), int(self.image.shape[1])


def _require_unnormalized(sample: Sample, step: str) -> None:
    if sample.normalized:
        raise ValueError(f"{step} runs on uint8 images, before normalisation")


# ---------------------------------------------------------------- geometry primitives
def _nearest_indices(out_len: int, in_len: int) -> np.ndarray:
    return np.minimum(((np.arange(out_len) + 0.5) * (in_len / out_len)).astype(np.int64), in_len - 1)


def resized_crop(sample: Sample, *, size: Tuple[int, int], box: Tuple[int, int, int, int]) -> Sample:
    """The ``box`` (top, left, height, width) of the sample resized to ``size``, computing only the kept
    pixels: the image with PIL's bilinear filter over the matching source region (the same sampling
    positions and filter width as a full resize), targets with the same nearest indices."""
    _require_unnormalized(sample, "resized_crop")
    in_h, in_w = sample.size
    top, left, height, width = box
    if size == (in_h, in_w) and box == (0, 0, in_h, in_w):
        return sample
    rows = _nearest_indices(size[0], in_h)[top:top + height]
    cols = _nearest_indices(size[1], in_w)[left:left + width]
    if size == (in_h, in_w):
        image = sample.image[top:top + height, left:left + width]
    else:
        scale_y, scale_x = in_h / size[0], in_w / size[1]
        source = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
        image = Image.fromarray(sample.image).resize((width, height), Image.BILINEAR, box=source)

    def nearest(array: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if array is None:
            return None
        return np.take(np.take(array, rows, axis=-2), cols, axis=-1)

    return replace(sample, image=np.ascontiguousarray(np.asarray(image)), masks=nearest(sample.masks),
                   sem_seg=nearest(sample.sem_seg), ignore_mask=nearest(sample.ignore_mask))


def resize(sample: Sample, height: int, width: int) -> Sample:
    """Resize to (height, width): bilinear image, nearest targets."""
    return resized_crop(sample, size=(height, width), box=(0, 0, height, width))


def hflip(sample: Sample) -> Sample:
    _require_unnormalized(sample, "hflip")

    def flip(array: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return None if array is None else np.ascontiguousarray(array[..., ::-1])

    return replace(sample, image=np.ascontiguousarray(sample.image[:, ::-1]), masks=flip(sample.masks),
                   sem_seg=flip(sample.sem_seg), ignore_mask=flip(sample.ignore_mask))


def pad_bottom_right(sample: Sample, height: int, width: int) -> Sample:
    """Pad a normalised sample to (height, width): image 0, masks False, ignore True, sem_seg 255."""
    if not sample.normalized:
        raise ValueError("pad_bottom_right runs after normalisation, so that padding is 0 in the model input")
    extra_h, extra_w = height - sample.size[0], width - sample.size[1]
    if extra_h < 0 or extra_w < 0:
        raise ValueError(f"cannot pad a {sample.size} sample to the smaller size {(height, width)}")
    if extra_h == 0 and extra_w == 0:
        return sample

    def pad(array: Optional[np.ndarray], value) -> Optional[np.ndarray]:
        if array is None:
            return None
        widths = [(0, 0)] * (array.ndim - 2) + [(0, extra_h), (0, extra_w)]
        return np.pad(array, widths, constant_values=value)

    image = pad(sample.image, 0.0)
    return replace(sample, image=image, masks=pad(sample.masks, False), sem_seg=pad(sample.sem_seg, IGNORE_LABEL),
                   ignore_mask=pad(sample.ignore_mask, True))


def shortest_edge_size(height: int, width: int, *, short: int, max_size: int) -> Tuple[int, int]:
    """Output size with the shortest edge ``short`` and the longest at most ``max_size`` (aspect kept)."""
    scale = short / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


# ---------------------------------------------------------------- random steps
def category_capped_crop_box(size: Tuple[int, int], sem_seg: Optional[np.ndarray], *, crop_size: Tuple[int, int],
                             max_area: float, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of at most ``crop_size`` inside an image resized to
    ``size``; ``sem_seg`` may be at the size before that resize (it is sampled like :func:`resize`).

    With ``max_area`` < 1 the crop is drawn again (up to 10 times) until no single class covers
    ``max_area`` or more of the crop's labelled (non-255) pixels; the last draw is kept otherwise.
    """
    height, width = size
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)

    def draw() -> Tuple[int, int, int, int]:
        return int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1)), crop_h, crop_w

    if max_area >= 1.0 or sem_seg is None:
        return draw()
    rows = _nearest_indices(height, sem_seg.shape[0])
    cols = _nearest_indices(width, sem_seg.shape[1])
    for _ in range(CROP_TRIES):
        box = draw()
        top, left, _, _ = box
        window = sem_seg[np.ix_(rows[top:top + crop_h], cols[left:left + crop_w])]
        counts = np.bincount(window.ravel(), minlength=IGNORE_LABEL + 1)
        counts[IGNORE_LABEL] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() < max_area * counts.sum():
            break
    return box


def color_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness (+-32), contrast and saturation (x0.5..1.5), each applied with probability 0.5."""
    out = image.astype(np.float32)
    if rng.random() < 0.5:
        out += rng.uniform(-32.0, 32.0)
    if rng.random() < 0.5:
        gray_mean = float((out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
        out = (out - gray_mean) * rng.uniform(0.5, 1.5) + gray_mean
    if rng.random() < 0.5:
        gray = (out @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
        out = (out - gray) * rng.uniform(0.5, 1.5) + gray
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def drop_empty_masks(sample: Sample) -> Sample:
    if sample.masks is None or len(sample.masks) == 0:
        return sample
    keep = sample.masks.reshape(len(sample.masks), -1).any(axis=1)
    if keep.all():
        return sample
    return replace(sample, masks=sample.masks[keep], labels=sample.labels[keep])


class Normalize:
    """(image / 255 - pixel_mean) / pixel_std, TAO's scale; uint8 [H, W, 3] in, float32 [3, H, W] out.

    Computed as (image - 255 * pixel_mean) / (255 * pixel_std), the arithmetic of the 0..255 statistics
    imported Hugging Face and detectron2 models were trained with.
    """

    def __init__(self, *, pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> None:
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"dataset.pixel_mean and dataset.pixel_std need 3 values each, got {list(pixel_mean)} "
                             f"and {list(pixel_std)}")
        if min(pixel_std) <= 0:
            raise ValueError(f"dataset.pixel_std must be > 0, got {list(pixel_std)}")
        if max(*pixel_mean, *pixel_std) > 1:
            raise ValueError(f"dataset.pixel_mean {list(pixel_mean)} and dataset.pixel_std {list(pixel_std)} must be "
                             "on the 0..1 scale (the image is divided by 255 first)")
        self.mean = (np.asarray(pixel_mean, dtype=np.float64) * 255.0).astype(np.float32)[:, None, None]
        std_255 = (np.asarray(pixel_std, dtype=np.float64) * 255.0).astype(np.float32)
        self.inv_std = (1.0 / std_255)[:, None, None]

    def __call__(self, sample: Sample) -> Sample:
        _require_unnormalized(sample, "Normalize")
        image = np.ascontiguousarray(sample.image.transpose(2, 0, 1)).astype(np.float32)  # transpose as uint8
        image -= self.mean
        image *= self.inv_std
        return replace(sample, image=image, normalized=True)


# ---------------------------------------------------------------- pipelines
class TrainTransform:
    """Training augmentation driven by ``dataset.augmentation`` (see the module docstring)."""

    def __init__(self, *, train_min_size: Sequence[int], train_max_size: int, train_crop_size: Sequence[int],
                 hflip_prob: float, color_jitter: bool, crop_single_category_max_area: float,
                 large_scale_jitter: bool, lsj_scale_range: Sequence[float], pixel_mean: Sequence[float],
                 pixel_std: Sequence[float]) -> None:
        if not train_min_size:
            raise ValueError("dataset.augmentation.train_min_size needs at least one size")
        if len(train_crop_size) != 2:
            raise ValueError(f"dataset.augmentation.train_crop_size must be [height, width], got "
                             f"{list(train_crop_size)}")
        if len(lsj_scale_range) != 2 or not 0 < lsj_scale_range[0] <= lsj_scale_range[1]:
            raise ValueError(f"dataset.augmentation.lsj_scale_range must be [low, high] with 0 < low <= high, got "
                             f"{list(lsj_scale_range)}")
        self.min_sizes = [int(s) for s in train_min_size]
        self.max_size = int(train_max_size)
        self.crop_size = (int(train_crop_size[0]), int(train_crop_size[1]))
        self.hflip_prob = float(hflip_prob)
        self.color_jitter = bool(color_jitter)
        self.max_area = float(crop_single_category_max_area)
        self.large_scale_jitter = bool(large_scale_jitter)
        self.scale_range = (float(lsj_scale_range[0]), float(lsj_scale_range[1]))
        self.normalize = Normalize(pixel_mean=pixel_mean, pixel_std=pixel_std)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() < self.hflip_prob:  # first: on the smallest arrays (same distribution as last)
            sample = hflip(sample)
        if self.large_scale_jitter:
            return self._large_scale_jitter(sample, rng)
        height, width = sample.size
        short = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        size = shortest_edge_size(height, width, short=short, max_size=self.max_size)
        box = category_capped_crop_box(size, sample.sem_seg, crop_size=self.crop_size, max_area=self.max_area,
                                       rng=rng)
        sample = resized_crop(sample, size=size, box=box)
        if self.color_jitter:
            sample = replace(sample, image=color_jitter(sample.image, rng))
        return self.normalize(drop_empty_masks(sample))

    def _large_scale_jitter(self, sample: Sample, rng: np.random.Generator) -> Sample:
        height, width = sample.size
        factor = rng.uniform(*self.scale_range)
        scale = min(factor * self.crop_size[0] / height, factor * self.crop_size[1] / width)
        size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
        box = category_capped_crop_box(size, sample.sem_seg, crop_size=self.crop_size, max_area=self.max_area,
                                       rng=rng)
        sample = resized_crop(sample, size=size, box=box)
        if self.color_jitter:
            sample = replace(sample, image=color_jitter(sample.image, rng))
        sample = self.normalize(drop_empty_masks(sample))
        return pad_bottom_right(sample, *self.crop_size)


class EvalTransform:
    """Shortest edge ``test_min_size``, longest edge at most ``test_max_size``, then normalisation."""

    def __init__(self, *, test_min_size: int, test_max_size: int, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float]) -> None:
        self.min_size = int(test_min_size)
        self.max_size = int(test_max_size)
        self.normalize = Normalize(pixel_mean=pixel_mean, pixel_std=pixel_std)

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        """Deterministic; ``rng`` is accepted so training and evaluation transforms share one call form."""
        height, width = sample.size
        sample = resize(sample, *shortest_edge_size(height, width, short=self.min_size, max_size=self.max_size))
        return self.normalize(drop_empty_masks(sample))
