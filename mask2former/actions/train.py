"""The train action: fetch remote weights, check devices and data, start the ranks, fit, report.

Resume: a results folder that already holds checkpoints belongs to an interrupted attempt of this job (a
retried task), so training continues from its newest checkpoint (or from
``train.resume_training_checkpoint_path``) with the weights, optimizer, schedule, epoch and step restored.
A job in a new folder starts afresh and never writes into another job's folder.

Returns metrics {final validation numbers, "per_class", "best": {...}, "epochs", "steps", "best_epoch",
"train_loss"}, kpi {mIoU, PQ, AP} (train loss when there is no validation) and artifacts {"checkpoint":
model_latest.pth, "best_checkpoint": the best epoch's checkpoint (with validation only)}.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import yaml

from ..checkpoint import CheckpointError, check_checkpoint_key
from ..config import spec_to_dict
from ..data.downloads import DownloadError, default_cache_dir
from ..data.staging import S3AccessError, SourceNotFoundError, fetch_uri
from ..resources import check_fits, classify_resource_error, estimate_training_memory
from ..training.distributed import LocalWorkers, WorkerFailed, plan_devices
from ..training.worker import worker_arguments
from ..training.errors import DatasetError, TrainingSetupError
from ..training.session import (TrainingOutcome, build_training_datasets, find_resume_checkpoint,
                                read_resume_point, run_training)
from .job import ActionError, ActionResult, Job

# file key -> the key holding its expected SHA-256 (None: no digest key)
REMOTE_FILE_KEYS = {"train.pretrained_model_path": "train.pretrained_model_sha256",
                    "model.backbone.pretrained_weights": "model.backbone.pretrained_weights_sha256",
                    "train.resume_training_checkpoint_path": None}


def cache_dir() -> Path:
    """Where fetched weights are kept: $MASK2FORMER_CACHE, else ~/.cache/mask2former."""
    return default_cache_dir()


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _set(config: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)


def localize_weight_files(config: Any, *, cache: Path) -> Any:
    """A copy of ``config`` whose weight/checkpoint files are local paths (s3://, https:// and file:// fetched,
    checked against their SHA-256 keys)."""
    config = copy.deepcopy(config)
    for key, digest_key in REMOTE_FILE_KEYS.items():
        value = _get(config, key)
        if not value:
            continue
        try:
            local = fetch_uri(value, cache, sha256=_get(config, digest_key) if digest_key else None)
        except (SourceNotFoundError, S3AccessError, DownloadError, ValueError) as error:
            raise ActionError(f"{key} '{value}' cannot be fetched: {error}") from None
        if not Path(local).is_file():
            raise ActionError(f"{key} '{value}' does not exist (expected a file).")
        _set(config, key, str(local))
    return config


@contextlib.contextmanager
def worker_spec_file(config: Any) -> Iterator[Path]:
    """The resolved spec, in a temporary file the worker ranks read."""
    fd, name = tempfile.mkstemp(prefix="mask2former-train-", suffix=".yaml")
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(spec_to_dict("train", config, include_secrets=True), handle, sort_keys=False)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def run(config: Any, job: Job) -> ActionResult:
    try:
        plan = plan_devices(config.train, cuda_devices=torch.cuda.device_count(), env=os.environ)
        config = localize_weight_files(config, cache=cache_dir())
        if config.train.pretrained_model_path:  # a missing or wrong key fails here, before any other work
            check_checkpoint_key(config.train.pretrained_model_path, config.encryption_key)
        resume = find_resume_checkpoint(job.results_dir, config.train.resume_training_checkpoint_path)
        resume_point = None
        if resume is not None:
            resume_point = read_resume_point(resume, config.encryption_key)
            config.train.resume_training_checkpoint_path = str(resume)
            # Written here, not only by the trainer: a checkpoint taken after the last epoch resumes straight
            # into the final reporting, and Lightning then starts no training loop to announce it.
            message = (f"Resuming from {resume.name}, saved at epoch {resume_point.epoch}, "
                       f"step {resume_point.global_step}")
            job.log.info(message)
            job.status.running(message, epoch=resume_point.epoch, max_epoch=config.train.num_epochs)
        warn_if_memory_short(config, plan=plan, job=job)
        datasets = build_training_datasets(config)
        with worker_spec_file(config) as spec_path:
            workers = LocalWorkers(plan=plan, spec_path=spec_path, results_dir=job.results_dir,
                                   worker_args=worker_arguments(resume_point))
            try:
                with workers:
                    outcome = run_training(config, plan=plan, datasets=datasets, results_dir=job.results_dir,
                                           status=job.status, log=job.log, resume=resume_point)
            except (KeyboardInterrupt, SystemExit):
                if workers.failure:
                    raise ActionError(f"Training stopped: {workers.failure} (its log is above).") from None
                raise
    except (TrainingSetupError, DatasetError, WorkerFailed, FloatingPointError, CheckpointError) as error:
        failure = classify_resource_error(error, config)
        raise ActionError(failure.message if failure else str(error)) from None
    except (RuntimeError, MemoryError, OSError) as error:
        failure = classify_resource_error(error, config)
        if failure is None:
            raise
        raise ActionError(failure.message) from error
    return build_result(outcome)


def warn_if_memory_short(config: Any, *, plan: Any, job: Job) -> None:
    """Estimate the memory of one training process and warn (log + status line) when it will not fit."""
    estimate = estimate_training_memory(config, device_type="cuda" if plan.accelerator == "gpu" else "cpu")
    job.log.info("Estimated training memory per process: %s", estimate.describe())
    if plan.accelerator == "gpu":
        devices = plan.devices if isinstance(plan.devices, list) else list(range(int(plan.devices)))
        warnings = [check_fits(estimate, f"cuda:{index}") for index in devices]
    else:
        warnings = [check_fits(estimate, "cpu", processes=plan.processes_per_node)]
    for warning in filter(None, warnings):
        job.log.warning(warning)
        job.status.running(warning)


def build_result(outcome: TrainingOutcome) -> ActionResult:
    metrics: Dict[str, Any] = {"epochs": outcome.epochs, "steps": outcome.global_step,
                               "train_loss": outcome.train_loss}
    kpi: Optional[Dict[str, float]] = None
    if outcome.last_validation is not None:
        metrics.update(outcome.last_validation["summary"])
        metrics["per_class"] = outcome.last_validation["metrics"].get("per_class", {})
        metrics["validated_epoch"] = outcome.last_validation["epoch"]
        metrics["num_images"] = outcome.last_validation["metrics"].get("num_images")
        kpi = {key: outcome.last_validation["summary"][key] for key in ("mIoU", "PQ", "AP")
               if key in outcome.last_validation["summary"]}
    elif outcome.train_loss is not None:
        kpi = {"loss": outcome.train_loss}
    artifacts = {}
    if outcome.latest_checkpoint is not None:
        artifacts["checkpoint"] = str(outcome.latest_checkpoint)
    message = f"Trained {outcome.epochs} epochs ({outcome.global_step} steps)"
    if outcome.best is not None:
        metrics["best_epoch"] = outcome.best["epoch"]
        metrics["best"] = {"epoch": outcome.best["epoch"], "step": outcome.best["step"],
                           outcome.best["metric"]: outcome.best["value"]}
        artifacts["best_checkpoint"] = str(Path(outcome.latest_checkpoint).parent / outcome.best["checkpoint"]) \
            if outcome.latest_checkpoint else outcome.best["checkpoint"]
        message += f"; best {outcome.best['metric']} {outcome.best['value']:.2f} at epoch {outcome.best['epoch']}"
    return ActionResult(message=message, metrics=metrics, kpi=kpi, artifacts=artifacts)
