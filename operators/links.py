"""The extra link from every Mask2Former task to its job page in the plugin (plugins/mask2former_plugin.py)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperatorLink

from .jobs import job_id

#: Where the plugin's FastAPI app is mounted on the API server.
PLUGIN_URL_PREFIX = "/mask2former"
DEFAULT_BASE_URL = "http://localhost:8080"


def api_base_url() -> str:
    """``[api] base_url`` of this deployment (the UI's address), else http://localhost:8080."""
    from airflow.sdk import conf

    return (conf.get("api", "base_url", fallback="") or DEFAULT_BASE_URL).rstrip("/")


def job_page_url(job: str, base_url: str) -> str:
    return f"{base_url}{PLUGIN_URL_PREFIX}/jobs/{job}"


class Mask2FormerJobLink(BaseOperatorLink):
    """'Mask2Former job': the task's results folder, metrics and plots on the plugin page."""

    name = "Mask2Former job"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        job = job_id(ti_key.dag_id, ti_key.run_id, ti_key.task_id, getattr(ti_key, "map_index", -1))
        return job_page_url(job, api_base_url())
