"""evaluate: score a model (checkpoint, ONNX, TensorRT engine, quantized) or predictions on disk on
dataset.val, at each image's original resolution.

Writes (besides the CLI's metrics.json and status lines): per_class_iou.csv, per_class_pq.csv,
per_class_ap.csv for the metric groups computed, and per_class_iou.png. The SUCCESS line's kpi holds
mIoU, PQ and AP as available.

An encrypted model is opened with ``encryption_key`` (a missing or wrong key stops the job before the
dataset is built); running out of memory or disk ends with FAILURE naming the keys that help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from ..data.build import build_datasets
from ..evaluation.files import PredictionFilesError, score_prediction_files
from ..evaluation.models import load_job_runner, with_num_classes
from ..evaluation.pipeline import build_evaluator, evaluate_runner
from ..evaluation.progress import ProgressReporter
from ..evaluation.reports import KPI_KEYS, finite_or_none, kpi, summary_line, write_reports
from .job import ActionError, ActionResult, Job
from .resource_failures import reports_resource_failures


def _val_dataset(config: Any):
    try:
        return build_datasets(config, "val")
    except (OSError, ValueError) as exc:
        raise ActionError(f"dataset.val: {exc}") from exc


def _finish(metrics: Dict[str, Any], job: Job, *, source: str) -> ActionResult:
    written = write_reports(job.results_dir, metrics)
    job.log.info("evaluate: %s", summary_line(metrics))
    return ActionResult(message=f"evaluate of {source}: {summary_line(metrics)}", metrics=finite_or_none(metrics),
                        kpi=kpi(metrics), artifacts={name: str(path) for name, path in written.items()})


def _score_files(config: Any, job: Job) -> ActionResult:
    dataset = _val_dataset(config)
    progress = ProgressReporter(action="evaluate", status=job.status, log=job.log)
    try:
        metrics = score_prediction_files(Path(config.evaluate.predictions), dataset, progress=progress)
    except PredictionFilesError as exc:
        raise ActionError(str(exc)) from exc
    return _finish(metrics, job, source=str(config.evaluate.predictions))


@reports_resource_failures("evaluate")
def run(config: Any, job: Job) -> ActionResult:
    section = config.evaluate
    if section.predictions:
        if section.checkpoint or section.onnx_file or section.trt_engine:
            raise ActionError("evaluate.predictions scores files without a model: leave evaluate.checkpoint, "
                              "evaluate.onnx_file and evaluate.trt_engine unset.")
        return _score_files(config, job)
    runner, kind, path = load_job_runner(config, action="evaluate")
    config = with_num_classes(config, runner.num_classes)
    dataset = _val_dataset(config)
    job.log.info("evaluate: %d images of dataset.val, %s model %s, mode %s", len(dataset), kind, path,
                 config.model.mode)
    progress = ProgressReporter(action="evaluate", status=job.status, log=job.log)

    def score(progress: Any = None) -> Dict[str, Any]:
        return evaluate_runner(runner=runner, dataset=dataset, evaluator=build_evaluator(config, dataset),
                               dataset_cfg=config.dataset, batch_size=section.batch_size,
                               num_workers=config.dataset.val.num_workers, progress=progress)

    metrics = score(progress)
    metrics["model"] = {"kind": kind, "path": str(path), "mode": config.model.mode}
    metrics["precision"] = runner.precision_choice.as_dict()
    if runner.precision_choice.used == "bf16":
        metrics["precision"].update(_against_fp32(metrics, runner, score, job))
    return _finish(metrics, job, source=f"{kind} {path.name}")


def _against_fp32(metrics: Dict[str, Any], runner: Any, score: Any, job: Job) -> Dict[str, Any]:
    """The same images scored again in fp32: its values and bf16's difference (bf16 - fp32, in points)."""
    job.log.info("evaluate: scoring again in fp32 for the accuracy bf16 costs")
    runner.set_precision("fp32")
    try:
        reference = score()
    finally:
        runner.set_precision("bf16")
    keys = [key for key in KPI_KEYS if isinstance(reference.get(key), float) and isinstance(metrics.get(key), float)]
    delta = {key: metrics[key] - reference[key] for key in keys}
    job.log.info("evaluate: bf16 - fp32: %s", ", ".join(f"{key} {value:+.3f}" for key, value in delta.items()))
    return {"fp32": {key: reference[key] for key in keys}, "bf16_minus_fp32": delta}
