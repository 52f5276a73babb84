"""The order in which training sees its images: a function of (train.seed, epoch, rank, world size) only.

Every epoch shuffles the whole training set with a generator seeded by (seed, epoch). Under data parallelism
the shuffled order is padded to a multiple of the world size by repeating its first indices, and rank r takes
every world-size-th index starting at r (the semantics of torch's DistributedSampler), so every rank runs the
same number of batches.

Because nothing else goes into the order, a run resumed from a checkpoint taken in the middle of an epoch
continues that epoch with the batches the interrupted run had not trained yet, in the same order, and every
later epoch is the one an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DataPosition:
    """Where training picks up its data: the first ``batch`` batches of (0-based) ``epoch`` are done."""

    epoch: int = 0
    batch: int = 0


def resume_position(*, saved_epoch: int, global_step: int, steps_per_epoch: int) -> Optional[DataPosition]:
    """Where the data order continues after a checkpoint of 1-based ``saved_epoch`` taken after ``global_step``
    optimizer steps (one step per batch); the next epoch's start when that epoch was complete.

    None when the step does not fall into that epoch at ``steps_per_epoch``: the checkpoint was taken with
    another batch size, number of processes or training set, whose order cannot be continued.
    """
    done = global_step - (saved_epoch - 1) * steps_per_epoch
    if not 0 <= done <= steps_per_epoch:
        return None
    if done == steps_per_epoch:
        return DataPosition(epoch=saved_epoch, batch=0)
    return DataPosition(epoch=saved_epoch - 1, batch=done)


def epoch_permutation(num_items: int, *, seed: int, epoch: int) -> List[int]:
    """The shuffled order of the whole training set in ``epoch``.

    (seed, epoch) seed the generator together, so that epoch e of seed s and epoch e + 1 of seed s - 1 are
    unrelated orders.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_items).tolist()


def rank_shard(order: Sequence[int], *, num_replicas: int, rank: int) -> List[int]:
    """Rank ``rank``'s share of ``order``, padded cyclically to a multiple of ``num_replicas`` first."""
    padded_size = math.ceil(len(order) / num_replicas) * num_replicas
    padded = [order[i % len(order)] for i in range(padded_size)]
    return padded[rank::num_replicas]


class TrainingOrderSampler(Sampler[int]):
    """One rank's training indices, epoch by epoch (see the module docstring); Lightning calls
    :meth:`set_epoch` before each epoch.

    Args:
        num_items: the size of the training set.
        seed: ``train.seed``.
        num_replicas: the world size (1 without data parallelism).
        rank: this process's global rank.
        start_epoch: the (0-based) epoch training begins with. It is the sampler's epoch from the start,
            because Lightning may create the first epoch's iterator before its first ``set_epoch`` call
            (with loader workers, indices are drawn as soon as the iterator exists).
        skip: how many of this rank's indices of ``start_epoch`` to leave out: those of the batches trained
            before the run was interrupted (never loaded).
    """

    def __init__(self, num_items: int, *, seed: int, num_replicas: int = 1, rank: int = 0, start_epoch: int = 0,
                 skip: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        super().__init__()
        self.num_items = num_items
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.start_epoch = start_epoch
        self.skip = skip
        self.epoch = start_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, epoch: int) -> List[int]:
        """This rank's indices of the whole of ``epoch``, nothing skipped."""
        order = epoch_permutation(self.num_items, seed=self.seed, epoch=epoch)
        return rank_shard(order, num_replicas=self.num_replicas, rank=self.rank)

    def __iter__(self) -> Iterator[int]:
        skip = self.skip if self.epoch == self.start_epoch else 0
        return iter(self.shard(self.epoch)[skip:])

    def __len__(self) -> int:
        """The length of a whole epoch, also of the resumed one that yields fewer indices: Lightning counts
        that epoch's batches on from those done before the interruption and ends it after the last one."""
        return math.ceil(self.num_items / self.num_replicas)
