"""Mask2Former job folders under a results root (a local folder or S3), read for the plugin's pages.

A job folder is ``<root>/<dag_id>/<run_id>/<task_id>`` (a mapped task's folder is ``<task_id>.map<N>``)
holding status.json (JSON lines) and, when finished, metrics.json and ``_FINISHED``. A :class:`JobRoot` reads
the folders of one results root (a directory or ``s3://bucket/prefix``) through the operators' storage hook,
so both kinds of root behave the same, path checks included.

Pages are plain HTML with inline SVG charts: no JavaScript, no assets.
"""

from __future__ import annotations

import html
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple
from urllib.parse import quote, urlencode

from mask2former import results
from mask2former.data.sources import join_uri, local_path_of, parse_s3_uri, uri_scheme
from operators.hooks.storage import (FINISHED_MARKER, Mask2FormerStorageHook, OpenedFile, StorageError,
                                     StorageNotFound, StoredFile)
from operators.utils.outcome import small_metrics

#: Metrics shown as columns of the job list, when a job has them.
HEADLINE_METRICS = ("mIoU", "PQ", "AP", "pixel_accuracy")
#: The validation metric whose best epoch the list shows.
BEST_METRIC = "mIoU"
#: Depth of job folders under the root (dag / run / task).
JOB_DEPTH = 3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")
#: The only files served: what the project writes into a job folder, by suffix (images, tables, specs, logs)...
SERVED_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
    ".yaml": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8", ".csv": "text/csv; charset=utf-8",
}
#: ... and, of JSON files, only the project's own reports by name (never any other JSON a bucket may hold).
SERVED_JSON = frozenset({"status.json", "metrics.json", "best_model.json", "best_trial.json", "trials.json",
                         "automl_plan.json", "engine_report.json", "export_report.json", "quantize_report.json",
                         "instances.json", "panoptic.json", "mlflow_run.json"})
#: Images shown in a job page's gallery.
MAX_GALLERY_IMAGES = 24
#: Parallel reads of the jobs of one list page (each job is one or two GETs on S3).
READ_WORKERS = 8
#: What botocore accepts as a bucket name (legacy names included); anything else is a bad ``root``.
_BUCKET_NAME = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


