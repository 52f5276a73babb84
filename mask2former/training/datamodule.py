"""Training and validation data for Lightning: datasets from the spec, padded batches, clear data errors.

A sample that cannot be read (a corrupt image, a panoptic PNG of the wrong size, a malformed annotation)
does not surface as a DataLoader-worker traceback: the dataset wrapper turns the reader's error into a
batch marker, and :func:`check_batch` (run by the data module before each batch moves to the device)
raises :class:`DatasetError` with the reader's one-sentence message (which names the file) in the
training process.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Union

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data.dataset import collate_batch
from .data_order import DataPosition, TrainingOrderSampler
from .errors import DatasetError

ERROR_KEY = "data_error"
# Errors the data readers raise for bad inputs; each message names the file and the problem.
DATA_ERRORS = (ValueError, KeyError, OSError)


def error_message(split: str, error: BaseException) -> str:
    """The reader's message, prefixed with the split unless it already names a ``dataset.`` key first."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return text if text.startswith("dataset.") else f"dataset.{split}: {text}"


class ReportingDataset(Dataset):
    """Wraps a dataset so that a reader error becomes ``{ERROR_KEY: message}`` instead of a worker crash."""

    def __init__(self, dataset: Dataset, *, split: str) -> None:
        self.dataset = dataset
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        try:
            return self.dataset[index]
        except DATA_ERRORS as error:
            return {ERROR_KEY: error_message(self.split, error)}


def collate_or_report(items: Sequence[Dict[str, Any]], *, size_divisibility: int) -> Dict[str, Any]:
    """:func:`collate_batch`, or ``{ERROR_KEY: first message}`` when an item could not be read."""
    errors = [item[ERROR_KEY] for item in items if ERROR_KEY in item]
    if errors:
        return {ERROR_KEY: errors[0]}
    return collate_batch(items, size_divisibility=size_divisibility)


def check_batch(batch: Dict[str, Any]) -> Dict[str, Any]:
    """Raise :class:`DatasetError` for a batch that carries a data error; return it unchanged otherwise."""
    if ERROR_KEY in batch:
        raise DatasetError(batch[ERROR_KEY])
    return batch


class Mask2FormerDataModule(pl.LightningDataModule):
    """Loaders over already-built datasets (see :func:`mask2former.data.build.build_datasets`).

    Training draws its batches from a :class:`~mask2former.training.data_order.TrainingOrderSampler`: an
    order given by ``seed``, the epoch and the rank alone, sharded like torch's DistributedSampler under data
    parallelism, and starting at ``train_start`` (a resumed run continues the interrupted epoch's order).
    The Trainer must not replace it (``use_distributed_sampler=False``), so validation under data parallelism
    gets its DistributedSampler (in order) here, as Lightning would add it: its padding repeats a few images,
    and the validation step drops those repeats by image id, so every image is scored exactly once.
    """

    def __init__(self, *, train_dataset: Dataset, val_dataset: Optional[Dataset], train_batch_size: int,
                 val_batch_size: int, train_workers: int, val_workers: int, size_divisibility: int, seed: int,
                 train_start: DataPosition) -> None:
        super().__init__()
        self.train_dataset = ReportingDataset(train_dataset, split="train")
        self.val_dataset = ReportingDataset(val_dataset, split="val") if val_dataset is not None else None
        self.train_batch_size = train_batch_size
        self.val_batch_size = val_batch_size
        self.train_workers = train_workers
        self.val_workers = val_workers
        self.seed = seed
        self.train_start = train_start
        self.collate = functools.partial(collate_or_report, size_divisibility=size_divisibility)

    def on_before_batch_transfer(self, batch: Dict[str, Any], dataloader_idx: int) -> Dict[str, Any]:
        return check_batch(batch)

    def _loader(self, dataset: Dataset, *, batch_size: int, workers: int, sampler: Optional[Sampler]) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=self.collate, persistent_workers=workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        sampler = TrainingOrderSampler(len(self.train_dataset), seed=self.seed, num_replicas=self.trainer.world_size,
                                       rank=self.trainer.global_rank, start_epoch=self.train_start.epoch,
                                       skip=self.train_start.batch * self.train_batch_size)
        return self._loader(self.train_dataset, batch_size=self.train_batch_size, workers=self.train_workers,
                            sampler=sampler)

    def val_dataloader(self) -> Union[DataLoader, List[DataLoader]]:
        if self.val_dataset is None:
            return []  # no validation split: Lightning runs no validation
        world_size = self.trainer.world_size
        sampler = DistributedSampler(self.val_dataset, num_replicas=world_size, rank=self.trainer.global_rank,
                                     shuffle=False) if world_size > 1 else None
        return self._loader(self.val_dataset, batch_size=self.val_batch_size, workers=self.val_workers,
                            sampler=sampler)
