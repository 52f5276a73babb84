"""Mask2Former job folders under a results root (a local folder or S3), read for the plugin's pages.

A job folder is ``<root>/<dag_id>/<run_id>/<task_id>`` (a mapped task's folder is ``<task_id>.map<N>``)
holding status.json (JSON lines) and, when finished, metrics.json and ``_FINISHED``. Where the folders
live is a :class:`JobStore`: :class:`LocalJobStore` (a directory) or :class:`S3JobStore` (a bucket and
prefix, through a boto3-style client that the caller passes in). Listing, reading and serving are
written once against that interface, so both roots behave the same, path checks included.

Pages are plain HTML with inline SVG charts: no JavaScript, no assets. No Airflow import here.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Tuple
from urllib.parse import quote, urlencode

from mask2former.data.sources import local_path_of, parse_s3_uri, uri_scheme

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
FINISHED_MARKER = "_FINISHED"
#: Metrics shown as columns of the job list, when a job has them.
HEADLINE_METRICS = ("mIoU", "PQ", "AP", "pixel_accuracy")
#: Depth of job folders under the root (dag / run / task).
JOB_DEPTH = 3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")
#: The only files served, by suffix, with their content type (YAML and logs as text, shown in the browser).
SERVED_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
    ".json": "application/json", ".yaml": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
}
SERVED_SUFFIXES = tuple(SERVED_TYPES)
#: Images shown in a job page's gallery.
MAX_GALLERY_IMAGES = 24
#: Parallel reads of the jobs of one list page (each job is one or two GETs on S3).
READ_WORKERS = 8
CHUNK_BYTES = 256 * 1024
#: What botocore accepts as a bucket name (legacy names included); anything else is a bad ``root``.
_BUCKET_NAME = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_MISSING_OBJECT_CODES = ("NoSuchKey", "404", "NotFound")


class ResultsRootError(Exception):
    """A results root that cannot be read; ``detail`` names the root and what failed, never credentials."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class StoredFile:
    path: str  #: relative to the results root, ``/``-separated
    size: int
    modified: float  #: POSIX timestamp


@dataclass
class OpenedFile:
    chunks: Iterator[bytes]
    size: Optional[int]


class JobStore(Protocol):
    """Where job folders live. Paths are relative to the root and already checked by :func:`safe_parts`."""

    location: str  #: the root as users name it (a path or ``s3://bucket/prefix``), shown in pages and errors

    def list_files(self, folder: str = "", depth: Optional[int] = None) -> Iterator[StoredFile]:
        """Files under ``folder`` ('' is the root): all of them, or only those ``depth`` levels below it."""

    def exists(self, path: str) -> bool:
        """Whether the file exists."""

    def open(self, path: str) -> Optional[OpenedFile]:
        """The file's content as chunks, or None when it does not exist."""


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


# ------------------------------------------------------------------------------------ stores


