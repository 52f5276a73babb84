"""What a finished job left behind, as the small JSON-safe XCom dict the operators return.

``{"action", "job_id", "results_dir", "status", "metrics", "artifacts"}``: ``results_dir`` and every
artifact are URIs of the published folder; ``metrics`` keeps the scalar values of metrics.json
(nested mappings flattened to dotted keys, lists such as per-class tables left in the file).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from mask2former import results
from mask2former.data.sources import join_uri

#: At most this many metric values travel in XCom; the rest stay in metrics.json.
MAX_XCOM_METRICS = 64
#: Flattening depth of nested metric mappings ({"panoptic": {"PQ": ...}} -> "panoptic.PQ").
MAX_METRIC_DEPTH = 3


def small_metrics(metrics: Mapping[str, Any], limit: Optional[int] = MAX_XCOM_METRICS) -> Dict[str, Any]:
    """Scalar metrics (numbers, strings, booleans) flattened to dotted keys, at most ``limit`` of them (None:
    all); NaN/inf become None."""
    flat: Dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str, depth: int) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                if depth < MAX_METRIC_DEPTH:
                    walk(value, name + ".", depth + 1)
            elif isinstance(value, bool) or isinstance(value, (int, str)):
                flat[name] = value
            elif isinstance(value, float):
                flat[name] = value if math.isfinite(value) else None
            if limit is not None and len(flat) >= limit:
                return

    walk(metrics, "", 1)
    return dict(list(flat.items())[:limit])


def find_metric(metrics: Mapping[str, Any], name: str) -> Optional[float]:
    """A metric by name in (flattened) metrics: the exact key, else the one key ending in ``.name``."""
    if isinstance(metrics.get(name), (int, float)) and not isinstance(metrics.get(name), bool):
        return float(metrics[name])
    matches = [v for k, v in metrics.items() if k.endswith("." + name) and isinstance(v, (int, float))
               and not isinstance(v, bool)]
    return float(matches[0]) if len(matches) == 1 else None


def collect_artifacts(folder: Path, publish_uri: str) -> Dict[str, str]:
    """URIs of the models a job folder holds: checkpoint (latest), best_checkpoint, onnx, engine, quantized."""
    found: Dict[str, str] = {}
    checkpoints = results.list_checkpoints(folder)
    if (folder / results.LATEST_CHECKPOINT).is_file():
        found["checkpoint"] = results.LATEST_CHECKPOINT
    elif checkpoints:
        found["checkpoint"] = checkpoints[-1].path.name
    best = results.read_best(folder)
    if best and (folder / best["checkpoint"]).is_file():
        found["best_checkpoint"] = best["checkpoint"]
    for kind, name in (("onnx", results.ONNX_FILE), ("engine", results.ENGINE_FILE)):
        if (folder / name).is_file():
            found[kind] = name
    try:
        found["quantized"] = results.resolve_parent_model(folder, kind="quantized").name
    except results.ParentModelError:
        pass
    if (folder / results.METRICS_FILE).is_file():
        found["metrics"] = results.METRICS_FILE
    return {kind: join_uri(publish_uri, name) for kind, name in found.items()}


#: The MLflow run of a training job (mask2former/training/tracking.py writes it; the name is kept here so that
#: this module stays free of the engine's training stack).
MLFLOW_RUN_FILE = "mlflow_run.json"


def job_outcome(*, action: str, job_id: str, folder: Path, publish_uri: str) -> Dict[str, Any]:
    """The XCom dict of a job from its folder (local, or an index of the published one)."""
    lines = results.read_status(folder)
    tracked = folder / MLFLOW_RUN_FILE
    mlflow_run = json.loads(tracked.read_text()) if tracked.is_file() else None
    return {
        **({"mlflow": mlflow_run} if mlflow_run else {}),
        "action": action,
        "job_id": job_id,
        "results_dir": publish_uri,
        "status": lines[-1]["status"] if lines else None,
        "metrics": small_metrics(results.read_metrics(folder)),
        "artifacts": collect_artifacts(folder, publish_uri),
    }


def published_outcome(hook: Any, *, action: str, job_id: str, publish_uri: str) -> Dict[str, Any]:
    """The XCom dict of a job from its published folder, read through the storage hook."""
    with tempfile.TemporaryDirectory(prefix="m2f-outcome-") as tmp:
        return job_outcome(action=action, job_id=job_id, folder=hook.index(publish_uri, Path(tmp)),
                           publish_uri=publish_uri)


#: The Asset a new model updates (the pipeline's training stage, the retrain's promotion): a downstream
#: deployment DAG scheduled on it gets the model's URI, metrics and run in the event's extra.
MODEL_ASSET_NAME = "mask2former_model"
#: Model artifacts, the most deployable first: the one a downstream DAG should take is ``model_uri``.
_MODEL_KINDS = ("engine", "onnx", "best_checkpoint", "checkpoint", "quantized")


def model_event_extra(outcome: Mapping[str, Any], *, dag_id: str, run_id: str, task_id: str,
                      reason: str) -> Dict[str, Any]:
    """The extra of a ``mask2former_model`` Asset event: the model's URI (and every model artifact), its
    metrics, the job folder, and the run that made it."""
    artifacts = outcome.get("artifacts") or {}
    models = {kind: artifacts[kind] for kind in _MODEL_KINDS if artifacts.get(kind)}
    return {
        "model_uri": next(iter(models.values()), None),
        "models": models,
        "metrics": dict(outcome.get("metrics") or {}),
        "results_dir": outcome.get("results_dir"),
        "job_id": outcome.get("job_id"),
        "dag_id": dag_id, "run_id": run_id, "task_id": task_id,
        "reason": reason,
    }
