"""One training process: datasets, network, Lightning Trainer, fit; the same code on every rank.

The train action (local rank 0) and the worker processes (other ranks, :mod:`mask2former.training.worker`)
both call :func:`run_training`; only rank 0 writes status lines and files.

Resume: Lightning restores weights, optimizer, schedule and loop counters from the checkpoint; the data order
(:mod:`mask2former.training.data_order`) continues from the position the checkpoint's own "epoch" and
"global_step" give, so the resumed run trains on the batches the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from .. import results
from ..checkpoint import CheckpointError, read_checkpoint
from ..data.build import build_datasets
from ..data.dataset import SegmentationDataset
from ..evaluation.pipeline import build_evaluator
from ..model import build_model
from ..model.criterion import build_criterion
from .callbacks import AtomicCheckpointIO, CheckpointSaver, ReplicaCheck, StatusReporter
from .data_order import DataPosition, resume_position
from .datamodule import DATA_ERRORS, Mask2FormerDataModule, error_message
from .distributed import DevicePlan
from .tracking import finish_run, mlflow_logger
from .errors import DatasetError, TrainingSetupError
from .wandb_logger import wandb_logger
from .initialization import freeze_parameters, load_backbone_weights, load_pretrained_model
from .lightning_module import Mask2FormerModule

LOG_EVERY_N_STEPS = 20
LOGS_DIR = "logs"
# Lightning's warning for a run resumed mid-epoch, written for loaders that redraw the interrupted epoch
NOT_RESUMABLE_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"


@dataclass
class TrainingDatasets:
    train: SegmentationDataset
    val: Optional[SegmentationDataset]


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint with training state to continue from, and the progress its payload records."""

    checkpoint: Path
    epoch: int        # payload "epoch": the 1-based epoch its last optimizer step belongs to
    global_step: int  # payload "global_step": the optimizer steps done


@dataclass
class TrainingOutcome:
    """What a finished run reports (rank 0's view; other ranks hold the same validation numbers)."""

    epochs: int
    global_step: int
    train_loss: Optional[float]
    last_validation: Optional[Dict[str, Any]]  # {"epoch", "global_step", "metrics", "summary"}
    best: Optional[Dict[str, Any]]             # best_model.json
    latest_checkpoint: Optional[Path]


def has_validation_split(config: Any) -> bool:
    val = config.dataset.val
    return any(getattr(val, key) for key in ("img_dir", "instance_json", "panoptic_json", "panoptic_dir",
                                             "annot_file"))


def build_training_datasets(config: Any) -> TrainingDatasets:
    """Train (and val, when set) datasets; a reader error becomes a DatasetError naming the file."""
    datasets = {}
    for split in ("train", "val"):
        if split == "val" and not has_validation_split(config):
            datasets[split] = None
            continue
        try:
            datasets[split] = build_datasets(config, split)
        except DATA_ERRORS as error:
            raise DatasetError(error_message(split, error)) from None
    if len(datasets["train"]) == 0:
        raise DatasetError(f"dataset.train: the annotation file lists no images ({_annotation_file(config)}).")
    if datasets["val"] is not None and len(datasets["val"]) == 0:
        raise DatasetError("dataset.val: the annotation file lists no images.")
    return TrainingDatasets(train=datasets["train"], val=datasets["val"])


def _annotation_file(config: Any) -> str:
    split = config.dataset.train
    return str({"coco_panoptic": split.panoptic_json, "ade": split.annot_file}.get(split.type, split.instance_json))


RESUME_KEYS = ("optimizer_states", "lr_schedulers", "loops")


def read_resume_point(path: Path, encryption_key: Optional[str] = None) -> ResumePoint:
    """The training position a resume checkpoint holds; TrainingSetupError when it cannot be read or holds
    weights only."""
    try:
        payload = read_checkpoint(path, encryption_key=encryption_key)
    except CheckpointError as error:
        raise TrainingSetupError(f"Cannot resume: {error}") from None
    missing = [key for key in RESUME_KEYS if key not in payload]
    if missing:
        raise TrainingSetupError(f"Cannot resume from '{path}': it holds no training state ({', '.join(missing)}); "
                                 "it is a weights-only checkpoint: give it as train.pretrained_model_path instead.")
    return ResumePoint(checkpoint=Path(path), epoch=int(payload.get("epoch", 0)),
                       global_step=int(payload.get("global_step", 0)))


