"""One training process: datasets, network, Lightning Trainer, fit; the same code on every rank.

The train action (local rank 0) and the worker processes (other ranks, :mod:`mask2former.training.worker`)
both call :func:`run_training`; only rank 0 writes status lines and files.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from .. import results
from ..data.build import build_datasets
from ..data.dataset import SegmentationDataset
from ..evaluation.pipeline import build_evaluator
from ..model import build_model
from ..model.criterion import build_criterion
from .callbacks import AtomicCheckpointIO, CheckpointSaver, ReplicaCheck, StatusReporter
from .datamodule import DATA_ERRORS, Mask2FormerDataModule, error_message
from .distributed import DevicePlan
from .errors import DatasetError
from .initialization import freeze_parameters, load_backbone_weights, load_pretrained_model
from .lightning_module import Mask2FormerModule

LOG_EVERY_N_STEPS = 20
LOGS_DIR = "logs"


@dataclass
class TrainingDatasets:
    train: SegmentationDataset
    val: Optional[SegmentationDataset]


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
    return any(getattr(val, key) for key in ("img_dir", "instance_json", "panoptic_json", "panoptic_dir"))


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
    return str(split.panoptic_json if split.type == "coco_panoptic" else split.instance_json)


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
        load_backbone_weights(model, Path(backbone_weights))
    if config.train.pretrained_model_path:
        load_pretrained_model(model, Path(config.train.pretrained_model_path), encryption_key=config.encryption_key)
    freeze_parameters(model, list(config.train.freeze))
    return model, build_criterion(config.model)


def _strategy(plan: DevicePlan) -> Any:
    if plan.strategy == "ddp":
        return DDPStrategy(find_unused_parameters=False)
    if plan.strategy == "fsdp":
        return FSDPStrategy(state_dict_type="full")
    return "auto"


def build_trainer(config: Any, *, plan: DevicePlan, results_dir: Path, status: results.StatusWriter,
                  log: logging.Logger, has_val: bool, train_images: int) -> pl.Trainer:
    train = config.train
    progress_bar = sys.stderr.isatty()
    steps_per_epoch = math.ceil(train_images / (config.dataset.train.batch_size * plan.world_size))
    log_every = max(1, min(LOG_EVERY_N_STEPS, steps_per_epoch))
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
    return pl.Trainer(
        accelerator=plan.accelerator, devices=plan.devices, num_nodes=plan.num_nodes, strategy=_strategy(plan),
        precision=plan.precision, max_epochs=train.num_epochs,
        check_val_every_n_epoch=train.validation_interval, limit_val_batches=None if has_val else 0,
        num_sanity_val_steps=0, gradient_clip_val=train.clip_grad_norm or None, gradient_clip_algorithm="norm",
        callbacks=callbacks, logger=loggers, enable_checkpointing=False, enable_progress_bar=progress_bar,
        enable_model_summary=False, log_every_n_steps=log_every, default_root_dir=str(results_dir),
        plugins=[AtomicCheckpointIO(encryption_key=config.encryption_key)],
    )


def run_training(config: Any, *, plan: DevicePlan, datasets: TrainingDatasets, results_dir: Path,
                 status: results.StatusWriter, log: logging.Logger,
                 resume_from: Optional[Path]) -> TrainingOutcome:
    """Fit the model of ``config`` (local paths only) and report; resumes from ``resume_from`` when given."""
    pl.seed_everything(config.train.seed, workers=True, verbose=False)
    model, criterion = build_network(config)
    evaluator_factory = (lambda: build_evaluator(config, datasets.val)) if datasets.val is not None else None
    label_map = datasets.train.label_map
    module = Mask2FormerModule(config=config, model=model, criterion=criterion, label_map=label_map,
                               evaluator_factory=evaluator_factory)
    augmentation = config.dataset.augmentation
    data = Mask2FormerDataModule(
        train_dataset=datasets.train, val_dataset=datasets.val, train_batch_size=config.dataset.train.batch_size,
        val_batch_size=config.dataset.val.batch_size, train_workers=config.dataset.train.num_workers,
        val_workers=config.dataset.val.num_workers, size_divisibility=augmentation.size_divisibility)
    trainer = build_trainer(config, plan=plan, results_dir=results_dir, status=status, log=log,
                            has_val=datasets.val is not None, train_images=len(datasets.train))
    if trainer.is_global_zero:
        log.info("Training on %s: %d training images%s, %d epochs%s", plan.describe(), len(datasets.train),
                 f", {len(datasets.val)} validation images" if datasets.val is not None else " (no validation)",
                 config.train.num_epochs, f", resuming from {resume_from}" if resume_from else "")
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None)
    saver = next(c for c in trainer.callbacks if isinstance(c, CheckpointSaver))
    latest = results_dir / results.LATEST_CHECKPOINT
    return TrainingOutcome(
        epochs=trainer.current_epoch, global_step=trainer.global_step,
        train_loss=module.last_epoch_loss, last_validation=module.last_validation,
        best=results.read_best(results_dir) if saver.best_value is not None else None,
        latest_checkpoint=latest if latest.is_file() else None)
