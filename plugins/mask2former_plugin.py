"""Airflow 3 plugin: a "Mask2Former jobs" page (FastAPI app on the API server) and the task extra link.

* ``fastapi_apps``: an app mounted at ``/mask2former`` listing the job folders of the local results root
  with their status, headline metrics (mIoU, PQ, AP), progress plots and images; ``/mask2former/api/jobs``
  serves the same as JSON. Every route needs an authenticated Airflow user (the UI's session cookie or
  ``Authorization: Bearer <JWT>``).
* ``external_views``: a navigation entry that opens the page inside the Airflow UI.
* ``operator_extra_links``: "Mask2Former job" on every Mask2Former task, pointing at its job page.

The results root is the Variable ``mask2former_results_root``, else env ``MASK2FORMER_RESULTS_ROOT``, else
``$AIRFLOW_HOME/mask2former/results`` (the operators' default); only a local root can be browsed.
"""

from __future__ import annotations

import os
from pathlib import Path

from airflow.plugins_manager import AirflowPlugin
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse

import mask2former_jobs as jobs
from operators.links import PLUGIN_URL_PREFIX, Mask2FormerJobLink

RESULTS_ROOT_VARIABLE = "mask2former_results_root"
RESULTS_ROOT_ENV = "MASK2FORMER_RESULTS_ROOT"


def results_root() -> Path:
    """The local results root this page browses (Variable, env, then the operators' default)."""
    value = None
    try:
        from airflow.models.variable import Variable

        value = Variable.get(RESULTS_ROOT_VARIABLE, default_var=None)
    except Exception:  # noqa: BLE001 - no metadata database reachable: fall back to the environment
        value = None
    value = value or os.environ.get(RESULTS_ROOT_ENV)
    if not value:
        home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
        return home / "mask2former" / "results"
    if value.startswith("s3://"):
        raise HTTPException(status_code=501, detail=f"The results root {value} is on S3; this page browses a local "
                                                    "results root only (open the objects in the S3 console).")
    return Path(value.removeprefix("file://"))


async def require_user(request: Request) -> object:
    """An authenticated Airflow user, from the Bearer token or the UI's session cookie (401/403 otherwise)."""
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.core_api.security import resolve_user_from_token

    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    return await resolve_user_from_token(token)


def build_app() -> FastAPI:
    router = APIRouter(dependencies=[Depends(require_user)])

    @router.get("/", response_class=HTMLResponse)
    def job_list() -> str:
        root = results_root()
        return jobs.render_list(root, jobs.list_jobs(root), PLUGIN_URL_PREFIX)

    @router.get("/api/jobs")
    def job_list_json() -> dict:
        listed = jobs.list_jobs(results_root())
        return {"jobs": [jobs.job_json(j) for j in listed], "total_entries": len(listed)}

    @router.get("/jobs/{job:path}", response_class=HTMLResponse)
    def job_page(job: str) -> str:
        root = results_root()
        folder = jobs.job_folder(root, job)
        if folder is None:
            raise HTTPException(status_code=404, detail=f"No job {job!r} under {root} (it may not have started yet, "
                                                        "or its results root is elsewhere).")
        return jobs.render_job(jobs.read_job(root.resolve(), folder), PLUGIN_URL_PREFIX)

    @router.get("/files/{relative:path}")
    def job_file(relative: str) -> FileResponse:
        path = jobs.served_file(results_root(), relative)
        if path is None:
            raise HTTPException(status_code=404, detail=f"No servable file {relative!r}.")
        return FileResponse(path)

    app = FastAPI(title="Mask2Former jobs", description="Mask2Former job folders, metrics and plots.")
    app.include_router(router)
    return app


app = build_app()


class Mask2FormerPlugin(AirflowPlugin):
    name = "mask2former"
    fastapi_apps = [{"app": app, "url_prefix": PLUGIN_URL_PREFIX, "name": "Mask2Former jobs"}]
    external_views = [{"name": "Mask2Former jobs", "href": f"{PLUGIN_URL_PREFIX}/", "destination": "nav",
                       "category": "browse", "url_route": "mask2former"}]
    operator_extra_links = [Mask2FormerJobLink()]
