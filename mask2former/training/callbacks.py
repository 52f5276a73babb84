"""Lightning callbacks of training: checkpoints and the best-epoch record, status lines, log lines.

Checkpoint files (results folder, see :mod:`mask2former.results`): ``model_epoch_{EEE}_step_{SSSSSS}.pth``
where EEE is the 1-based epoch the step belongs to (the end-of-epoch checkpoint of the first epoch is
``model_epoch_001_step_<steps of one epoch>``) and SSSSSS the optimizer steps done; ``model_latest.pth`` is
a hard link to (or, where links are not possible, a copy of) the newest. Every file is written atomically.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import FSDPStrategy

from .. import results
from ..checkpoint import checkpoint_source, save_checkpoint
from .lightning_module import KPI_KEYS, Mask2FormerModule

MONITOR = "mIoU"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, replaced by :func:`mask2former.checkpoint.save_checkpoint` (atomic,
    encrypted with ``encryption_key``); resuming reads encrypted checkpoints with the same key."""

    def __init__(self, encryption_key: Optional[str] = None) -> None:
        super().__init__()
        self.encryption_key = encryption_key

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options (got {storage_options!r})")
        save_checkpoint(path, checkpoint, encryption_key=self.encryption_key)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        return torch.load(checkpoint_source(path, self.encryption_key), map_location=map_location,
                          weights_only=weights_only)


def link_latest(results_dir: Path, checkpoint: Path) -> Path:
    """Point ``model_latest.pth`` at ``checkpoint`` atomically (hard link; a copy where links fail)."""
    latest = results_dir / results.LATEST_CHECKPOINT
    fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=f".{latest.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(checkpoint, tmp)
        except OSError:
            shutil.copyfile(checkpoint, tmp)
        os.replace(tmp, latest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return latest


def format_eta(seconds: float) -> str:
    return str(_dt.timedelta(seconds=max(0, int(round(seconds)))))


class CheckpointSaver(Callback):
    """Saves checkpoints every ``interval`` epochs or optimizer steps and at the end of the last epoch, keeps
    ``model_latest.pth`` current, and records the best validation epoch by mIoU (``best_model.json``; a
    checkpoint is written for a new best even between intervals, so the record always names a file).

    Every rank calls ``trainer.save_checkpoint`` (a collective under DDP/FSDP); rank 0 writes the files.
    """

    def __init__(self, *, results_dir: Path, interval: int, unit: str, max_epochs: int) -> None:
        if unit not in ("epoch", "step"):
            raise ValueError(f"train.checkpoint_interval_unit {unit!r} is not one of ['epoch', 'step']")
        self.results_dir = Path(results_dir)
        self.interval = interval
        self.unit = unit
        self.max_epochs = max_epochs
        self.best_value: Optional[float] = None
        self.saved: Dict[int, str] = {}  # global step -> checkpoint file name

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = results.read_best(self.results_dir) if trainer.is_global_zero else None
        best = trainer.strategy.broadcast(best, src=0)  # the same decision on every rank
        self.best_value = float(best["value"]) if best else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fast_dev_run:  # train.is_dry_run: a check of the spec and data, as in TAO, writes no model
            return
        if self.unit == "step" and trainer.global_step % self.interval == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Mask2FormerModule) -> None:
        if trainer.fast_dev_run:
            return
        epoch = trainer.current_epoch + 1
        due = epoch == self.max_epochs or (self.unit == "epoch" and epoch % self.interval == 0)
        validation = pl_module.last_validation
        value = None
        if validation is not None and validation["global_step"] == trainer.global_step:
            value = validation["summary"].get(MONITOR)
        new_best = value is not None and (self.best_value is None or value > self.best_value)
        if due or new_best:
            name = self.save(trainer)
            if new_best:
                self.best_value = value
                if trainer.is_global_zero:
                    results.record_best(self.results_dir, epoch=epoch, step=trainer.global_step, metric=MONITOR,
                                        value=value, checkpoint=name)

    def save(self, trainer: pl.Trainer) -> str:
        """Write the checkpoint of the current step (once per step) and relink model_latest.pth."""
        step = trainer.global_step
        if step in self.saved:
            return self.saved[step]
        name = results.checkpoint_name(trainer.current_epoch + 1, step)
        path = self.results_dir / name
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            link_latest(self.results_dir, path)
        self.saved[step] = name
        return name