class LocalJobStore:
    """Job folders in a local directory. A file reached through a link leading out of it is never read."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.location = str(root)

    def _inside(self, path: str) -> Optional[Path]:
        candidate = (self.root / path).resolve()
        return candidate if self.root in candidate.parents else None

    def list_files(self, folder: str = "", depth: Optional[int] = None) -> Iterator[StoredFile]:
        base = self._inside(folder) if folder else self.root
        if base is None or not base.is_dir():
            return
        paths = base.glob("/".join(["*"] * depth)) if depth else _walk_files(base)
        for path in paths:
            if path.is_file():
                stat = path.stat()
                yield StoredFile(path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime)

    def exists(self, path: str) -> bool:
        target = self._inside(path)
        return target is not None and target.is_file()

    def open(self, path: str) -> Optional[OpenedFile]:
        target = self._inside(path)
        if target is None or not target.is_file():
            return None
        handle = target.open("rb")
        return OpenedFile(_read_chunks(handle), os.fstat(handle.fileno()).st_size)


def _walk_files(base: Path) -> Iterator[Path]:
    for folder, _, names in os.walk(base):  # never follows links to folders (no loops)
        for name in names:
            yield Path(folder, name)


def _read_chunks(handle: Any) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


class S3JobStore:
    """Job folders under ``s3://bucket/prefix``, through a boto3-style S3 client.

    Every S3 failure becomes a :class:`ResultsRootError` naming the root: 404 for a missing bucket,
    502 otherwise (unreachable endpoint, refused credentials, ...). S3 keys are literal, so a key that
    contains ``..`` is skipped when listing and refused by :func:`safe_parts` when asked for.
    """

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def list_files(self, folder: str = "", depth: Optional[int] = None) -> Iterator[StoredFile]:
        start = self._key(folder) + "/" if folder else (self.prefix + "/" if self.prefix else "")
        skip = len(self.prefix) + 1 if self.prefix else 0
        with _s3_failures(self.location, "Listing"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start)
            for page in pages:
                for item in page.get("Contents", []):
                    path = item["Key"][skip:]
                    below = path[len(folder) + 1:] if folder else path
                    if safe_parts(path) is None or (depth and below.count("/") + 1 != depth):
                        continue
                    yield StoredFile(path, int(item.get("Size", 0)), item["LastModified"].timestamp())

    def exists(self, path: str) -> bool:
        from botocore.exceptions import ClientError

        with _s3_failures(self.location, f"Reading {path} from"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(path))
            except ClientError as error:
                if _error_code(error) in _MISSING_OBJECT_CODES:
                    return False
                raise
        return True

    def open(self, path: str) -> Optional[OpenedFile]:
        from botocore.exceptions import ClientError

        with _s3_failures(self.location, f"Reading {path} from"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
            except ClientError as error:
                if _error_code(error) in _MISSING_OBJECT_CODES:
                    return None
                raise
        return OpenedFile(response["Body"].iter_chunks(CHUNK_BYTES), response.get("ContentLength"))


def _error_code(error: Any) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


@contextmanager
def _s3_failures(location: str, doing: str) -> Iterator[None]:
    """Turn botocore errors into :class:`ResultsRootError`; only error codes and class names are kept."""
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as EndpointUnreachable

    try:
        yield
    except ClientError as error:
        code = _error_code(error)
        if code == "NoSuchBucket":
            raise ResultsRootError(404, f"{doing} the results root {location} failed: the bucket does not "
                                        "exist (NoSuchBucket).") from None
        raise ResultsRootError(502, f"{doing} the results root {location} failed: S3 answered "
                                    f"{code or 'an error'}.") from None
    except EndpointUnreachable as error:
        raise ResultsRootError(502, f"{doing} the results root {location} failed: the S3 endpoint could not be "
                                    f"reached ({type(error).__name__}).") from None
    except BotoCoreError as error:
        raise ResultsRootError(502, f"{doing} the results root {location} failed: the S3 client failed "
                                    f"({type(error).__name__}).") from None


def open_store(root: str, s3_client: Callable[[], Any]) -> JobStore:
    """The store of a results root (path, ``file://`` or ``s3://``); ``s3_client`` is called for S3 roots only."""
    try:
        if uri_scheme(root) != "s3":
            return LocalJobStore(Path(local_path_of(root)))
        location = parse_s3_uri(root)
    except ValueError as exc:
        raise ResultsRootError(400, f"Not a results root: {exc}.") from None
    if not _BUCKET_NAME.match(location.bucket):
        raise ResultsRootError(400, f"Not a results root: {location.bucket!r} is not an S3 bucket name.")
    try:
        client = s3_client()
    except Exception as exc:  # noqa: BLE001 - any failure of the provider: name it, keep its text out
        raise ResultsRootError(502, f"Cannot read the results root {root}: the S3 client could not be created "
                                    f"({type(exc).__name__}).") from None
    return S3JobStore(location.bucket, location.key, client)


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


@dataclass
class JobPage:
    jobs: List[JobSummary]
    total: int
    offset: int
    limit: int


def _read_text(store: JobStore, path: str) -> Optional[str]:
    opened = store.open(path)
    return None if opened is None else b"".join(opened.chunks).decode("utf-8", errors="replace")


def _parse_lines(text: str) -> List[Dict[str, Any]]:
    lines = []
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def flatten_scalars(data: Any, prefix: str = "", depth: int = 0) -> Dict[str, Any]:
    """Numbers and strings of a metrics document under dotted keys (lists and deep tables left out)."""
    flat: Dict[str, Any] = {}
    if not isinstance(data, dict) or depth > 3:
        return flat
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_scalars(value, name + ".", depth + 1))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def _parse_metrics(text: Optional[str]) -> Dict[str, Any]:
    try:
        return flatten_scalars(json.loads(text)) if text else {}
    except json.JSONDecodeError:
        return {}


def headline(metrics: Dict[str, Any], name: str) -> Optional[float]:
    if isinstance(metrics.get(name), (int, float)):
        return metrics[name]
    hits = [v for k, v in metrics.items() if k.endswith("." + name) and isinstance(v, (int, float))]
    return hits[0] if hits else None


def job_entries(store: JobStore) -> List[JobEntry]:
    """Every job of the store (a status.json at dag/run/task depth), newest status.json first.

    One listing and no reads: on S3 a few ``list_objects_v2`` pages, however many jobs there are.
    """
    tops: Dict[str, Dict[str, StoredFile]] = {}
    for stored in store.list_files("", depth=JOB_DEPTH + 1):
        job, name = stored.path.rsplit("/", 1)
        tops.setdefault(job, {})[name] = stored
    entries = [JobEntry(job, files[STATUS_FILE].modified, frozenset(files))
               for job, files in tops.items() if STATUS_FILE in files]
    return sorted(entries, key=lambda entry: (entry.modified, entry.job_id), reverse=True)


