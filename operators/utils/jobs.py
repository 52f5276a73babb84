"""Where a task's job lives (its id, local folder and published location) and what a job process runs.

A job folder is keyed by dag_id, run_id and task_id (plus the map index of a mapped task), never by
the try number, so a retried task finds its earlier attempt's folder (train resumes from its last
checkpoint). Each part is sanitised into one safe path component.

Roots (each resolved at execute time, never at DAG parse):

* results root: the operator's ``results_root`` argument, else the Airflow Variable
  ``mask2former_results_root``, else env ``MASK2FORMER_RESULTS_ROOT``, else
  ``$AIRFLOW_HOME/mask2former/results``. A local path or ``s3://bucket/prefix``.
* work root (where a job runs when the results root is on S3): env ``MASK2FORMER_WORK_DIR``, else
  ``$AIRFLOW_HOME/mask2former/work``.
* cache root (staged data): env ``MASK2FORMER_CACHE_DIR``, else ``$AIRFLOW_HOME/mask2former/cache``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from mask2former.data.sources import join_uri, local_path_of, uri_scheme

RESULTS_ROOT_VARIABLE = "mask2former_results_root"
RESULTS_ROOT_ENV = "MASK2FORMER_RESULTS_ROOT"
WORK_DIR_ENV = "MASK2FORMER_WORK_DIR"
CACHE_DIR_ENV = "MASK2FORMER_CACHE_DIR"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize(part: str) -> str:
    """One path component from a dag/run/task id: unsafe characters become '_', never '', '.' or '..'."""
    cleaned = _UNSAFE.sub("_", str(part)).strip("._") or "_"
    return cleaned


def job_id(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """``dag/run/task`` (sanitised), with ``.map<N>`` appended for a mapped task instance."""
    task = sanitize(task_id) + (f".map{map_index}" if map_index is not None and map_index >= 0 else "")
    return f"{sanitize(dag_id)}/{sanitize(run_id)}/{task}"


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")


def default_results_root() -> str:
    """The deployment's results root when a task names none (Variable, then env, then AIRFLOW_HOME)."""
    from airflow.sdk import Variable

    try:
        value = Variable.get(RESULTS_ROOT_VARIABLE, default=None)
    except Exception:  # noqa: BLE001 - outside a task (tests, scripts) there is no Variable backend
        value = None
    return results_root_or_default(value)


def results_root_or_default(variable_value: Optional[str]) -> str:
    """The ``mask2former_results_root`` Variable's value, else env ``MASK2FORMER_RESULTS_ROOT``, else
    ``$AIRFLOW_HOME/mask2former/results``: one rule for the tasks and for the plugin's pages, which read the
    Variable each their own way (the task SDK in a task, the metadata database in the API server)."""
    return variable_value or os.environ.get(RESULTS_ROOT_ENV) or str(airflow_home() / "mask2former" / "results")


def work_root() -> Path:
    return Path(os.environ.get(WORK_DIR_ENV) or airflow_home() / "mask2former" / "work")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or airflow_home() / "mask2former" / "cache")


@dataclass(frozen=True)
class JobPaths:
    """A job's id, the local folder it runs in and the URI it is published to.

    With a local results root the job runs in its published folder (publishing only adds the
    ``_FINISHED`` marker); with an S3 root it runs under the work root and is uploaded.
    """

    job_id: str
    local_dir: Path
    publish_uri: str

    @property
    def publishes_to_s3(self) -> bool:
        return uri_scheme(self.publish_uri) == "s3"

    @classmethod
    def resolve(cls, *, job: str, results_root: str, work_dir: Optional[Path] = None) -> "JobPaths":
        publish = join_uri(results_root.rstrip("/"), job) if uri_scheme(results_root) else \
            str(Path(results_root).absolute() / job)
        if uri_scheme(results_root) == "s3":
            local = (work_dir or work_root()) / job
        else:
            local = Path(local_path_of(publish))
        return cls(job_id=job, local_dir=local.absolute(), publish_uri=publish)


def process_env(base: Mapping[str, str], *, drop: Tuple[str, ...]) -> Dict[str, str]:
    """The environment of a process this package starts: ``base`` without the variables whose names start with
    ``drop``, the project's folder (the engine and this package) first on PYTHONPATH, unbuffered output."""
    env = {k: v for k, v in base.items() if not k.startswith(drop)}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                  if p and p != root])
    env["PYTHONUNBUFFERED"] = "1"
    return env


#: The environment variable that hands a job process its :class:`JobDescription` (JSON).
JOB_ENV = "MASK2FORMER_JOB"


@dataclass(frozen=True)
class JobDescription:
    """What a job process (``python -m operators.pod_job``: a pod, a detached or a child process) runs.

    ``overrides`` are the validated spec keys, data sources still as URIs; no credentials (those reach the
    process through its environment: a Kubernetes Secret, or the worker's connection).
    """

    action: str
    job_id: str
    overrides: Dict[str, Any]
    publish_uri: str
    local_dir: str
    cache_dir: str
    #: Seconds between the job's heartbeats, status uploads and looks for a stop request.
    check_interval: float = 10.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "JobDescription":
        return cls(**json.loads(text))


#: XCom key under which a task records where its job folder lives and through which connection it is read
#: (the jobs page accepts a run's own results root, and reads it with that connection, only from this record).
JOB_LOCATION_KEY = "mask2former_job_location"


def record_job_location(context: Any, paths: JobPaths, *, aws_conn_id: Optional[str]) -> None:
    """Push ``{"results_root", "aws_conn_id"}`` of this task's job folder as the XCom :data:`JOB_LOCATION_KEY`."""
    push = getattr(context.get("ti"), "xcom_push", None)
    suffix = "/" + paths.job_id
    if push is None or not paths.publish_uri.endswith(suffix):
        return
    push(key=JOB_LOCATION_KEY, value={"results_root": paths.publish_uri[:-len(suffix)], "aws_conn_id": aws_conn_id})