class StatusReporter(Callback):
    """status.json RUNNING lines (one per epoch with the train loss and an ETA, one per validation with
    mIoU / PQ / AP) and log lines; on a terminal Lightning's progress bar shows the steps, elsewhere a log
    line every ``log_every_n_steps`` steps does."""

    def __init__(self, *, status: results.StatusWriter, log: logging.Logger, max_epochs: int,
                 log_every_n_steps: Optional[int]) -> None:
        self.status = status
        self._log = log
        self.max_epochs = max_epochs
        self.log_every_n_steps = log_every_n_steps
        self._start = 0.0
        self._first_epoch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._first_epoch = trainer.current_epoch
        if trainer.is_global_zero:
            where = f"resumed at epoch {trainer.current_epoch + 1}, step {trainer.global_step}" \
                if trainer.global_step else "started"
            self.status.running(f"Training {where}", epoch=trainer.current_epoch, max_epoch=self.max_epochs)

    def _eta(self, trainer: pl.Trainer) -> str:
        done = trainer.current_epoch + 1 - self._first_epoch
        per_epoch = (time.monotonic() - self._start) / max(1, done)
        return format_eta(per_epoch * (self.max_epochs - trainer.current_epoch - 1))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.log_every_n_steps or not trainer.is_global_zero:
            return
        if (batch_idx + 1) % self.log_every_n_steps == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            lr = trainer.optimizers[0].param_groups[-1]["lr"] if trainer.optimizers else float("nan")
            self._log.info("epoch %d/%d batch %d/%d step %d: loss %.4f, lr %.3g", trainer.current_epoch + 1,
                          self.max_epochs, batch_idx + 1, trainer.num_training_batches, trainer.global_step,
                          float(loss), lr)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Mask2FormerModule) -> None:
        loss = pl_module.epoch_mean_loss()  # collective: every rank takes part
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch + 1
        eta = self._eta(trainer)
        message = f"Epoch {epoch}/{self.max_epochs} done: train loss {loss:.4f}"
        self.status.running(message, epoch=epoch, max_epoch=self.max_epochs, eta=eta, kpi={"loss": loss})
        self._log.info("%s (step %d, eta %s)", message, trainer.global_step, eta)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Mask2FormerModule) -> None:
        validation = pl_module.last_validation
        if not trainer.is_global_zero or validation is None or trainer.sanity_checking:
            return
        kpi = {key: validation["summary"][key] for key in KPI_KEYS if key in validation["summary"]}
        text = ", ".join(f"{key} {value:.2f}" for key, value in kpi.items())
        message = f"Validation after epoch {validation['epoch']}: {text}"
        self.status.running(message, epoch=validation["epoch"], max_epoch=self.max_epochs, kpi=kpi)
        self._log.info("%s (%d images)", message, validation["metrics"].get("num_images", 0))


def parameter_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """float64 [2 * tensors]: the sum and the absolute sum of every parameter tensor, in name order."""
    values = []
    for _, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        data = param.detach().double()
        values += [data.sum(), data.abs().sum()]
    return torch.stack(values)


class ReplicaCheck(Callback):
    """At the end of a data-parallel (DDP) run, proves every rank holds the same weights: each rank's
    :func:`parameter_fingerprint` is gathered and compared exactly. Diverged replicas (a rank that skipped a
    gradient all-reduce, a rank-dependent update) are an error instead of a silently wrong checkpoint."""

    def __init__(self, *, log: logging.Logger) -> None:
        self._log = log

    def on_train_end(self, trainer: pl.Trainer, pl_module: Mask2FormerModule) -> None:
        if trainer.world_size == 1 or isinstance(trainer.strategy, FSDPStrategy):
            return  # one replica, or sharded parameters (no replicas to compare)
        fingerprints = trainer.strategy.all_gather(parameter_fingerprint(pl_module.model))  # [world, n]
        differing = [rank for rank in range(1, fingerprints.shape[0])
                     if not torch.equal(fingerprints[rank], fingerprints[0])]
        if differing:
            raise RuntimeError(f"Model replicas diverged: the weights of rank(s) {differing} differ from rank 0's "
                               "after training.")
        if trainer.is_global_zero:
            self._log.info("Model parameters identical on all %d ranks (fingerprint of %d tensors)",
                           fingerprints.shape[0], fingerprints.shape[1] // 2)
