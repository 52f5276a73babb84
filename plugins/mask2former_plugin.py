"""Airflow 3 plugin: a "Mask2Former jobs" page (FastAPI app on the API server) and the task extra link.

* ``fastapi_apps``: an app mounted at ``/mask2former`` listing the job folders of the results root (local
  or S3) with their status, headline metrics (mIoU, PQ, AP), progress plots and images, newest first;
  ``/mask2former/api/jobs`` serves the same as JSON. Every route needs an authenticated Airflow user (the
  UI's session cookie or ``Authorization: Bearer <JWT>``).
* ``external_views``: a navigation entry that opens the page inside the Airflow UI.
* ``operator_extra_links``: "Mask2Former job" on every Mask2Former task, pointing at its job page.

The results root is the Variable ``mask2former_results_root``, else env ``MASK2FORMER_RESULTS_ROOT``, else
``$AIRFLOW_HOME/mask2former/results`` (the operators' default). Every route also takes ``root``: the root
of a run triggered with its own ``results_root`` (the extra link of such a task carries it); see
:func:`browsed_root` for which roots are accepted. Job folders are read through the operators' storage hook
of the ``aws_default`` connection, the one the operators publish with.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Annotated, Any, Dict, Optional

from airflow.plugins_manager import AirflowPlugin
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

import mask2former_jobs as jobs
from mask2former.data.sources import local_path_of, uri_scheme
from operators.hooks.storage import Mask2FormerStorageHook
from operators.links.job import PLUGIN_URL_PREFIX, Mask2FormerJobLink
from operators.utils.jobs import RESULTS_ROOT_VARIABLE, results_root_or_default

AWS_CONN_ID = "aws_default"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Served files never run as a page of this origin (an SVG's script) nor get sniffed into another type.
FILE_HEADERS = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}

log = logging.getLogger(__name__)

RootParam = Annotated[Optional[str], Query(description="A run's own results root (s3://bucket/prefix, or the "
                                                       "configured root); default: the configured results root.")]
LimitParam = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Jobs shown, newest first.")]
OffsetParam = Annotated[int, Query(ge=0, description="Newer jobs skipped.")]


def configured_results_root() -> str:
    """The deployment's results root (Variable, env, then the operators' default), the Variable read from the
    metadata database the API server has."""
    value = None
    try:
        from airflow.models.variable import Variable

        value = Variable.get(RESULTS_ROOT_VARIABLE, default_var=None)
    except Exception:  # noqa: BLE001 - no metadata database reachable: fall back to the environment
        value = None
    return results_root_or_default(value)


def browsed_root(requested: Optional[str]) -> str:
    """The results root a request browses: the configured one, or ``requested`` if it is allowed (403 if not).

    Allowed: the configured root itself (under any spelling) and any ``s3://`` root. A local path other
    than the configured root is refused: the pages run in the API server, so accepting one would let every
    Airflow user read files of that host (``root=/etc``). S3 roots are accepted because a run may publish
    to its own bucket (trigger param ``results_root``); what can be read there is bounded by the
    permissions of the ``aws_default`` connection, which the deployment chose, and only job folders (a
    status.json at dag/run/task depth) are listed and served from. Narrow that connection's policy to the
    results buckets to narrow what the pages can show.
    """
    configured = configured_results_root()
    if not requested or _same_root(requested, configured):
        return configured
    if _is_s3(requested):
        return requested
    raise HTTPException(status_code=403, detail="Only the configured results root or an s3:// results root can be "
                                                "browsed; local paths other than the configured root are refused.")


def _is_s3(root: str) -> bool:
    try:
        return uri_scheme(root) == "s3"
    except ValueError:  # another scheme (http://...): not a results root
        return False


def _same_root(one: str, other: str) -> bool:
    if _is_s3(one) or _is_s3(other):
        return one.rstrip("/") == other.rstrip("/")
    try:
        return Path(local_path_of(one)).resolve() == Path(local_path_of(other)).resolve()
    except ValueError:
        return False


_hook_lock = threading.Lock()
_cached_hook: Dict[str, Any] = {}  # {"fingerprint": digest of the connection's URI, "hook": its storage hook}


def storage() -> Mask2FormerStorageHook:
    """The storage hook of the ``aws_default`` connection.

    Its S3 client costs about 120 ms to create, more than the S3 reads of a page, and a job page makes one
    request per image, so the hook (and its client) is kept while the connection stays the same: the
    connection itself is looked up on every request (under a millisecond), and a changed endpoint or key
    gets a new hook. Only a digest of the connection's URI is kept, never the URI (it holds the secret key).
    """
    fingerprint = hashlib.sha256(Mask2FormerStorageHook.get_connection(AWS_CONN_ID).get_uri().encode()).hexdigest()
    with _hook_lock:
        if _cached_hook.get("fingerprint") != fingerprint:
            _cached_hook.update(fingerprint=fingerprint, hook=Mask2FormerStorageHook(aws_conn_id=AWS_CONN_ID))
        return _cached_hook["hook"]


def open_root(requested: Optional[str]) -> jobs.JobRoot:
    return jobs.open_root(browsed_root(requested), storage)


def root_params(requested: Optional[str]) -> Dict[str, str]:
    """The query the pages' links carry so that they stay on the browsed root."""
    return {"root": requested} if requested else {}