class ResultsRootError(Exception):
    """A results root that cannot be read; ``detail`` names the root and what failed, never credentials."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


# ------------------------------------------------------------------------------------ paths


def safe_parts(path: str) -> Optional[List[str]]:
    """The components of a relative path that stays inside the root, or None.

    Refused: absolute paths, empty, ``.`` and ``..`` components, backslashes and NUL. URL-encoded
    separators arrive here decoded (``..%2F`` is ``../``), so they are refused too; a still-encoded
    ``%2e%2e`` is a literal name, never a parent folder, on disk and on S3.
    """
    if not path or "\\" in path or "\x00" in path:
        return None
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return parts


def is_job_id(job: str) -> bool:
    parts = safe_parts(job)
    return parts is not None and len(parts) == JOB_DEPTH


# ------------------------------------------------------------------------------------ the root


@contextmanager
def _root_errors(location: str) -> Iterator[None]:
    """Storage failures as :class:`ResultsRootError` naming the root (404: its bucket does not exist; else 502)."""
    try:
        yield
    except StorageNotFound as error:
        raise ResultsRootError(404, f"Results root {location}: {error}") from None
    except StorageError as error:
        raise ResultsRootError(502, f"Results root {location}: {error}") from None
    except Exception as error:  # noqa: BLE001 - the provider failed (no connection, bad config): name it only
        raise ResultsRootError(502, f"Cannot read the results root {location}: the S3 client could not be created "
                                    f"({type(error).__name__}).") from None


class JobRoot:
    """The job folders under one results root, read through the storage hook. Paths are relative to the root
    and already checked by :func:`safe_parts`; a local file reached through a link leading out of the root is
    never read. Storage failures become :class:`ResultsRootError` naming the root."""

    def __init__(self, location: str, hook: Any, dag_ids: Optional[frozenset] = None,
                 run_order: Optional[Mapping[Tuple[str, str], float]] = None) -> None:
        self.location = location
        self.hook = hook
        #: the DAG folders the user may read (None: every one)
        self.dag_ids = dag_ids
        #: (dag, run) -> when the run started (newest first in lists); runs not in it sort by name
        self.run_order = dict(run_order or {})

    def _uri(self, path: str) -> str:
        return join_uri(self.location, path) if path else self.location

    def list_files(self, folder: str = "", depth: Optional[int] = None) -> Iterator[StoredFile]:
        """Files under ``folder`` ('' is the root): all of them, or only those ``depth`` levels below it."""
        with _root_errors(self.location):
            for stored in self.hook.list_files(self._uri(folder), depth):
                yield StoredFile(f"{folder}/{stored.path}" if folder else stored.path, stored.size, stored.modified)

    def folders(self, folder: str = "") -> List[str]:
        """Names of the folders directly under ``folder`` (S3: one delimiter listing)."""
        with _root_errors(self.location):
            return [name for name in self.hook.list_folders(self._uri(folder)) if safe_parts(name) == [name]]

    def exists(self, path: str) -> bool:
        with _root_errors(self.location):
            return self.hook.exists(self._uri(path), inside=self.location)

    def open(self, path: str) -> Optional[OpenedFile]:
        with _root_errors(self.location):
            return self.hook.open(self._uri(path), inside=self.location)


def open_root(root: str, s3_storage: Callable[[], Any], *, dag_ids: Optional[frozenset] = None,
              run_order: Optional[Mapping[Tuple[str, str], float]] = None) -> JobRoot:
    """The job folders of a results root (path, ``file://`` or ``s3://``) that the user may read (``dag_ids``;
    None: all); ``s3_storage`` gives the storage hook of S3 roots (a local root needs no connection)."""
    try:
        if uri_scheme(root) == "s3":
            bucket = parse_s3_uri(root).bucket
            if not _BUCKET_NAME.match(bucket):
                raise ValueError(f"{bucket!r} is not an S3 bucket name")
        else:
            local_path_of(root)
    except ValueError as exc:
        raise ResultsRootError(400, f"Not a results root: {exc}.") from None
    with _root_errors(root):
        hook = s3_storage() if uri_scheme(root) == "s3" else Mask2FormerStorageHook(aws_conn_id=None)
        return JobRoot(root, hook, dag_ids=dag_ids, run_order=run_order)


# ------------------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class JobEntry:
    """A job as listed, before any of its files is read."""

    job_id: str
    modified: float  #: when its status.json was last written
    names: frozenset  #: the files at the top of its folder (status.json, metrics.json, _FINISHED, ...)


@dataclass
class JobSummary:
    job_id: str
    location: str
    action: Optional[str]
    status: Optional[str]
    message: str
    updated: str
    finished: bool
    metrics: Dict[str, Any] = field(default_factory=dict)
    status_lines: List[Dict[str, Any]] = field(default_factory=list)
    mlflow: Optional[Dict[str, Any]] = None  #: the job's MLflow run (mlflow_run.json), when tracked
    tensorboard: Optional[str] = None  #: the folder of its TensorBoard event files, when it has some


@dataclass
class JobPage:
    jobs: List[JobSummary]
    total: int
    offset: int
    limit: int


def _read(store: JobRoot, path: str) -> bytes:
    opened = store.open(path)
    return b"" if opened is None else b"".join(opened.chunks)


def _parse_metrics(data: bytes) -> Dict[str, Any]:
    try:
        return small_metrics(json.loads(data), limit=None) if data else {}
    except json.JSONDecodeError:
        return {}


def headline(metrics: Dict[str, Any], name: str) -> Optional[float]:
    if isinstance(metrics.get(name), (int, float)):
        return metrics[name]
    hits = [v for k, v in metrics.items() if k.endswith("." + name) and isinstance(v, (int, float))]
    return hits[0] if hits else None


def allowed_job(store: JobRoot, job: str) -> bool:
    return store.dag_ids is None or job.split("/", 1)[0] in store.dag_ids


def job_ids(store: JobRoot) -> List[str]:
    """The job folders (dag / run / task) of the DAGs the user may read, newest run first.

    Found level by level with delimiter listings (the root's DAG folders, then each readable DAG's runs, then
    each run's tasks): never a page of the checkpoints, TensorBoard events or images inside the jobs.
    """
    runs = []
    for dag in store.folders(""):
        if store.dag_ids is None or dag in store.dag_ids:
            runs.extend((dag, run) for run in store.folders(dag))
    runs.sort(key=lambda key: (store.run_order.get(key, 0.0), key[1], key[0]), reverse=True)
    return [f"{dag}/{run}/{task}" for dag, run in runs for task in sorted(store.folders(f"{dag}/{run}"), reverse=True)]


def job_entry(store: JobRoot, job: str) -> Optional[JobEntry]:
    """A job's top-level files (one delimiter listing), or None when the folder holds no status.json."""
    tops = {stored.path.rsplit("/", 1)[-1]: stored for stored in store.list_files(job, depth=1)}
    if results.STATUS_FILE not in tops:
        return None
    return JobEntry(job, tops[results.STATUS_FILE].modified, frozenset(tops))


def read_job(store: JobRoot, entry: JobEntry) -> JobSummary:
    """A job's status lines and metrics (metrics.json is read only when the listing saw it)."""
    lines, _ = results.parse_status(_read(store, f"{entry.job_id}/{results.STATUS_FILE}"))
    metrics = _parse_metrics(_read(store, f"{entry.job_id}/{results.METRICS_FILE}")) \
        if results.METRICS_FILE in entry.names else {}
    last = lines[-1] if lines else {}
    first_message = str(lines[0].get("message", "")) if lines else ""
    action = first_message.split(" ", 1)[0] if first_message.endswith("started") else None
    action = action or (lines[0].get("action") if lines else None)  # a skipped task's one line names it
    return JobSummary(job_id=entry.job_id, location=f"{store.location.rstrip('/')}/{entry.job_id}", action=action,
                      status=last.get("status"), message=str(last.get("message", "")),
                      updated=f"{last.get('date', '')} {last.get('time', '')}".strip(),
                      finished=FINISHED_MARKER in entry.names, metrics=metrics, status_lines=lines)


def list_jobs(store: JobRoot, limit: int, offset: int = 0) -> JobPage:
    """The jobs ``offset`` to ``offset + limit`` of the newest-first list; only those are read."""
    found = job_ids(store)
    shown = found[offset:offset + limit]

    def summary(job: str) -> Optional[JobSummary]:
        entry = job_entry(store, job)
        return read_job(store, entry) if entry else None

    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        summaries = [s for s in pool.map(summary, shown) if s is not None]
    return JobPage(jobs=summaries, total=len(found), offset=offset, limit=limit)


def load_job(store: JobRoot, job: str) -> Optional[Tuple[JobSummary, List[StoredFile]]]:
    """A job and every file of its folder, or None (not a job id, or no status.json there)."""
    if not is_job_id(job) or not allowed_job(store, job):
        return None
    files = sorted(store.list_files(job), key=lambda stored: stored.path)
    tops = {f.path[len(job) + 1:]: f for f in files if f.path.count("/") == JOB_DEPTH}
    if results.STATUS_FILE not in tops:
        return None
    entry = JobEntry(job, tops[results.STATUS_FILE].modified, frozenset(tops))
    summary = read_job(store, entry)
    if "mlflow_run.json" in tops:
        try:
            summary.mlflow = json.loads(_read(store, f"{job}/mlflow_run.json"))
        except json.JSONDecodeError:
            summary.mlflow = None
    if any("/tensorboard/" in f.path for f in files):
        summary.tensorboard = f"{summary.location}/logs/tensorboard"
    return summary, files


def media_type_of(path: str) -> Optional[str]:
    """The content type the pages serve a job file with, or None when it is not one of the project's files."""
    name = PurePosixPath(path).name
    if name in SERVED_JSON:
        return "application/json"
    return SERVED_TYPES.get(PurePosixPath(name).suffix.lower())


def is_served_name(path: str) -> bool:
    return media_type_of(path) is not None


def open_served_file(store: JobRoot, path: str) -> Optional[Tuple[OpenedFile, str]]:
    """A file of a job folder that the pages may serve, with its content type, or None.

    Only files inside a job folder (one holding status.json) with a served suffix: with a per-run S3
    root this keeps other objects the connection can read out of reach.
    """
    parts = safe_parts(path)
    if parts is None or len(parts) <= JOB_DEPTH:
        return None
    media_type = media_type_of(path)
    if media_type is None or not allowed_job(store, "/".join(parts[:JOB_DEPTH])) or not store.exists("/".join(parts[:JOB_DEPTH] + [results.STATUS_FILE])):
        return None
    opened = store.open(path)
    return None if opened is None else (opened, media_type)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(lines: List[Dict[str, Any]]) -> Dict[str, List[Tuple[float, float]]]:
    """Per-epoch kpi values of the status lines (lines that carry an epoch): one series per kpi name, the last
    value of an epoch kept (a resumed run repeats epochs)."""
    out: Dict[str, Dict[float, float]] = {}
    for line in lines:
        kpi, epoch = line.get("kpi"), line.get("epoch")
        if not isinstance(kpi, dict) or not _number(epoch):
            continue
        for name, value in kpi.items():
            if _number(value):
                out.setdefault(name, {})[float(epoch)] = float(value)
    return {name: sorted(points.items()) for name, points in out.items()}


def best_of(lines: List[Dict[str, Any]], name: str = BEST_METRIC) -> Optional[Dict[str, float]]:
    """The best (highest) per-epoch value of ``name`` with its epoch, or None."""
    points = series(lines).get(name)
    if not points:
        return None
    epoch, value = max(points, key=lambda point: (point[1], -point[0]))
    return {"value": value, "epoch": int(epoch) if float(epoch).is_integer() else epoch}


# ------------------------------------------------------------------------------------ pages


def svg_chart(name: str, points: List[Tuple[float, float]], width: int = 360, height: int = 180) -> str:
    """A small line chart (inline SVG) of one series."""
    pad = 36
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    sx = (width - 2 * pad) / ((x1 - x0) or 1)
    sy = (height - 2 * pad) / ((y1 - y0) or 1)
    coords = [(pad + (x - x0) * sx, height - pad - (y - y0) * sy) for x, y in points]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in coords)
    return (f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="{html.escape(name)}">'
            f'<text x="{pad}" y="18" class="title">{html.escape(name)}</text>'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" class="axis"/>'
            f'<text x="4" y="{pad + 4}" class="tick">{y1:.4g}</text>'
            f'<text x="4" y="{height - pad}" class="tick">{y0:.4g}</text>'
            f'<text x="{pad}" y="{height - pad + 16}" class="tick">{x0:g}</text>'
            f'<text x="{width - pad - 12}" y="{height - pad + 16}" class="tick">{x1:g}</text>'
            f'<polyline points="{path}" class="line"/>{dots}</svg>')


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222} table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;font-size:.9rem} th{background:#f3f3f3}
.SUCCESS{color:#2a7d2a}.FAILURE{color:#b00020}.SKIPPED{color:#666}.RUNNING,.STARTED{color:#a06000}
.chart{border:1px solid #ddd;margin:.25rem}.chart .line{fill:none;stroke:#76b900;stroke-width:2}
.chart circle{fill:#76b900}.chart .axis{stroke:#888}.chart .title{font-size:12px;font-weight:bold}
.chart .tick{font-size:10px;fill:#555} img.result{max-width:480px;border:1px solid #ddd;margin:.25rem}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _href(path: str, params: Mapping[str, Any]) -> str:
    """An escaped href: ``path`` (URL-quoted) and the query ``params`` (the browsed root, paging)."""
    url = quote(path) + (f"?{urlencode(params)}" if params else "")
    return html.escape(url, quote=True)


def render_list(location: str, page: JobPage, base: str, root_params: Mapping[str, str]) -> str:
    """The job list page; ``root_params`` (``{"root": ...}`` or empty) is carried by every link."""
    heads = "".join(f"<th>{m}</th>" for m in HEADLINE_METRICS) + f"<th>best {BEST_METRIC} (epoch)</th>"
    rows = []
    for job in page.jobs:
        cells = "".join(f"<td>{_fmt(v) if (v := headline(job.metrics, m)) is not None else ''}</td>"
                        for m in HEADLINE_METRICS)
        best = best_of(job.status_lines)
        cells += f"<td>{_fmt(best['value'])} (epoch {best['epoch']})</td>" if best else "<td></td>"
        rows.append(f"<tr><td><a href='{_href(f'{base}/jobs/{job.job_id}', root_params)}'>"
                    f"{html.escape(job.job_id)}</a></td>"
                    f"<td>{_fmt(job.action or '')}</td><td class='{_fmt(job.status)}'>{_fmt(job.status or '')}</td>"
                    f"<td>{_fmt(job.updated)}</td>{cells}<td>{_fmt(job.message)}</td></tr>")
    table = (f"<table><tr><th>job (dag / run / task)</th><th>action</th><th>status</th><th>updated</th>{heads}"
             f"<th>last message</th></tr>{''.join(rows)}</table>") if rows else "<p>No jobs yet.</p>"
    shown = f"{page.offset + 1}-{page.offset + len(page.jobs)} of " if page.jobs else ""
    more = page.offset + page.limit
    older = (f"<p><a href='{_href(f'{base}/', {**root_params, 'offset': more, 'limit': page.limit})}'>"
             "Older jobs</a></p>") if more < page.total else ""
    return _page("Mask2Former jobs", f"<h1>Mask2Former jobs</h1><p>Results root: <code>{html.escape(location)}"
                                     f"</code> ({shown}{page.total} jobs, newest first)</p>{table}{older}")


def render_job(job: JobSummary, files: List[StoredFile], base: str, root_params: Mapping[str, str]) -> str:
    """A job page: metrics, progress plots, images, status lines and files; links carry ``root_params``."""
    per_epoch = series(job.status_lines)
    charts = "".join(svg_chart(name, pts) for name, pts in sorted(per_epoch.items()) if len(pts) > 1)
    single = {name: pts[0][1] for name, pts in per_epoch.items() if len(pts) == 1}
    for line in job.status_lines:  # kpi values without an epoch (a result): values, never a chart
        if isinstance(line.get("kpi"), dict) and not _number(line.get("epoch")):
            single.update({name: value for name, value in line["kpi"].items() if _number(value)})
    metric_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>"
                          for k, v in sorted({**single, **job.metrics}.items()))
    tracking = ""
    run = job.mlflow or {}
    if run.get("run_id") and str(run.get("tracking_uri", "")).startswith(("http://", "https://")):
        url = f"{run['tracking_uri'].rstrip('/')}/#/experiments/{run.get('experiment_id', '0')}/runs/{run['run_id']}"
        tracking += f"<p>MLflow run: <a class='mlflow' href='{html.escape(url, quote=True)}'>{html.escape(run['run_id'])}</a></p>"
    if job.tensorboard:
        tracking += (f"<p>TensorBoard logs: <code>{html.escape(job.tensorboard)}</code> "
                     f"(<code>tensorboard --logdir {html.escape(job.tensorboard)}</code>)</p>")
    best = best_of(job.status_lines)
    best_line = (f"<p class='best'>Best {BEST_METRIC}: <b>{_fmt(best['value'])}</b> at epoch {best['epoch']}</p>"
                 if best else "")
    status_rows = "".join(
        f"<tr><td>{_fmt(line.get('date', ''))} {_fmt(line.get('time', ''))}</td>"
        f"<td class='{_fmt(line.get('status'))}'>{_fmt(line.get('status', ''))}</td>"
        f"<td>{_fmt(line.get('message', ''))}</td><td>{_fmt(line.get('epoch', ''))}</td>"
        f"<td>{_fmt(json.dumps(line['kpi']) if line.get('kpi') else '')}</td></tr>"
        for line in job.status_lines)
    images = [f for f in files if PurePosixPath(f.path).suffix.lower() in IMAGE_SUFFIXES][:MAX_GALLERY_IMAGES]
    gallery = "".join(f"<a href='{_href(f'{base}/files/{f.path}', root_params)}'><img class='result' "
                      f"src='{_href(f'{base}/files/{f.path}', root_params)}' "
                      f"alt='{html.escape(PurePosixPath(f.path).name)}'></a>" for f in images)
    served = [f for f in files if is_served_name(f.path)]
    listed = "".join(f"<li><a href='{_href(f'{base}/files/{f.path}', root_params)}'>"
                     f"{html.escape(f.path[len(job.job_id) + 1:])}</a> ({f.size} bytes)</li>" for f in served)
    others = len(files) - len(served)
    if others:
        listed += (f"<li>and {others} other file{'s' if others > 1 else ''} (models, checkpoints, TensorBoard "
                   f"events, markers) not served here: read them from the folder above</li>")
    body = (f"<p><a href='{_href(f'{base}/', root_params)}'>All jobs</a></p><h1>{html.escape(job.job_id)}</h1>"
            f"<p>Action <b>{_fmt(job.action or '?')}</b>, status <b class='{_fmt(job.status)}'>"
            f"{_fmt(job.status or '?')}</b>{', published' if job.finished else ''}. "
            f"Folder <code>{html.escape(job.location)}</code></p>{tracking}"
            f"<h2>Metrics</h2>{best_line}"
            f"{f'<table>{metric_rows}</table>' if metric_rows else '<p>No metrics.json yet.</p>'}"
            f"<h2>Plots</h2>{charts or '<p>No per-epoch values to plot.</p>'}{gallery}"
            f"<h2>Status</h2><table><tr><th>time</th><th>status</th><th>message</th><th>epoch</th><th>kpi</th></tr>"
            f"{status_rows}</table><h2>Files</h2><ul>{listed}</ul>")
    return _page(f"Mask2Former job {job.job_id}", body)


#: What a job page says of a task that has no job folder, by the task instance's state.
_MISSING_BECAUSE = {
    "skipped": "The task was skipped before it started a job: an upstream task was skipped (no new data, a "
               "champion kept, AutoML off) or its branch was not taken. The run's grid shows which.",
    "upstream_failed": "The task never ran: an upstream task failed.",
    "queued": "The task is queued; its job folder appears when it starts.",
    "scheduled": "The task is scheduled; its job folder appears when it starts.",
    "running": "The task is starting its job; reload in a moment.",
    "removed": "The task was removed from the DAG.",
}


def render_missing(job: str, location: str, state: Optional[str], base: str, root_params: Mapping[str, str]) -> str:
    """The page of a job that has no folder: why, from the task's state."""
    why = _MISSING_BECAUSE.get(state or "", "The task has not started a job (it may not have run yet), or its run "
                                             "published to another results root.")
    state_text = f" Task state: <b>{html.escape(state)}</b>." if state else ""
    body = (f"<p><a href='{_href(f'{base}/', root_params)}'>All jobs</a></p><h1>{html.escape(job)}</h1>"
            f"<p class='missing'>No job folder under <code>{html.escape(location)}</code>.{state_text}</p>"
            f"<p>{html.escape(why)}</p>")
    return _page(f"Mask2Former job {job}", body)


def job_json(job: JobSummary) -> Dict[str, Any]:
    return {"job_id": job.job_id, "action": job.action, "status": job.status, "message": job.message,
            "updated": job.updated, "finished": job.finished, "metrics": job.metrics,
            f"best_{BEST_METRIC}": best_of(job.status_lines)}
