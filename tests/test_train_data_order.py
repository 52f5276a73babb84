"""The training data order: a function of (seed, epoch, rank, world size), so that a run resumed mid-epoch
trains on exactly the batches, in exactly the order, of the run that was never interrupted."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from itertools import chain
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

import pytest
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from mask2former import results
from mask2former.actions.job import Job
from mask2former.actions.train import run
from mask2former.config import load_spec
from mask2former.training.data_order import (DataPosition, TrainingOrderSampler, epoch_permutation,
                                             resume_position)
from mask2former.training.datamodule import Mask2FormerDataModule
from mask2former.training.lightning_module import Mask2FormerModule
from mask2former.training.session import ResumePoint, data_start, read_resume_point
from mask2former.training.worker import build_parser, resume_point, worker_arguments
from train_support import REPO, make_data, tiny_spec, write_spec

# 8 images, batch 2: 4 steps per epoch, a checkpoint after every step
TWO_EPOCHS = {"train.num_epochs": 2, "train.checkpoint_interval": 1, "train.checkpoint_interval_unit": "step"}

TrainedBatch = Tuple[int, int, Tuple[int, ...]]  # (1-based epoch, 1-based step, image ids)


# ---------------------------------------------------------------------------------------------- the sampler
def test_the_order_is_a_permutation_given_by_seed_and_epoch_alone():
    sampler = TrainingOrderSampler(20, seed=7)
    for epoch in range(3):  # iterating earlier epochs leaves no trace in later ones
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(20))
    sampler.set_epoch(3)
    fresh = TrainingOrderSampler(20, seed=7)
    fresh.set_epoch(3)
    assert list(sampler) == list(fresh) == epoch_permutation(20, seed=7, epoch=3)
    assert list(sampler) == list(sampler)
    assert epoch_permutation(20, seed=7, epoch=3) != epoch_permutation(20, seed=7, epoch=4)
    assert epoch_permutation(20, seed=7, epoch=3) != epoch_permutation(20, seed=8, epoch=3)
    assert epoch_permutation(20, seed=7, epoch=1) != epoch_permutation(20, seed=8, epoch=0)


@pytest.mark.parametrize("num_items, world_size", [(10, 4), (8, 2), (3, 4), (2, 5), (7, 1)])
def test_the_shards_of_all_ranks_cover_the_data_set_with_distributed_sampler_padding(num_items, world_size):
    order = epoch_permutation(num_items, seed=3, epoch=1)
    samplers = [TrainingOrderSampler(num_items, seed=3, num_replicas=world_size, rank=rank, start_epoch=1)
                for rank in range(world_size)]
    shards = [list(sampler) for sampler in samplers]
    per_rank = math.ceil(num_items / world_size)
    assert [len(shard) for shard in shards] == [len(sampler) for sampler in samplers] == [per_rank] * world_size
    assert set(chain(*shards)) == set(range(num_items))
    for rank, shard in enumerate(shards):  # torch's DistributedSampler, in order, applied to the shuffled order
        positions = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=False)
        assert shard == [order[position] for position in positions]


def test_skipping_k_batches_yields_the_tail_of_the_same_order_in_the_resumed_epoch_only():
    batch_size, k = 2, 2
    full = TrainingOrderSampler(11, seed=5, num_replicas=2, rank=1)
    full.set_epoch(2)
    resumed = TrainingOrderSampler(11, seed=5, num_replicas=2, rank=1, start_epoch=2, skip=k * batch_size)
    assert list(resumed) == list(full)[k * batch_size:]
    assert len(resumed) == len(full) == 6  # the whole epoch: Lightning counts on from the batches done
    batches = [batch.tolist() for batch in DataLoader(range(11), batch_size=batch_size, sampler=full)]
    assert [batch.tolist() for batch in DataLoader(range(11), batch_size=batch_size, sampler=resumed)] == batches[k:]
    full.set_epoch(3)
    resumed.set_epoch(3)
    assert list(resumed) == list(full)


@pytest.mark.parametrize("saved_epoch, global_step, expected", [
    (1, 2, DataPosition(epoch=0, batch=2)),   # mid-epoch 1
    (1, 4, DataPosition(epoch=1, batch=0)),   # end of epoch 1: epoch 2 from its start
    (2, 6, DataPosition(epoch=1, batch=2)),   # mid-epoch 2
    (2, 8, DataPosition(epoch=2, batch=0)),
    (2, 3, None),                             # step 3 is not in epoch 2 at 4 steps per epoch
    (1, 5, None),
])
def test_the_resume_position_comes_from_the_checkpoints_epoch_and_step(saved_epoch, global_step, expected):
    assert resume_position(saved_epoch=saved_epoch, global_step=global_step, steps_per_epoch=4) == expected


def test_a_checkpoint_of_another_epoch_length_is_resumed_in_a_new_order_with_a_warning(tmp_path):
    status = results.StatusWriter(tmp_path)
    resume = ResumePoint(checkpoint=tmp_path / "model.pth", epoch=2, global_step=3)
    start = data_start(resume, epoch_steps=4, log=logging.getLogger("test"), status=status, report=True)
    assert start == DataPosition(epoch=1, batch=0)
    assert results.read_status(tmp_path)[-1]["message"].startswith("Cannot continue the data order of model.pth")


def test_the_data_module_gives_each_rank_its_shard_and_validation_a_sharded_sequential_sampler():
    def loaders(world_size: int, rank: int):
        data = Mask2FormerDataModule(train_dataset=list(range(11)), val_dataset=list(range(5)), train_batch_size=2,
                                     val_batch_size=1, train_workers=0, val_workers=0, size_divisibility=32, seed=5,
                                     train_start=DataPosition(epoch=2, batch=1))
        data.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
        return data.train_dataloader(), data.val_dataloader()

    train, val = loaders(2, 1)
    expected = TrainingOrderSampler(11, seed=5, num_replicas=2, rank=1, start_epoch=2, skip=2)
    assert list(train.sampler) == list(expected) and len(train) == 3
    assert isinstance(val.sampler, DistributedSampler) and not val.sampler.shuffle
    assert list(val.sampler) == [1, 3, 0]  # rank 1 of 2 over 5 images: padded with image 0
    train, val = loaders(1, 0)
    assert list(train.sampler) == epoch_permutation(11, seed=5, epoch=2)[2:]
    assert isinstance(val.sampler, SequentialSampler)


# ---------------------------------------------------------------------------------------------- whole runs
def _job(folder: Path) -> Job:
    folder.mkdir(parents=True, exist_ok=True)
    return Job(action="train", results_dir=folder, status=results.StatusWriter(folder),
               log=logging.getLogger("test.train"))


def _record_trained_batches(monkeypatch: pytest.MonkeyPatch) -> List[TrainedBatch]:
    """The image ids of every training batch, in the order the optimizer steps take them."""
    trained: List[TrainedBatch] = []

    def record(module: Mask2FormerModule, batch, batch_idx: int) -> None:
        trained.append((module.current_epoch + 1, module.global_step + 1,
                        tuple(meta["image_id"] for meta in batch["metas"])))

    monkeypatch.setattr(Mask2FormerModule, "on_train_batch_start", record)
    return trained


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    roots = make_data(tmp_path_factory.mktemp("data"), images=8, val_images=None, size=64)
    return tiny_spec(roots, batch_size=2)


@pytest.fixture(scope="module")
def uninterrupted(spec, tmp_path_factory):
    """A 2-epoch run that is never interrupted: its results folder and its trained batches."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        trained = _record_trained_batches(monkeypatch)
        run(load_spec("train", spec=spec, overrides=TWO_EPOCHS), _job(folder))
    return folder, trained


