"""Staging: make every ``s3://`` / ``file://`` data source local, once; publish results folders.

* :func:`stage_sources` rewrites a dict of dotted overrides so that each ``s3://`` or ``file://`` value
  becomes a local path. S3 objects are downloaded once into a cache keyed by bucket, key and ETag
  (parallel, atomic: temp name then rename). ``.tar.gz`` archives are extracted once into a folder next
  to the cached file (:func:`mask2former.data.archives.safe_extract`) and the override points at that
  folder. ``file://`` archives are extracted into the cache keyed by path, size and mtime; other
  ``file://`` files and plain local paths are used in place, never copied.
* :func:`fetch_uri` does the same for one file (checkpoints, pretrained weights), without extraction, and
  also takes ``https://`` URLs (:mod:`mask2former.data.downloads`) and an expected SHA-256.
* :func:`upload_dir` / :func:`sync_results` publish a results folder to S3 or to a local root, writing
  the ``_FINISHED`` marker last; :func:`is_finished` tells whether a published folder is complete.

S3 clients come from a zero-argument factory returning a boto3-style client:
:func:`default_s3_client_factory` (boto3 with the standard environment, ``AWS_ENDPOINT_URL`` respected)
or ``functools.partial(airflow_s3_client_factory, "aws_default")`` inside Airflow. Credentials are never
logged: messages name URIs, sizes and S3 error codes only.

No torch import here: the Airflow layer imports this module at DAG-parse time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .archives import COMPLETE_MARKER, UnsafeArchiveError, archive_stem, is_archive, safe_extract
from .downloads import download, is_url, verify_sha256
from .sources import S3Location, local_path_of, parse_s3_uri, uri_scheme

__all__ = [
    "FINISHED_MARKER",
    "S3AccessError",
    "SourceNotFoundError",
    "StagingResult",
    "SyncResult",
    "airflow_s3_client_factory",
    "default_s3_client_factory",
    "fetch_uri",
    "head_s3_object",
    "is_finished",
    "stage_sources",
    "sync_results",
    "upload_dir",
]

logger = logging.getLogger(__name__)

#: Written last into a published results folder (an object under the S3 prefix, or a local file).
FINISHED_MARKER = "_FINISHED"
#: Multipart part size and threshold for uploads and downloads; uploads' expected ETags depend on it.
TRANSFER_CHUNK_BYTES = 8 * 1024 * 1024
#: Parallel ranged requests within one transfer.
TRANSFER_CONCURRENCY = 4
#: Seconds between progress lines of one long download.
PROGRESS_INTERVAL_S = 5.0

S3ClientFactory = Callable[[], Any]
Progress = Callable[[str], None]


class SourceNotFoundError(FileNotFoundError):
    """A data source (S3 object or local file) that does not exist."""


class S3AccessError(RuntimeError):
    """S3 answered with an error other than "not found" (403, unreachable endpoint, no credentials)."""


# --------------------------------------------------------------------------------------------- clients


def default_s3_client_factory() -> Any:
    """boto3 S3 client from the standard environment (credentials chain, region, ``AWS_ENDPOINT_URL``)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(max_pool_connections=32, retries={"max_attempts": 5, "mode": "standard"}))


def airflow_s3_client_factory(aws_conn_id: str = "aws_default") -> Any:
    """S3 client of the Airflow connection ``aws_conn_id`` (endpoint_url, region from its extra).

    Inside Airflow pass ``functools.partial(airflow_s3_client_factory, conn_id)`` as ``s3_client_factory``.
    The Amazon provider is imported here, not at module import.
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=aws_conn_id).get_conn()


def head_s3_object(client: Any, location: S3Location) -> dict[str, Any] | None:
    """``head_object`` of the object, or None when it does not exist; other failures raise S3AccessError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client.head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            return None
        detail = f"S3 error {code or 'unknown'} ({_error_text(error)})"
        raise S3AccessError(f"cannot read {location.uri}: {detail}") from error
    except BotoCoreError as error:
        raise S3AccessError(f"cannot read {location.uri}: {type(error).__name__} ({_error_text(error)})") from error