def find_resume_checkpoint(results_dir: Path, explicit: Optional[str]) -> Optional[Path]:
    """``explicit`` when given, else the newest checkpoint of the results folder (a retried job), else None."""
    if explicit:
        return Path(explicit)
    checkpoints = results.list_checkpoints(results_dir)
    if checkpoints:
        return checkpoints[-1].path
    latest = Path(results_dir) / results.LATEST_CHECKPOINT
    return latest if latest.is_file() else None


def build_network(config: Any):
    """The network with its starting weights and frozen parameters, and the criterion."""
    model_cfg = copy.deepcopy(config.model)
    backbone_weights = model_cfg.backbone.pretrained_weights
    model_cfg.backbone.pretrained_weights = None  # loaded below, with a report
    model = build_model(model_cfg)
    if backbone_weights:
        load_backbone_weights(model, Path(backbone_weights), format=model_cfg.backbone.type)
    if config.train.pretrained_model_path:
        load_pretrained_model(model, Path(config.train.pretrained_model_path), encryption_key=config.encryption_key,
                              contiguous_id=config.dataset.contiguous_id)
    freeze_parameters(model, list(config.train.freeze))
    model.pixel_decoder.encoder.recompute_layers = config.train.recompute_pixel_decoder
    return model, build_criterion(config.model)


def _strategy(plan: DevicePlan) -> Any:
    if plan.strategy == "ddp":
        return DDPStrategy(find_unused_parameters=False)
    if plan.strategy == "fsdp":
        return FSDPStrategy(state_dict_type="full")
    return "auto"


def steps_per_epoch(config: Any, *, plan: DevicePlan, train_images: int) -> int:
    """Optimizer steps of one epoch: the batches of one rank (there is no gradient accumulation)."""
    return math.ceil(train_images / (config.dataset.train.batch_size * plan.world_size))


def data_start(resume: Optional[ResumePoint], *, epoch_steps: int, log: logging.Logger,
               status: results.StatusWriter, report: bool) -> DataPosition:
    """Where the training data order starts: after ``resume``'s last batch, else at the first batch of epoch 1.

    With ``report`` (rank 0), continuing an interrupted epoch, or failing to, is told in a log and status line.
    """
    if resume is None:
        return DataPosition()
    position = resume_position(saved_epoch=resume.epoch, global_step=resume.global_step,
                               steps_per_epoch=epoch_steps)
    if position is None:
        if report:
            message = (f"Cannot continue the data order of {resume.checkpoint.name}: its step {resume.global_step} "
                       f"is not in its epoch {resume.epoch} at {epoch_steps} steps per epoch (another batch size, "
                       "number of processes or training set); the rest of that epoch is drawn in a new order")
            log.warning(message)
            status.running(message)
        return DataPosition(epoch=max(0, resume.epoch - 1))
    if position.batch and report:
        message = (f"Resuming epoch {position.epoch + 1} at batch {position.batch + 1} of {epoch_steps}, in the "
                   "interrupted run's data order")
        log.info(message)
        status.running(message)
    return position


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _public_spec(config: Any) -> Dict[str, Any]:
    """The spec as a dict without its secret keys (never sent to a tracking server)."""
    from ..config.schema import secret_keys

    spec = dataclasses.asdict(config)
    for key in secret_keys():
        node = spec
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.get(part) or {}
        node.pop(leaf, None)
    return spec