def test_an_uninterrupted_run_sees_every_image_once_per_epoch_in_a_new_order(uninterrupted):
    _, trained = uninterrupted
    assert [(epoch, step) for epoch, step, _ in trained] == [(1, 1), (1, 2), (1, 3), (1, 4),
                                                             (2, 5), (2, 6), (2, 7), (2, 8)]
    epochs = [[image for _, _, ids in trained[start:start + 4] for image in ids] for start in (0, 4)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(1, 9))
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("interrupted_after, workers", [(2, 0), (4, 0), (6, 0), (6, 2)],
                         ids=["mid-epoch-1", "end-of-epoch-1", "mid-epoch-2", "mid-epoch-2-with-loader-workers"])
def test_a_resumed_run_trains_on_the_batches_of_the_uninterrupted_run(uninterrupted, spec, tmp_path, monkeypatch,
                                                                      recwarn, caplog, interrupted_after, workers):
    source, expected = uninterrupted
    # The job was killed after step `interrupted_after`: that step's checkpoint is its newest file.
    checkpoint = next(c.path for c in results.list_checkpoints(source) if c.step == interrupted_after)
    folder = tmp_path / "job"
    folder.mkdir()
    shutil.copy(checkpoint, folder / checkpoint.name)

    trained = _record_trained_batches(monkeypatch)
    with caplog.at_level(logging.INFO, logger="test.train"):
        run(load_spec("train", spec=spec, overrides=dict(TWO_EPOCHS, **{"dataset.train.num_workers": workers})),
            _job(folder))

    assert trained == expected[interrupted_after:]
    assert not [w for w in recwarn if "dataloader is not resumable" in str(w.message)]
    resumed = [line["message"] for line in results.read_status(folder) if line["message"].startswith("Resuming epoch")]
    if interrupted_after % 4:
        message = f"Resuming epoch {interrupted_after // 4 + 1} at batch 3 of 4, in the interrupted run's data order"
        assert resumed == [message] and message in caplog.messages
    else:
        assert resumed == []


