"""The extra link from every Mask2Former task to its job page in the plugin (plugins/mask2former_plugin.py)."""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import urlencode

from airflow.sdk import BaseOperatorLink

from ..utils.jobs import default_results_root, job_id

#: Where the plugin's FastAPI app is mounted on the API server.
PLUGIN_URL_PREFIX = "/mask2former"
DEFAULT_BASE_URL = "http://localhost:8080"


def api_base_url() -> str:
    """``[api] base_url`` of this deployment (the UI's address), else http://localhost:8080."""
    from airflow.sdk import conf

    return (conf.get("api", "base_url", fallback="") or DEFAULT_BASE_URL).rstrip("/")


def job_page_url(job: str, base_url: str, results_root: Optional[str] = None) -> str:
    """The job page; ``results_root`` (a run's own root) travels as the page's ``root`` parameter."""
    url = f"{base_url}{PLUGIN_URL_PREFIX}/jobs/{job}"
    return f"{url}?{urlencode({'root': results_root})}" if results_root else url


def own_results_root(operator: Any) -> Optional[str]:
    """The task's results root when it is not the deployment's default (e.g. a trigger's ``results_root``).

    Airflow 3 computes extra links in the worker once the task has run and stores them, so ``operator``
    is the task with its templated fields rendered, as execute saw them.
    """
    chosen = getattr(operator, "results_root", None)
    if not chosen or str(chosen) == default_results_root():
        return None
    return str(chosen)


class Mask2FormerJobLink(BaseOperatorLink):
    """'Mask2Former job': the task's results folder, metrics and plots on the plugin page."""

    name = "Mask2Former job"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        # a task that returns another task's job (the training stage's result) names it
        job = getattr(operator, "linked_job_id", None) or job_id(ti_key.dag_id, ti_key.run_id, ti_key.task_id,
                                                                  getattr(ti_key, "map_index", -1))
        return job_page_url(job, api_base_url(), own_results_root(operator))
