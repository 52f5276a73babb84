"""Experiment tracking in MLflow: training through Lightning's ``MLFlowLogger``, export through the MLflow client.

The tracking URI is the spec's ``mlflow.tracking_uri`` when set, else the environment's ``MLFLOW_TRACKING_URI``
(MLflow's own variable, which the Airflow operators set from an Airflow connection); without either nothing is
tracked. The spec wins because it is the more specific statement: a job spec names its own server, while the
environment is shared by every job a worker runs. The experiment follows the same order
(``mlflow.experiment_name``, ``MLFLOW_EXPERIMENT_NAME``, ``mask2former``).

A training run gets the spec as params, the per-epoch metrics Lightning logs, and once training ends the best
(else the latest) checkpoint as an artifact. Export logs its ``.onnx`` file into the run of the training job
that wrote the checkpoint (its ``mlflow_run.json`` beside the checkpoint, else ``MLFLOW_RUN_ID``), so one run
holds both; without one it starts a run of its own. Either job writes its run to ``mlflow_run.json`` in its
folder (the operators put it in the XCom, the jobs page links it).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from ..uris import without_credentials

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
#: MLflow's variable for the run to continue; export adds its model to that run when no run file is beside
#: the checkpoint.
RUN_ID_ENV = "MLFLOW_RUN_ID"
DEFAULT_EXPERIMENT = "mask2former"
RUN_FILE = "mlflow_run.json"
#: MLflow refuses param values longer than this.
MAX_PARAM_CHARS = 500


@dataclass(frozen=True)
class TrackingTarget:
    """Where a job's run goes: the tracking URI, the experiment, and which setting named the URI."""

    uri: str
    experiment: str
    source: str

    @property
    def shown_uri(self) -> str:
        return without_credentials(self.uri)

    def describe(self) -> str:
        return f"MLflow tracking at {self.shown_uri} (from {self.source}), experiment {self.experiment!r}"


def tracking_target(mlflow_cfg: Any) -> Optional[TrackingTarget]:
    """The job's tracking target from the spec's ``mlflow`` section and the environment; None: not tracked."""
    if mlflow_cfg.tracking_uri:
        uri, source = mlflow_cfg.tracking_uri, "mlflow.tracking_uri"
    elif os.environ.get(TRACKING_URI_ENV):
        uri, source = os.environ[TRACKING_URI_ENV], TRACKING_URI_ENV
    else:
        return None
    experiment = mlflow_cfg.experiment_name or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    return TrackingTarget(uri=uri, experiment=experiment, source=source)


def flat_params(tree: Any, prefix: str = "") -> Dict[str, str]:
    """Dotted spec keys -> short strings (secrets are left out by the caller)."""
    if isinstance(tree, dict):
        out: Dict[str, str] = {}
        for key, value in tree.items():
            out.update(flat_params(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(tree)[:MAX_PARAM_CHARS]}


def mlflow_logger(mlflow_cfg: Any, *, results_dir: Path, params: Dict[str, Any],
                  log: logging.Logger) -> Optional[Any]:
    """Lightning's MLFlowLogger for this job (None when it is not tracked), its params logged."""
    target = tracking_target(mlflow_cfg)
    if target is None:
        return None
    from pytorch_lightning.loggers import MLFlowLogger

    log.info("%s", target.describe())
    logger = MLFlowLogger(experiment_name=target.experiment, run_name=results_dir.name, tracking_uri=target.uri,
                          log_model=False)
    flat = flat_params(params)
    if mlflow_cfg.tracking_uri:
        flat["mlflow.tracking_uri"] = target.shown_uri
    logger.log_hyperparams(flat)
    return logger


def write_run_record(results_dir: Path, *, run_id: str, experiment_id: str, target: TrackingTarget) -> Dict[str, Any]:
    record = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": target.shown_uri}
    (results_dir / RUN_FILE).write_text(json.dumps(record))
    return record


def finish_run(logger: Any, mlflow_cfg: Any, *, results_dir: Path, checkpoint: Optional[Path]) -> Dict[str, Any]:
    """Log the model checkpoint as an artifact and record the run in ``mlflow_run.json``."""
    if checkpoint is not None and checkpoint.is_file():
        logger.experiment.log_artifact(logger.run_id, str(checkpoint), artifact_path="checkpoints")
    target = tracking_target(mlflow_cfg)
    return write_run_record(results_dir, run_id=logger.run_id, experiment_id=logger.experiment_id, target=target)


def _training_run(client: Any, checkpoint: Path, target: TrackingTarget, log: logging.Logger) -> Optional[Any]:
    """The MLflow run of the training job that wrote ``checkpoint``: its ``mlflow_run.json`` beside the checkpoint
    (a local job folder), else ``MLFLOW_RUN_ID`` (the operators set it from the parent's XCom, for a checkpoint
    staged from S3); only when that run is on this job's tracking server."""
    recorded = checkpoint.parent / RUN_FILE
    if recorded.is_file():
        record = json.loads(recorded.read_text())
        if str(record.get("tracking_uri", "")).rstrip("/") != target.shown_uri.rstrip("/"):
            log.info("export: the checkpoint's training run %s is on %s, not on this job's server; the ONNX model "
                     "goes to a new run", record.get("run_id"), record.get("tracking_uri"))
            return None
        run_id = record["run_id"]
    elif os.environ.get(RUN_ID_ENV):
        run_id = os.environ[RUN_ID_ENV]
    else:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        log.info("export: the training run %s is not on %s (%s); the ONNX model goes to a new run", run_id,
                 target.shown_uri, str(error).splitlines()[0])
        return None


def _new_run(client: Any, target: TrackingTarget, run_name: str) -> Any:
    experiment = client.get_experiment_by_name(target.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(target.experiment)
    return client.create_run(experiment_id, run_name=run_name)


def log_exported_model(mlflow_cfg: Any, *, model_file: Path, checkpoint: Path, results_dir: Path,
                       log: logging.Logger) -> Optional[Dict[str, Any]]:
    """Log the exported model file as an artifact (``onnx/``) of the checkpoint's training run, else of a new run
    of the experiment; record that run in the export job's ``mlflow_run.json``. None when it is not tracked."""
    target = tracking_target(mlflow_cfg)
    if target is None:
        return None
    from mlflow.tracking import MlflowClient

    log.info("export: %s", target.describe())
    client = MlflowClient(tracking_uri=target.uri)
    run = _training_run(client, checkpoint, target, log)
    started = run is None
    if started:
        run = _new_run(client, target, run_name=results_dir.name)
    client.log_artifact(run.info.run_id, str(model_file), artifact_path="onnx")
    if started:
        client.set_terminated(run.info.run_id)
    log.info("export: %s logged to MLflow run %s", model_file.name, run.info.run_id)
    return write_run_record(results_dir, run_id=run.info.run_id, experiment_id=run.info.experiment_id,
                            target=target)