def _error_text(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# ------------------------------------------------------------------------------------------- staging


@dataclass
class StagingResult:
    """What :func:`stage_sources` did.

    ``local_overrides`` is the input dict with every s3:// and file:// value replaced by a local path;
    counters count distinct sources (one URI used by two keys is staged once). A source whose download
    was cached but whose extracted folder had to be rebuilt counts as extracted, not as a cache hit.
    """

    local_overrides: dict[str, Any]
    downloaded_bytes: int = 0
    downloaded_files: int = 0
    cache_hits: int = 0  # sources served from the cache: nothing downloaded, nothing extracted
    extracted_archives: int = 0
    used_in_place: int = 0  # file:// sources that are not archives: the local file itself
    seconds: float = 0.0
    local_paths: dict[str, str] = field(default_factory=dict)  # source URI -> local path


@dataclass(frozen=True)
class _Staged:
    local_path: Path
    downloaded_bytes: int = 0
    downloaded: bool = False
    extracted: bool = False
    in_place: bool = False

    @property
    def from_cache(self) -> bool:
        return not (self.downloaded or self.extracted or self.in_place)


def stage_sources(
    overrides: Mapping[str, Any],
    cache_dir: str | os.PathLike[str],
    s3_client_factory: S3ClientFactory | None = None,
    max_workers: int = 4,
    progress: Progress | None = None,
) -> StagingResult:
    """Make every ``s3://`` / ``file://`` value of ``overrides`` local (see the module docstring).

    ``progress`` receives one human-readable line per staged source and periodic lines during long
    downloads (default: this module's logger). A missing source raises :class:`SourceNotFoundError`
    naming the URI and the override keys that use it; other values pass through unchanged.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    started = time.monotonic()
    report = progress if progress is not None else logger.info
    cache = Path(cache_dir)
    users: dict[str, list[str]] = {}
    for key, value in overrides.items():
        if not isinstance(value, str):
            continue
        try:
            scheme = uri_scheme(value)
        except ValueError as error:
            raise ValueError(f"override {key}: {error}") from error
        if scheme in ("s3", "file"):
            users.setdefault(value, []).append(key)

    client = None
    if any(uri_scheme(uri) == "s3" for uri in users):
        client = (s3_client_factory or default_s3_client_factory)()

    staged = _run_parallel(
        {uri: (lambda uri=uri: _stage_uri(uri, cache=cache, client=client, extract=True, report=report))
         for uri in users},
        max_workers=max_workers,
        users=users,
    )
    result = StagingResult(local_overrides=dict(overrides))
    for uri, outcome in staged.items():
        for key in users[uri]:
            result.local_overrides[key] = str(outcome.local_path)
        result.local_paths[uri] = str(outcome.local_path)
        result.downloaded_bytes += outcome.downloaded_bytes
        result.downloaded_files += int(outcome.downloaded)
        result.cache_hits += int(outcome.from_cache)
        result.extracted_archives += int(outcome.extracted)
        result.used_in_place += int(outcome.in_place)
    result.seconds = time.monotonic() - started
    report(
        f"staged {len(staged)} source(s) in {result.seconds:.2f} s: {result.downloaded_files} downloaded "
        f"({_megabytes(result.downloaded_bytes)}), {result.cache_hits} from cache, "
        f"{result.extracted_archives} archive(s) extracted"
    )
    return result


def fetch_uri(
    uri: str,
    cache_dir: str | os.PathLike[str],
    s3_client_factory: S3ClientFactory | None = None,
    sha256: str | None = None,
) -> Path:
    """Local path of one file (checkpoint, pretrained weights): S3 objects are downloaded into the cache
    once per ETag; ``https://`` URLs once into the same cache, resumably
    (:func:`mask2former.data.downloads.download`; plain ``http://`` only from loopback hosts);
    ``file://`` URIs and plain paths are returned in place. Archives are not extracted.

    With ``sha256`` the file must have that digest, else :class:`~mask2former.data.downloads.ChecksumError`
    names the URI and both digests (a bad download is deleted; an S3 copy or a local file is left alone).
    Download failures raise :class:`~mask2former.data.downloads.DownloadError`.
    """
    if is_url(uri):
        return download(uri, cache_dir=cache_dir, sha256=sha256)
    scheme = uri_scheme(uri)
    client = (s3_client_factory or default_s3_client_factory)() if scheme == "s3" else None
    path = _stage_uri(uri, cache=Path(cache_dir), client=client, extract=False, report=logger.info).local_path
    if sha256 is not None:
        verify_sha256(path, sha256, source=uri)
    return path


def _run_parallel(
    jobs: Mapping[str, Callable[[], _Staged]], *, max_workers: int, users: Mapping[str, list[str]]
) -> dict[str, _Staged]:
    """Run the jobs on a thread pool; on the first failure cancel what has not started and raise it."""
    if not jobs:
        return {}
    with ThreadPoolExecutor(max_workers=min(max_workers, len(jobs)), thread_name_prefix="stage") as pool:
        futures: dict[str, Future[_Staged]] = {uri: pool.submit(job) for uri, job in jobs.items()}
        _, pending = wait(futures.values(), return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
    for uri, future in futures.items():
        if future.done() and not future.cancelled() and future.exception() is not None:
            error = future.exception()
            if isinstance(error, (SourceNotFoundError, S3AccessError)):
                raise type(error)(f"{error} (needed by {', '.join(users[uri])})") from error
            raise error
    return {uri: future.result() for uri, future in futures.items()}


def _stage_uri(uri: str, *, cache: Path, client: Any, extract: bool, report: Progress) -> _Staged:
    if uri_scheme(uri) == "s3":
        return _stage_s3(parse_s3_uri(uri), cache=cache, client=client, extract=extract, report=report)
    return _stage_local(uri, cache=cache, extract=extract, report=report)


def _stage_s3(location: S3Location, *, cache: Path, client: Any, extract: bool, report: Progress) -> _Staged:
    if not location.key or location.key.endswith("/"):
        raise ValueError(f"{location.uri} names a prefix, not an object; staging fetches single objects "
                         "(e.g. .../images.tar.gz)")
    head = head_s3_object(client, location)
    if head is None:
        raise SourceNotFoundError(f"{location.uri} does not exist (S3 object not found)")
    key_parts = location.key.split("/")
    entry = cache.joinpath("s3", _segment(location.bucket), *map(_segment, key_parts), "@" + _segment(_etag(head)))
    cached_file = entry / _segment(key_parts[-1])
    folder = entry / _segment(archive_stem(location.key)) if extract and is_archive(location.key) else None
    if folder is not None and (folder / COMPLETE_MARKER).is_file():
        report(f"{location.uri}: cached, extracted at {folder}")
        return _Staged(local_path=folder)
    downloaded = not cached_file.is_file()
    if downloaded:
        size = _download(client, location, head=head, target=cached_file, report=report)
    else:
        size = 0
        report(f"{location.uri}: cached at {cached_file}")
    if folder is None:
        return _Staged(local_path=cached_file, downloaded_bytes=size, downloaded=downloaded)
    _extract_into_cache(cached_file, folder=folder, source=location.uri, report=report)
    return _Staged(local_path=folder, downloaded_bytes=size, downloaded=downloaded, extracted=True)


def _stage_local(uri: str, *, cache: Path, extract: bool, report: Progress) -> _Staged:
    path = Path(local_path_of(uri))
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise SourceNotFoundError(f"{uri} does not exist (no file {path})") from None
    if not (extract and path.is_file() and is_archive(path.name)):
        return _Staged(local_path=path, in_place=True)
    absolute = path.resolve()
    entry = cache.joinpath("file", *map(_segment, absolute.parts[1:]), f"@{stat.st_size}-{stat.st_mtime_ns}")
    folder = entry / _segment(archive_stem(path.name))
    if (folder / COMPLETE_MARKER).is_file():
        report(f"{uri}: cached, extracted at {folder}")
        return _Staged(local_path=folder)
    _extract_into_cache(path, folder=folder, source=uri, report=report)
    return _Staged(local_path=folder, extracted=True)


def _extract_into_cache(archive: Path, *, folder: Path, source: str, report: Progress) -> None:
    """Extract into a cache folder; a folder there without the completion marker is stale and replaced.

    Refusals name ``source`` (the URI the user gave), not the cached copy.
    """
    if folder.exists() and not (folder / COMPLETE_MARKER).is_file():
        report(f"{folder}: incomplete earlier extraction (no {COMPLETE_MARKER}), extracting again")
        shutil.rmtree(folder)
    began = time.monotonic()
    try:
        safe_extract(archive, folder)
    except UnsafeArchiveError as error:
        raise UnsafeArchiveError(archive_path=source, member=error.member, reason=error.reason) from error
    report(f"{source}: extracted to {folder} in {time.monotonic() - began:.2f} s")


def _download(client: Any, location: S3Location, *, head: Mapping[str, Any], target: Path, report: Progress) -> int:
    """Download to a temporary name beside ``target``, check size and ETag, then rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    size = int(head.get("ContentLength", 0))
    meter = _ByteMeter(uri=location.uri, total=size, report=report)
    began = time.monotonic()
    try:
        try:
            client.download_file(location.bucket, location.key, str(partial), Callback=meter,
                                 Config=_transfer_config())
        except Exception as error:  # botocore / s3transfer errors: name the object, never the credentials
            raise S3AccessError(f"cannot download {location.uri}: {_error_text(error)}") from error
        got = partial.stat().st_size
        if got != size:
            raise S3AccessError(f"download of {location.uri} is incomplete: {got} of {size} bytes")
        after = head_s3_object(client, location)
        if after is None or _etag(after) != _etag(head):
            raise S3AccessError(f"{location.uri} changed while it was downloaded; run the staging again")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    seconds = time.monotonic() - began
    report(f"{location.uri}: downloaded {_megabytes(size)} in {seconds:.2f} s")
    return size


def _transfer_config() -> Any:
    """s3transfer settings shared by downloads and uploads (uploads' expected ETags depend on the chunk size)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=TRANSFER_CHUNK_BYTES, multipart_chunksize=TRANSFER_CHUNK_BYTES,
                          max_concurrency=TRANSFER_CONCURRENCY)


class _ByteMeter:
    """s3transfer progress callback (called from its threads): a line every PROGRESS_INTERVAL_S seconds."""

    def __init__(self, *, uri: str, total: int, report: Progress) -> None:
        self._uri, self._total, self._report = uri, total, report
        self._done = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, increment: int) -> None:
        with self._lock:
            self._done += increment
            now = time.monotonic()
            if now - self._last < PROGRESS_INTERVAL_S or self._done >= self._total:
                return
            self._last = now
            done = self._done
        self._report(f"{self._uri}: {_megabytes(done)} of {_megabytes(self._total)}")


def _segment(text: str) -> str:
    """One path component that cannot escape the cache: percent-encoded, never '', '.' or '..'."""
    if text in ("", ".", ".."):
        return "%" + "2E" * len(text)
    return quote(text, safe="")


def _etag(head: Mapping[str, Any]) -> str:
    return str(head.get("ETag", "")).strip('"') or "no-etag"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------ results publishing


@dataclass(frozen=True)
class SyncResult:
    """What :func:`upload_dir` / :func:`sync_results` did. ``marker`` is the URI or path of ``_FINISHED``."""

    destination: str
    uploaded_files: int
    uploaded_bytes: int
    skipped_files: int
    marker: str


def upload_dir(
    local_dir: str | os.PathLike[str],
    dest_uri: str,
    s3_client_factory: S3ClientFactory | None = None,
    max_workers: int = 4,
) -> SyncResult:
    """Upload a results folder under the S3 prefix ``dest_uri``; ``_FINISHED`` is written last.

    An existing ``_FINISHED`` under the prefix is deleted first, so readers never see a finished marker
    next to half-updated files. Objects whose size and ETag already match the local file are skipped
    (repeated syncs during training upload only what changed). Remote objects with no local file are kept.
    """
    source = _results_folder(local_dir)
    location = parse_s3_uri(dest_uri)
    prefix = f"{location.key.rstrip('/')}/" if location.key.strip("/") else ""
    marker_key = prefix + FINISHED_MARKER
    client = (s3_client_factory or default_s3_client_factory)()
    remote = _list_prefix(client, bucket=location.bucket, prefix=prefix)
    if marker_key in remote:
        client.delete_object(Bucket=location.bucket, Key=marker_key)
    files = _files_to_publish(source)
    todo = []
    for relative, path in files:
        size = path.stat().st_size
        known = remote.get(prefix + relative)
        if known is not None and known == (size, _expected_etag(path, size=size)):
            continue
        todo.append((prefix + relative, path, size))

    def upload(key: str, path: Path, size: int) -> int:
        client.upload_file(str(path), location.bucket, key, Config=_transfer_config())
        logger.info("uploaded %s to s3://%s/%s (%s)", path, location.bucket, key, _megabytes(size))
        return size

    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(todo))), thread_name_prefix="upload") as pool:
            sizes = [future.result() for future in [pool.submit(upload, *item) for item in todo]]
    else:
        sizes = []
    client.put_object(Bucket=location.bucket, Key=marker_key,
                      Body=_marker_text(files=len(files), size=sum(p.stat().st_size for _, p in files)).encode())
    marker = f"s3://{location.bucket}/{marker_key}"
    logger.info("published %s: %d uploaded, %d unchanged, marker %s", dest_uri, len(todo), len(files) - len(todo),
                marker)
    return SyncResult(destination=dest_uri, uploaded_files=len(todo), uploaded_bytes=sum(sizes),
                      skipped_files=len(files) - len(todo), marker=marker)


def sync_results(
    local_dir: str | os.PathLike[str],
    dest_uri: str,
    s3_client_factory: S3ClientFactory | None = None,
) -> SyncResult:
    """Publish a results folder to ``dest_uri``: S3 through :func:`upload_dir`, else a local folder.

    Locally the copy is built in a temporary sibling folder with ``_FINISHED`` written last, then renamed
    over the destination (an older copy is replaced whole). When the destination is the results folder
    itself only the marker is written.
    """
    if uri_scheme(dest_uri) == "s3":
        return upload_dir(local_dir, dest_uri, s3_client_factory=s3_client_factory)
    source = _results_folder(local_dir).resolve()
    dest = Path(local_path_of(dest_uri)).absolute()
    files = _files_to_publish(source)
    size = sum(path.stat().st_size for _, path in files)
    marker_text = _marker_text(files=len(files), size=size)
    if dest.exists() and dest.resolve() == source:
        (dest / FINISHED_MARKER).write_text(marker_text)
        return SyncResult(destination=dest_uri, uploaded_files=0, uploaded_bytes=0, skipped_files=len(files),
                          marker=str(dest / FINISHED_MARKER))
    resolved_dest = dest.resolve()
    if source in resolved_dest.parents or resolved_dest in source.parents:
        raise ValueError(f"cannot publish {source} to {dest}: one folder contains the other")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        for relative, path in files:
            target = partial / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        (partial / FINISHED_MARKER).write_text(marker_text)
        _replace_dir(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("published %s to %s: %d files (%s)", source, dest, len(files), _megabytes(size))
    return SyncResult(destination=dest_uri, uploaded_files=len(files), uploaded_bytes=size, skipped_files=0,
                      marker=str(dest / FINISHED_MARKER))


def is_finished(dest_uri: str, s3_client_factory: S3ClientFactory | None = None) -> bool:
    """Whether a published results folder carries its ``_FINISHED`` marker."""
    if uri_scheme(dest_uri) == "s3":
        location = parse_s3_uri(dest_uri)
        prefix = f"{location.key.rstrip('/')}/" if location.key.strip("/") else ""
        client = (s3_client_factory or default_s3_client_factory)()
        return head_s3_object(client, S3Location(bucket=location.bucket, key=prefix + FINISHED_MARKER)) is not None
    return (Path(local_path_of(dest_uri)) / FINISHED_MARKER).is_file()


def _results_folder(local_dir: str | os.PathLike[str]) -> Path:
    source = Path(local_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"results folder {source} does not exist or is not a folder")
    return source


def _files_to_publish(source: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every regular file under ``source``, except a top-level marker."""
    files = []
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(source).as_posix()
        if relative != FINISHED_MARKER:
            files.append((relative, path))
    return files


def _list_prefix(client: Any, *, bucket: str, prefix: str) -> dict[str, tuple[int, str]]:
    """key -> (size, ETag) of every object under ``prefix``."""
    objects: dict[str, tuple[int, str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            objects[item["Key"]] = (int(item["Size"]), _etag(item))
    return objects


def _expected_etag(path: Path, *, size: int) -> str:
    """The ETag S3 gives this file when uploaded with our transfer settings (MD5, or multipart MD5-of-MD5s)."""
    with path.open("rb") as handle:
        if size < TRANSFER_CHUNK_BYTES:
            return hashlib.md5(handle.read(), usedforsecurity=False).hexdigest()
        digests = []
        while chunk := handle.read(TRANSFER_CHUNK_BYTES):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def _marker_text(*, files: int, size: int) -> str:
    finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"finished_at": finished_at, "files": files, "bytes": size}) + "\n"


def _replace_dir(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``; an existing ``dest`` is moved aside first and removed after."""
    if not dest.exists():
        os.rename(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)
