"""Experiment tracking in MLflow through Lightning's ``MLFlowLogger``, when the job is given a tracking server.

The tracking URI comes from the environment (``MLFLOW_TRACKING_URI``, MLflow's own variable; the Airflow
operators set it from an Airflow connection). The run gets the spec as params, the per-epoch metrics
Lightning logs, and, once training ends, the best (else the latest) checkpoint as an artifact; its id is
written to ``mlflow_run.json`` in the job folder (the operators put it in the XCom, the jobs page links it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "mask2former"
RUN_FILE = "mlflow_run.json"
#: MLflow refuses param values longer than this.
MAX_PARAM_CHARS = 500


def tracking_uri() -> Optional[str]:
    return os.environ.get(TRACKING_URI_ENV) or None


def flat_params(tree: Any, prefix: str = "") -> Dict[str, str]:
    """Dotted spec keys -> short strings (secrets are left out by the caller)."""
    if isinstance(tree, dict):
        out: Dict[str, str] = {}
        for key, value in tree.items():
            out.update(flat_params(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(tree)[:MAX_PARAM_CHARS]}


def mlflow_logger(*, results_dir: Path, params: Dict[str, Any]) -> Optional[Any]:
    """Lightning's MLFlowLogger for this job (None without a tracking URI), its params logged."""
    uri = tracking_uri()
    if uri is None:
        return None
    from pytorch_lightning.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name=os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT,
                          run_name=results_dir.name, tracking_uri=uri, log_model=False)
    logger.log_hyperparams(flat_params(params))
    return logger


def finish_run(logger: Any, *, results_dir: Path, checkpoint: Optional[Path]) -> Dict[str, Any]:
    """Log the model checkpoint as an artifact and record the run in ``mlflow_run.json``."""
    if checkpoint is not None and checkpoint.is_file():
        logger.experiment.log_artifact(logger.run_id, str(checkpoint), artifact_path="checkpoints")
    record = {"run_id": logger.run_id, "experiment_id": logger.experiment_id, "tracking_uri": tracking_uri()}
    (results_dir / RUN_FILE).write_text(json.dumps(record))
    return record
