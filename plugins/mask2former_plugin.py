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
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Dict, Optional, Tuple

from airflow.plugins_manager import AirflowPlugin
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

import mask2former_jobs as jobs
from mask2former.data.sources import local_path_of, uri_scheme
from operators.hooks.storage import Mask2FormerStorageHook
from operators.links.job import PLUGIN_URL_PREFIX, Mask2FormerJobLink
from operators.utils.jobs import JOB_LOCATION_KEY, RESULTS_ROOT_VARIABLE, results_root_or_default, sanitize

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


@dataclass(frozen=True)
class Access:
    """What one user may browse: the DAGs they may read, and the results roots recorded by those DAGs' runs
    (root -> the connection the run published with)."""

    dag_ids: Optional[frozenset]  #: None: every DAG
    recorded_roots: Dict[str, Optional[str]]
    run_order: Dict[Tuple[str, str], float]


def user_access(user: Any) -> Access:
    """The user's readable DAGs through Airflow's auth manager, and their runs' recorded roots and start times
    from the metadata database."""
    from airflow.api_fastapi.app import get_auth_manager

    dag_ids = frozenset(get_auth_manager().get_authorized_dag_ids(user=user, method="GET"))
    return Access(dag_ids=frozenset(sanitize(d) for d in dag_ids), recorded_roots=recorded_roots(dag_ids),
                  run_order=run_order(dag_ids))


def recorded_roots(dag_ids: frozenset) -> Dict[str, Optional[str]]:
    """Results roots recorded by tasks of these DAGs (XCom ``mask2former_job_location``), with their connection."""
    if not dag_ids:
        return {}
    from sqlalchemy import select

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    found: Dict[str, Optional[str]] = {}
    with create_session() as session:
        for value in session.scalars(select(XComModel.value).where(XComModel.key == JOB_LOCATION_KEY,
                                                                   XComModel.dag_id.in_(dag_ids))):
            record = json.loads(value) if isinstance(value, (str, bytes)) else value
            if isinstance(record, dict) and record.get("results_root"):
                found.setdefault(str(record["results_root"]).rstrip("/"), record.get("aws_conn_id"))
    return found


def run_order(dag_ids: frozenset) -> Dict[Tuple[str, str], float]:
    """(dag, run) -> when the run was due, for the newest-first job list."""
    if not dag_ids:
        return {}
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(select(DagRun.dag_id, DagRun.run_id, DagRun.run_after).where(DagRun.dag_id.in_(dag_ids)))
        return {(sanitize(dag), sanitize(run)): due.timestamp() for dag, run, due in rows if due is not None}


def browsed_root(requested: Optional[str], access: Access) -> Tuple[str, Optional[str]]:
    """(results root, connection to read it with) of a request: the configured root (``aws_default``), or a
    root recorded by a run of a DAG the user may read (that run's connection). Anything else is refused (403):
    neither a local path of the API server's host nor a bucket the deployment's credentials happen to reach.
    """
    configured = configured_results_root()
    if not requested or _same_root(requested, configured):
        return configured, AWS_CONN_ID
    for root, conn_id in access.recorded_roots.items():
        if _same_root(requested, root):
            return root, conn_id
    raise HTTPException(status_code=403, detail="Only the configured results root, or a results root recorded by a "
                                                "run of a DAG you may read, can be browsed.")


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
_cached_hooks: Dict[str, Tuple[str, Mask2FormerStorageHook]] = {}  # conn id -> (digest of its URI, its hook)


def storage(conn_id: Optional[str] = AWS_CONN_ID) -> Mask2FormerStorageHook:
    """The storage hook of a connection (the one a run published with).

    Its S3 client costs about 120 ms to create, more than the S3 reads of a page, and a job page makes one
    request per image, so the hook (and its client) is kept while the connection stays the same: the
    connection itself is looked up on every request (under a millisecond), and a changed endpoint or key
    gets a new hook. Only a digest of the connection's URI is kept, never the URI (it holds the secret key).
    """
    conn_id = conn_id or AWS_CONN_ID
    fingerprint = hashlib.sha256(Mask2FormerStorageHook.get_connection(conn_id).get_uri().encode()).hexdigest()
    with _hook_lock:
        cached = _cached_hooks.get(conn_id)
        if cached is None or cached[0] != fingerprint:
            cached = _cached_hooks[conn_id] = (fingerprint, Mask2FormerStorageHook(aws_conn_id=conn_id))
        return cached[1]


def open_root(requested: Optional[str], access: Access) -> jobs.JobRoot:
    root, conn_id = browsed_root(requested, access)
    return jobs.open_root(root, lambda: storage(conn_id), dag_ids=access.dag_ids, run_order=access.run_order)


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


def current_access(user: Annotated[Any, Depends(require_user)]) -> Access:
    """What the request's user may browse (see :func:`user_access`)."""
    return user_access(user)


AccessDep = Annotated[Access, Depends(current_access)]


def results_root_error(request: Request, error: jobs.ResultsRootError) -> JSONResponse:
    """A results root that cannot be read: its status and a message naming the root and what failed."""
    log.warning("Mask2Former jobs page %s: %s", request.url.path, error.detail)
    return JSONResponse({"detail": error.detail}, status_code=error.status_code)


def build_app() -> FastAPI:
    router = APIRouter(dependencies=[Depends(require_user)])

    @router.get("/", response_class=HTMLResponse)
    def job_list(access: AccessDep, root: RootParam = None, limit: LimitParam = DEFAULT_LIMIT,
                 offset: OffsetParam = 0) -> str:
        store = open_root(root, access)
        return jobs.render_list(store.location, jobs.list_jobs(store, limit, offset), PLUGIN_URL_PREFIX,
                                root_params(root))

    @router.get("/api/jobs")
    def job_list_json(access: AccessDep, root: RootParam = None, limit: LimitParam = DEFAULT_LIMIT,
                      offset: OffsetParam = 0) -> dict:
        store = open_root(root, access)
        page = jobs.list_jobs(store, limit, offset)
        return {"jobs": [jobs.job_json(j) for j in page.jobs], "total_entries": page.total,
                "results_root": store.location}

    @router.get("/jobs/{job:path}", response_class=HTMLResponse)
    def job_page(access: AccessDep, job: str, root: RootParam = None) -> str:
        store = open_root(root, access)
        if not jobs.allowed_job(store, job):
            raise HTTPException(status_code=404, detail=f"No job {job!r} of a DAG you may read.")
        found = jobs.load_job(store, job)
        if found is None:
            return HTMLResponse(jobs.render_missing(job, store.location, task_state(job), PLUGIN_URL_PREFIX,
                                                    root_params(root)), status_code=404)
        summary, files = found
        return jobs.render_job(summary, files, PLUGIN_URL_PREFIX, root_params(root))

    @router.get("/files/{relative:path}")
    def job_file(access: AccessDep, relative: str, root: RootParam = None) -> StreamingResponse:
        served = jobs.open_served_file(open_root(root, access), relative)
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