def build_trainer(config: Any, *, plan: DevicePlan, results_dir: Path, status: results.StatusWriter,
                  log: logging.Logger, has_val: bool, epoch_steps: int) -> pl.Trainer:
    train = config.train
    progress_bar = sys.stderr.isatty()
    log_every = max(1, min(LOG_EVERY_N_STEPS, epoch_steps))
    callbacks = [
        CheckpointSaver(results_dir=results_dir, interval=train.checkpoint_interval,
                        unit=train.checkpoint_interval_unit, max_epochs=train.num_epochs),
        StatusReporter(status=status, log=log, max_epochs=train.num_epochs,
                       log_every_n_steps=None if progress_bar else log_every),
        ReplicaCheck(log=log),
        LearningRateMonitor(logging_interval="step"),
    ]
    logs = results_dir / LOGS_DIR
    # version_N folders: a resumed attempt adds its own logs next to the interrupted one's
    loggers = [TensorBoardLogger(save_dir=str(logs), name="tensorboard"), CSVLogger(save_dir=str(logs), name="csv")]
    trackers = (wandb_logger(config.wandb, save_dir=logs / "wandb"),
                mlflow_logger(config.mlflow, results_dir=results_dir, params=_public_spec(config), log=log)
                if _is_rank_zero() else None)
    loggers += [tracker for tracker in trackers if tracker is not None]
    torch.backends.cudnn.benchmark = train.cudnn.benchmark
    torch.backends.cudnn.deterministic = train.cudnn.deterministic
    return pl.Trainer(
        fast_dev_run=train.is_dry_run,
        accelerator=plan.accelerator, devices=plan.devices, num_nodes=plan.num_nodes, strategy=_strategy(plan),
        precision=plan.precision, max_epochs=train.num_epochs,
        use_distributed_sampler=False,  # the data module shards both splits (training in its own resumable order)
        check_val_every_n_epoch=train.validation_interval, limit_val_batches=None if has_val else 0,
        num_sanity_val_steps=0, gradient_clip_val=train.clip_grad_norm or None, gradient_clip_algorithm="norm",
        callbacks=callbacks, logger=loggers, enable_checkpointing=False, enable_progress_bar=progress_bar,
        enable_model_summary=False, log_every_n_steps=log_every, default_root_dir=str(results_dir),
        plugins=[AtomicCheckpointIO(encryption_key=config.encryption_key)],
    )


def run_training(config: Any, *, plan: DevicePlan, datasets: TrainingDatasets, results_dir: Path,
                 status: results.StatusWriter, log: logging.Logger, resume: Optional[ResumePoint]) -> TrainingOutcome:
    """Fit the model of ``config`` (local paths only) and report; continues ``resume`` when given."""
    pl.seed_everything(config.train.seed, workers=True, verbose=False)
    model, criterion = build_network(config)
    evaluator_factory = (lambda: build_evaluator(config, datasets.val)) if datasets.val is not None else None
    label_map = datasets.train.label_map
    module = Mask2FormerModule(config=config, model=model, criterion=criterion, label_map=label_map,
                               evaluator_factory=evaluator_factory)
    epoch_steps = steps_per_epoch(config, plan=plan, train_images=len(datasets.train))
    trainer = build_trainer(config, plan=plan, results_dir=results_dir, status=status, log=log,
                            has_val=datasets.val is not None, epoch_steps=epoch_steps)
    if trainer.is_global_zero:
        log.info("Training on %s: %d training images%s, %d epochs%s", plan.describe(), len(datasets.train),
                 f", {len(datasets.val)} validation images" if datasets.val is not None else " (no validation)",
                 config.train.num_epochs, f", resuming from {resume.checkpoint}" if resume else "")
    train_start = data_start(resume, epoch_steps=epoch_steps, log=log, status=status, report=trainer.is_global_zero)
    augmentation = config.dataset.augmentation
    data = Mask2FormerDataModule(
        train_dataset=datasets.train, val_dataset=datasets.val, train_batch_size=config.dataset.train.batch_size,
        val_batch_size=config.dataset.val.batch_size, train_workers=config.dataset.train.num_workers,
        val_workers=config.dataset.val.num_workers, size_divisibility=augmentation.size_divisibility,
        seed=config.train.seed, train_start=train_start)
    with warnings.catch_warnings():
        # Lightning warns that a run resumed mid-epoch redraws the rest of that epoch from a fresh order; our
        # training loader continues the interrupted order instead (data_start above tells so).
        warnings.filterwarnings("ignore", message=NOT_RESUMABLE_WARNING, category=PossibleUserWarning)
        trainer.fit(module, datamodule=data, ckpt_path=str(resume.checkpoint) if resume else None)
    saver = next(c for c in trainer.callbacks if isinstance(c, CheckpointSaver))
    latest = results_dir / results.LATEST_CHECKPOINT
    best = results.read_best(results_dir) if saver.best_value is not None else None
    tracked = next((lg for lg in trainer.loggers if type(lg).__name__ == "MLFlowLogger"), None)
    if tracked is not None and trainer.is_global_zero:
        finish_run(tracked, config.mlflow, results_dir=results_dir,
                   checkpoint=results_dir / best["checkpoint"] if best else latest)
    return TrainingOutcome(
        epochs=trainer.current_epoch, global_step=trainer.global_step,
        train_loss=module.last_epoch_loss, last_validation=module.last_validation,
        best=results.read_best(results_dir) if saver.best_value is not None else None,
        latest_checkpoint=latest if latest.is_file() else None)