def read_job(store: JobStore, entry: JobEntry) -> JobSummary:
    """A job's status lines and metrics (metrics.json is read only when the listing saw it)."""
    lines = _parse_lines(_read_text(store, f"{entry.job_id}/{STATUS_FILE}") or "")
    metrics = _parse_metrics(_read_text(store, f"{entry.job_id}/{METRICS_FILE}")) \
        if METRICS_FILE in entry.names else {}
    last = lines[-1] if lines else {}
    first_message = str(lines[0].get("message", "")) if lines else ""
    action = first_message.split(" ", 1)[0] if first_message.endswith("started") else None
    return JobSummary(job_id=entry.job_id, location=f"{store.location.rstrip('/')}/{entry.job_id}", action=action,
                      status=last.get("status"), message=str(last.get("message", "")),
                      updated=f"{last.get('date', '')} {last.get('time', '')}".strip(),
                      finished=FINISHED_MARKER in entry.names, metrics=metrics, status_lines=lines)


def list_jobs(store: JobStore, limit: int, offset: int = 0) -> JobPage:
    """The jobs ``offset`` to ``offset + limit`` of the newest-first list; only those are read."""
    entries = job_entries(store)
    shown = entries[offset:offset + limit]
    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        summaries = list(pool.map(partial(read_job, store), shown))
    return JobPage(jobs=summaries, total=len(entries), offset=offset, limit=limit)


def load_job(store: JobStore, job: str) -> Optional[Tuple[JobSummary, List[StoredFile]]]:
    """A job and every file of its folder, or None (not a job id, or no status.json there)."""
    if not is_job_id(job):
        return None
    files = sorted(store.list_files(job), key=lambda stored: stored.path)
    tops = {f.path[len(job) + 1:]: f for f in files if f.path.count("/") == JOB_DEPTH}
    if STATUS_FILE not in tops:
        return None
    entry = JobEntry(job, tops[STATUS_FILE].modified, frozenset(tops))
    return read_job(store, entry), files


def open_served_file(store: JobStore, path: str) -> Optional[Tuple[OpenedFile, str]]:
    """A file of a job folder that the pages may serve, with its content type, or None.

    Only files inside a job folder (one holding status.json) with a served suffix: with a per-run S3
    root this keeps other objects the connection can read out of reach.
    """
    parts = safe_parts(path)
    if parts is None or len(parts) <= JOB_DEPTH:
        return None
    media_type = SERVED_TYPES.get(PurePosixPath(path).suffix.lower())
    if media_type is None or not store.exists("/".join(parts[:JOB_DEPTH] + [STATUS_FILE])):
        return None
    opened = store.open(path)
    return None if opened is None else (opened, media_type)


def series(lines: List[Dict[str, Any]]) -> Dict[str, List[Tuple[float, float]]]:
    """Numeric kpi values of the status lines by epoch (or line number): one series per kpi name."""
    out: Dict[str, List[Tuple[float, float]]] = {}
    for index, line in enumerate(lines):
        kpi = line.get("kpi")
        if not isinstance(kpi, dict):
            continue
        x = line.get("epoch") if isinstance(line.get("epoch"), (int, float)) else index
        for name, value in kpi.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out.setdefault(name, []).append((float(x), float(value)))
    return out


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
.SUCCESS{color:#2a7d2a}.FAILURE{color:#b00020}.RUNNING,.STARTED{color:#a06000}
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
    heads = "".join(f"<th>{m}</th>" for m in HEADLINE_METRICS)
    rows = []
    for job in page.jobs:
        cells = "".join(f"<td>{_fmt(v) if (v := headline(job.metrics, m)) is not None else ''}</td>"
                        for m in HEADLINE_METRICS)
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
    charts = "".join(svg_chart(name, pts) for name, pts in sorted(series(job.status_lines).items()) if pts)
    metric_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>"
                          for k, v in sorted(job.metrics.items()))
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
    listed = "".join(f"<li>{html.escape(f.path[len(job.job_id) + 1:])} ({f.size} bytes)</li>" for f in files)
    body = (f"<p><a href='{_href(f'{base}/', root_params)}'>All jobs</a></p><h1>{html.escape(job.job_id)}</h1>"
            f"<p>Action <b>{_fmt(job.action or '?')}</b>, status <b class='{_fmt(job.status)}'>"
            f"{_fmt(job.status or '?')}</b>{', published' if job.finished else ''}. "
            f"Folder <code>{html.escape(job.location)}</code></p>"
            f"<h2>Metrics</h2>{f'<table>{metric_rows}</table>' if metric_rows else '<p>No metrics.json yet.</p>'}"
            f"<h2>Plots</h2>{charts or '<p>No numeric progress values in status.json yet.</p>'}{gallery}"
            f"<h2>Status</h2><table><tr><th>time</th><th>status</th><th>message</th><th>epoch</th><th>kpi</th></tr>"
            f"{status_rows}</table><h2>Files</h2><ul>{listed}</ul>")
    return _page(f"Mask2Former job {job.job_id}", body)


def job_json(job: JobSummary) -> Dict[str, Any]:
    return {"job_id": job.job_id, "action": job.action, "status": job.status, "message": job.message,
            "updated": job.updated, "finished": job.finished, "metrics": job.metrics}
