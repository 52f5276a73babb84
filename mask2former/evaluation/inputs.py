"""Network inputs for evaluation and inference, resized the way the runner needs them.

- Any-size runners (PyTorch checkpoints): the dataset's own evaluation transform (shortest edge
  ``test_min_size``, longest edge at most ``test_max_size``), batches padded to ``size_divisibility``.
- Fixed-size runners (ONNX / TensorRT exported at H x W): :class:`FitTransform` resizes so the image
  fits inside H x W with its aspect ratio kept, and :func:`collate_to_size` pads every batch to exactly
  H x W (bottom/right).

Either way each item's ``image_size`` (after resize, before padding) and ``orig_size`` travel in the
batch metas, so predictions are mapped back to the original resolution.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.build import build_eval_transform
from ..data.dataset import SegmentationDataset, collate_batch
from ..data.transforms import Normalize, Sample, resize


def fit_size(height: int, width: int, *, box: Tuple[int, int]) -> Tuple[int, int]:
    """The largest (height, width) with the image's aspect ratio that fits inside ``box`` (H, W)."""
    scale = min(box[0] / height, box[1] / width)
    return (min(box[0], max(1, int(height * scale + 0.5))), min(box[1], max(1, int(width * scale + 0.5))))


class FitTransform:
    """Resize to fit inside ``box`` (aspect ratio kept; bilinear), then normalise. Padding happens at
    collation, so the sample's size stays the resized image size."""

    def __init__(self, *, box: Tuple[int, int], pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> None:
        if len(box) != 2 or min(box) < 1:
            raise ValueError(f"FitTransform: box must be a positive (height, width); got {box}")
        self.box = (int(box[0]), int(box[1]))
        self.normalize = Normalize(pixel_mean=pixel_mean, pixel_std=pixel_std)

    def __call__(self, sample: Sample, rng: Any = None) -> Sample:
        """Deterministic; ``rng`` is accepted for the datasets' transform call form."""
        height, width = sample.size
        return self.normalize(resize(sample, *fit_size(height, width, box=self.box)))


def collate_to_size(items: Sequence[Dict[str, Any]], *, size: Tuple[int, int]) -> Dict[str, Any]:
    """:func:`collate_batch`, then pad the images to exactly ``size`` (H, W); metas' padded_size follows.
    Items must already fit inside ``size`` (see :class:`FitTransform`)."""
    batch = collate_batch(items, size_divisibility=1)
    images = batch["images"]
    height, width = size
    if images.shape[-2] > height or images.shape[-1] > width:
        raise ValueError(f"collate_to_size: a {tuple(images.shape[-2:])} batch does not fit in {size}")
    padded = images.new_zeros(images.shape[:2] + (height, width))
    padded[..., :images.shape[-2], :images.shape[-1]] = images
    batch["images"] = padded
    for meta in batch["metas"]:
        meta["padded_size"] = (height, width)
    return batch


class GroundTruthImages(Dataset):
    """The images of an annotated dataset with their ground truth at the original resolution (the
    dataset's target size when it has one).

    Items: {"image", "image_id", "file_name", "orig_size", "image_size", "ground_truth"}: the training
    targets at the resized resolution are never built; the ground truth is read in the loader's workers.
    """

    def __init__(self, source: SegmentationDataset, *, transform: Any) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        record = self.source.records[index]
        sample = self.transform(Sample(image=self.source.load_image(record.image_id)))
        return {"image": torch.from_numpy(sample.image),
                "image_id": record.image_id, "file_name": record.file_name,
                "orig_size": (record.height, record.width), "image_size": sample.size,
                "ground_truth": self.source.load_ground_truth(record.image_id)}


def _collate_with_ground_truth(items: Sequence[Dict[str, Any]], *, collate) -> Dict[str, Any]:
    ground_truths = [item.get("ground_truth") for item in items]
    batch = collate([{k: v for k, v in item.items() if k != "ground_truth"} for item in items])
    if any(gt is not None for gt in ground_truths):
        batch["ground_truths"] = ground_truths
    return batch


def input_transform(*, dataset_cfg: Any, fixed_input_size: Optional[Tuple[int, int]]):
    """The evaluation transform of the spec, or a :class:`FitTransform` for a fixed-size runner."""
    if fixed_input_size is not None:
        return FitTransform(box=tuple(fixed_input_size), pixel_mean=dataset_cfg.pixel_mean,
                            pixel_std=dataset_cfg.pixel_std)
    return build_eval_transform(dataset_cfg)


def build_loader(dataset: Dataset, *, batch_size: int, num_workers: int, size_divisibility: int,
                 fixed_input_size: Optional[Tuple[int, int]]) -> DataLoader:
    """A loader over every item of ``dataset`` in order (no shuffling, no dropped tail batch). Batches are
    {"images", "metas"[, "ground_truths"]}; images padded to ``fixed_input_size`` or to a multiple of
    ``size_divisibility``."""
    if fixed_input_size is not None:
        collate = partial(collate_to_size, size=tuple(fixed_input_size))
    else:
        collate = partial(collate_batch, size_divisibility=size_divisibility)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                      collate_fn=partial(_collate_with_ground_truth, collate=collate))


def batch_chunks(images: torch.Tensor, max_batch_size: Optional[int]):
    """Slices of at most ``max_batch_size`` images (the whole batch when None)."""
    step = images.shape[0] if not max_batch_size else int(max_batch_size)
    for start in range(0, images.shape[0], step):
        yield images[start:start + step]