def test_a_worker_rank_resumes_from_the_same_position_as_the_train_action(uninterrupted, spec):
    source, _ = uninterrupted
    checkpoint = source / results.checkpoint_name(2, 6)
    config = load_spec("train", spec=spec, overrides={"train.resume_training_checkpoint_path": str(checkpoint)})
    # the action reads the position once and hands it to the worker command, which parses it back
    command = ["--spec", "resolved.yaml", "--results-dir", str(source)]
    args = build_parser().parse_args(command + worker_arguments(read_resume_point(checkpoint)))
    assert resume_point(config, args) == ResumePoint(checkpoint=checkpoint, epoch=2, global_step=6)
    assert resume_point(load_spec("train", spec=spec), build_parser().parse_args(command)) is None


# ---------------------------------------------------------------------------------------------- two ranks
# Loaded by every process of the CLI run (rank 0 and its worker rank) through PYTHONPATH: records the image ids
# of each training batch in rank<R>.jsonl, as _record_trained_batches does in this process.
RECORDING_SITECUSTOMIZE = '''
import json
import os

from mask2former.training.lightning_module import Mask2FormerModule


def _record(module, batch, batch_idx):
    path = os.path.join(os.environ["TRAINED_BATCHES_DIR"], f"rank{module.global_rank}.jsonl")
    with open(path, "a") as handle:
        ids = [meta["image_id"] for meta in batch["metas"]]
        handle.write(json.dumps([module.current_epoch + 1, module.global_step + 1, ids]) + "\\n")


Mask2FormerModule.on_train_batch_start = _record
'''


def _train_two_ranks(spec_path: Path, folder: Path, hooks: Path) -> Dict[int, List[list]]:
    """Train with 2 CPU ranks through the CLI, recording; each rank's trained batches."""
    records = folder.parent / f"{folder.name}-batches"
    records.mkdir()
    command = [sys.executable, "-m", "mask2former", "train", "-e", str(spec_path), "--results-dir", str(folder),
               "train.num_gpus=2", "train.gpu_ids=[0,1]", "train.num_epochs=2", "train.checkpoint_interval=1",
               "train.checkpoint_interval_unit=step"]
    env = dict(os.environ, PYTHONPATH=f"{hooks}{os.pathsep}{REPO}", TRAINED_BATCHES_DIR=str(records))
    result = subprocess.run(command, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {rank: [json.loads(line) for line in (records / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}


def test_every_rank_of_a_resumed_data_parallel_run_trains_on_the_uninterrupted_runs_batches(tmp_path):
    roots = make_data(tmp_path / "data", images=8, val_images=None, size=64)
    spec_path = write_spec(tmp_path / "spec.yaml", tiny_spec(roots, batch_size=1))  # 4 steps per epoch
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(RECORDING_SITECUSTOMIZE)

    expected = _train_two_ranks(spec_path, tmp_path / "uninterrupted", hooks)
    assert [[step for _, step, _ in expected[rank]] for rank in (0, 1)] == [list(range(1, 9))] * 2
    first_epoch = [image for rank in (0, 1) for _, step, ids in expected[rank] if step <= 4 for image in ids]
    assert sorted(first_epoch) == list(range(1, 9))  # the ranks' shards cover the data set

    # The job was killed after step 6, in epoch 2: that step's checkpoint is its newest file.
    checkpoint = tmp_path / "uninterrupted" / results.checkpoint_name(2, 6)
    (tmp_path / "job").mkdir()
    shutil.copy(checkpoint, tmp_path / "job" / checkpoint.name)
    resumed = _train_two_ranks(spec_path, tmp_path / "job", hooks)
    assert resumed == {rank: expected[rank][6:] for rank in (0, 1)}
