"""The MLflow tracking settings an operator hands to its job: from an Airflow connection, as MLflow's own
environment variables (the engine reads them; the spec's ``mlflow.tracking_uri`` wins over them there)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, Dict, Optional
from urllib.parse import urlsplit

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
RUN_ID_ENV = "MLFLOW_RUN_ID"
#: Plain (not secret) settings that may travel in a pod spec as literal values.
TRACKING_ENV = (TRACKING_URI_ENV, EXPERIMENT_ENV, RUN_ID_ENV)


def mlflow_environment(conn_id: str) -> Dict[str, str]:
    """``MLFLOW_TRACKING_URI`` (the connection's extra ``tracking_uri``, else schema://host:port) and, when the
    extra names one, ``MLFLOW_EXPERIMENT_NAME`` (extra ``experiment_name``)."""
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    extra = conn.extra_dejson
    env = {TRACKING_URI_ENV: str(extra.get("tracking_uri") or _host_uri(conn))}
    if extra.get("experiment_name"):
        env[EXPERIMENT_ENV] = str(extra["experiment_name"])
    return env


def _host_uri(conn: object) -> str:
    host = conn.host or "localhost"
    port = f":{conn.port}" if conn.port else ""
    return host + port if "://" in host else f"{conn.schema or 'http'}://{host}{port}"


def is_loopback(uri: str) -> bool:
    """Whether ``uri`` names this machine (``localhost``, ``127.x``, ``::1``): from a pod, the pod itself."""
    host = urlsplit(uri).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parent_run_id(parent: Any) -> Optional[str]:
    """The MLflow run id a parent task's XCom carries (``mlflow.run_id``), if any."""
    run = parent.get("mlflow") if isinstance(parent, Mapping) else None
    return str(run["run_id"]) if isinstance(run, Mapping) and run.get("run_id") else None