def task_state(job: str) -> Optional[str]:
    """The state of the task instance a job id names (dag / run / task[.mapN]), from the metadata database."""
    parts = job.split("/")
    if len(parts) != jobs.JOB_DEPTH:
        return None
    dag_id, run_id, task = parts
    task_id, _, mapped = task.partition(".map")
    try:
        from sqlalchemy import select

        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        with create_session() as session:
            state = session.scalar(select(TaskInstance.state).where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id,
                TaskInstance.map_index == (int(mapped) if mapped.isdigit() else -1)))
        return str(getattr(state, "value", state)) if state is not None else None
    except Exception:  # noqa: BLE001 - no metadata database: the page says what it can
        return None


async def require_user(request: Request) -> object:
    """An authenticated Airflow user, from the Bearer token or the UI's session cookie (401/403 otherwise)."""
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.core_api.security import resolve_user_from_token

    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    return await resolve_user_from_token(token)


def results_root_error(request: Request, error: jobs.ResultsRootError) -> JSONResponse:
    """A results root that cannot be read: its status and a message naming the root and what failed."""
    log.warning("Mask2Former jobs page %s: %s", request.url.path, error.detail)
    return JSONResponse({"detail": error.detail}, status_code=error.status_code)


def build_app() -> FastAPI:
    router = APIRouter(dependencies=[Depends(require_user)])

    @router.get("/", response_class=HTMLResponse)
    def job_list(root: RootParam = None, limit: LimitParam = DEFAULT_LIMIT, offset: OffsetParam = 0) -> str:
        store = open_root(root)
        return jobs.render_list(store.location, jobs.list_jobs(store, limit, offset), PLUGIN_URL_PREFIX,
                                root_params(root))

    @router.get("/api/jobs")
    def job_list_json(root: RootParam = None, limit: LimitParam = DEFAULT_LIMIT, offset: OffsetParam = 0) -> dict:
        store = open_root(root)
        page = jobs.list_jobs(store, limit, offset)
        return {"jobs": [jobs.job_json(j) for j in page.jobs], "total_entries": page.total,
                "results_root": store.location}

    @router.get("/jobs/{job:path}", response_class=HTMLResponse)
    def job_page(job: str, root: RootParam = None) -> str:
        store = open_root(root)
        found = jobs.load_job(store, job)
        if found is None:
            return HTMLResponse(jobs.render_missing(job, store.location, task_state(job), PLUGIN_URL_PREFIX,
                                                    root_params(root)), status_code=404)
        summary, files = found
        return jobs.render_job(summary, files, PLUGIN_URL_PREFIX, root_params(root))

    @router.get("/files/{relative:path}")
    def job_file(relative: str, root: RootParam = None) -> StreamingResponse:
        served = jobs.open_served_file(open_root(root), relative)
        if served is None:
            raise HTTPException(status_code=404, detail=f"No servable file {relative!r}.")
        opened, media_type = served
        headers = dict(FILE_HEADERS)
        if opened.size is not None:
            headers["Content-Length"] = str(opened.size)
        return StreamingResponse(opened.chunks, media_type=media_type, headers=headers)

    app = FastAPI(title="Mask2Former jobs", description="Mask2Former job folders, metrics and plots.")
    app.include_router(router)
    app.add_exception_handler(jobs.ResultsRootError, results_root_error)
    return app


app = build_app()


class Mask2FormerPlugin(AirflowPlugin):
    name = "mask2former"
    fastapi_apps = [{"app": app, "url_prefix": PLUGIN_URL_PREFIX, "name": "Mask2Former jobs"}]
    external_views = [{"name": "Mask2Former jobs", "href": f"{PLUGIN_URL_PREFIX}/", "destination": "nav",
                       "category": "browse", "url_route": "mask2former"}]
    operator_extra_links = [Mask2FormerJobLink()]
