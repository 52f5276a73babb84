"""Where datasets and job folders live, without Airflow: :class:`ObjectStore` holds every operation of the
storage hook (see :mod:`operators.hooks.storage`), and :class:`JobStore` runs them in a job process with
boto3's own credential chain (its environment), as a pod or a local job process has it.

A job process never imports Airflow: an Airflow import costs 1-2 s of interpreter time on every task (7 s on
a loaded 2-core host), and a pod's image need not carry Airflow at all.

A location is a local path, a ``file://`` URI or ``s3://bucket/prefix``. S3 calls go through ``self.s3``: the
Amazon provider's ``S3Hook`` in the Airflow hook, :class:`BotoS3` (the same few calls on a plain boto3 client)
in a job process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from mask2former import results
from mask2former.data.sources import join_uri, local_path_of, parse_s3_uri, uri_scheme
from mask2former.data.staging import (S3_RETRIES, TRANSFER_CHUNK_BYTES, TRANSFER_CONCURRENCY, S3AccessError,
                                      SourceNotFoundError, cache_source, megabytes)

#: Written last into a published job folder: the folder is complete.
FINISHED_MARKER = "_FINISHED"
#: A running job's liveness record (JSON: time, host, pid), rewritten every few seconds by the job process.
HEARTBEAT_FILE = "_HEARTBEAT"
#: A request that the job stop (JSON: time, reason); the job process looks for it while it runs.
STOP_FILE = "_STOP"
#: Small files an index holds for real (everything else is an empty placeholder).
INDEX_FILES = (results.STATUS_FILE, results.METRICS_FILE, results.BEST_FILE, FINISHED_MARKER)
#: User metadata (``x-amz-meta-sha256``) that :meth:`ObjectStore.publish` gives every object it uploads: the
#: file's SHA-256, computed here. An ETag is never read as a digest: with multipart uploads, SSE-KMS or another
#: part size it is not the file's MD5.
DIGEST_METADATA = "sha256"
DIGEST_CHUNK_BYTES = 1024 * 1024
CHUNK_BYTES = 256 * 1024
_MISSING = ("404", "NoSuchKey", "NotFound")

Log = Callable[[str], None]


class StorageError(Exception):
    """A storage location that could not be read or written; the message names it, never credentials."""


class StorageNotFound(StorageError):
    """The location cannot exist (its S3 bucket does not)."""


class StorageUnavailable(StorageError):
    """The storage answered with an error or could not be reached."""


@dataclass(frozen=True)
class StoredFile:
    path: str  #: relative to the listed location, ``/``-separated
    size: int
    modified: float  #: POSIX timestamp


@dataclass
class OpenedFile:
    chunks: Iterator[bytes]
    size: Optional[int]


@dataclass
class StagingResult:
    """What :meth:`ObjectStore.stage` did; counters count distinct sources."""

    local_overrides: Dict[str, Any]
    downloaded_bytes: int = 0
    downloaded_files: int = 0
    cache_hits: int = 0  # nothing downloaded, nothing extracted
    extracted_archives: int = 0
    used_in_place: int = 0  # local files that are not archives
    seconds: float = 0.0


@dataclass(frozen=True)
class PublishResult:
    destination: str
    uploaded_files: int
    uploaded_bytes: int
    skipped_files: int
    marker: str  #: URI or path of ``_FINISHED``


@dataclass(frozen=True)
class _S3:
    bucket: str
    key: str

    def child(self, name: str) -> "_S3":
        return _S3(self.bucket, f"{self.prefix}{name}")

    @property
    def prefix(self) -> str:
        return f"{self.key.strip('/')}/" if self.key.strip("/") else ""


def _where(uri: str) -> Any:
    """``_S3`` for an ``s3://`` URI, else the local :class:`Path` (a ``file://`` URI or a path)."""
    if uri_scheme(uri) == "s3":
        location = parse_s3_uri(uri)
        return _S3(location.bucket, location.key)
    return Path(local_path_of(uri))


def _code(error: Any) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _s3_errors(uri: str, doing: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as Unreachable

    try:
        yield
    except ClientError as error:
        code = _code(error)
        if code == "NoSuchBucket":
            raise StorageNotFound(f"{doing} {uri} failed: the bucket does not exist (NoSuchBucket).") from None
        raise StorageUnavailable(f"{doing} {uri} failed: S3 answered {code or 'an error'}.") from None
    except Unreachable as error:
        raise StorageUnavailable(f"{doing} {uri} failed: the S3 endpoint could not be reached "
                                 f"({type(error).__name__}).") from None
    except BotoCoreError as error:
        raise StorageUnavailable(f"{doing} {uri} failed: the S3 client failed ({type(error).__name__}).") from None


def _inside(path: Path, root: Optional[str]) -> Optional[Path]:
    """``path`` resolved, or None when it leaves the local ``root`` (through ``..`` or a link)."""
    resolved = path.resolve()
    if root is None:
        return resolved
    base = Path(local_path_of(root)).resolve()
    return resolved if resolved == base or base in resolved.parents else None


class ObjectStore:
    """Every storage operation (see the storage hook's docstring); subclasses provide ``s3``, an object with
    the ``S3Hook`` calls used here: ``get_conn``, ``head_object``, ``load_bytes``, ``load_file``,
    ``delete_objects`` and ``transfer_config``."""

    s3: Any

    def get_conn(self) -> Any:
        """The boto3 S3 client (created once per store)."""
        return self.s3.get_conn()

    # ---------------------------------------------------------------------------------------- files

    def exists(self, uri: str, *, inside: Optional[str] = None) -> bool:
        """Whether the file exists (and, local, lies inside ``inside``: no ``..`` or link leads out of it)."""
        where = _where(uri)
        if isinstance(where, Path):
            path = _inside(where, inside)
            return path is not None and path.exists()
        with _s3_errors(uri, "Reading"):
            return self.s3.head_object(where.key, where.bucket) is not None

    def read_bytes(self, uri: str, start: int = 0, *, inside: Optional[str] = None) -> Optional[bytes]:
        """The file's bytes from ``start`` on (b"" past its end), or None when it does not exist."""
        opened = self.open(uri, start=start, inside=inside)
        if opened is None:
            return None
        with _s3_errors(uri, "Reading"):
            return b"".join(opened.chunks)

    def open(self, uri: str, *, start: int = 0, inside: Optional[str] = None) -> Optional[OpenedFile]:
        """The file's content from ``start`` on, as chunks (streamed from S3), or None when it does not exist
        (or, local, when it lies outside ``inside``)."""
        where = _where(uri)
        if not isinstance(where, Path):
            return self._get_object(uri, where, start)
        path = _inside(where, inside)
        try:
            handle = open(path, "rb") if path is not None and path.is_file() else None  # noqa: SIM115 - _chunks closes
        except FileNotFoundError:
            return None
        if handle is None:
            return None
        handle.seek(start)
        return OpenedFile(_chunks(handle), max(0, path.stat().st_size - start))

    def _get_object(self, uri: str, where: _S3, start: int) -> Optional[OpenedFile]:
        from botocore.exceptions import ClientError

        with _s3_errors(uri, "Reading"):
            try:
                extra = {"Range": f"bytes={start}-"} if start else {}
                response = self.get_conn().get_object(Bucket=where.bucket, Key=where.key, **extra)
            except ClientError as error:
                if _code(error) in _MISSING:
                    return None
                if _code(error) == "InvalidRange":
                    return OpenedFile(iter(()), 0)
                raise
        return OpenedFile(response["Body"].iter_chunks(CHUNK_BYTES), response.get("ContentLength"))

    def read_json(self, uri: str) -> Optional[Any]:
        data = self.read_bytes(uri)
        return None if data is None else json.loads(data)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a file whole (local: temp file and rename; S3: one PUT)."""
        where = _where(uri)
        if isinstance(where, Path):
            results.atomic_write_bytes(where, data)
            return
        with _s3_errors(uri, "Writing"):
            self.s3.load_bytes(data, where.key, where.bucket, replace=True)

    def write_json(self, uri: str, data: Any) -> None:
        self.write_bytes(uri, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def upload_file(self, path: Path, uri: str) -> None:
        """Copy a local file to ``uri`` (local: atomically)."""
        where = _where(uri)
        if isinstance(where, Path):
            if Path(path).resolve() != where.resolve():
                results.atomic_write_bytes(where, Path(path).read_bytes())
            return
        with _s3_errors(uri, "Writing"):
            self.s3.load_file(str(path), where.key, where.bucket, replace=True)

    def delete(self, uris: List[str]) -> None:
        """Delete files (missing ones are fine)."""
        by_bucket: Dict[str, List[str]] = {}
        for uri in uris:
            where = _where(uri)
            if isinstance(where, Path):
                where.unlink(missing_ok=True)
            else:
                by_bucket.setdefault(where.bucket, []).append(where.key)
        for bucket, keys in by_bucket.items():
            with _s3_errors(f"s3://{bucket}", "Deleting from"):
                self.s3.delete_objects(bucket, keys)

    def list_files(self, uri: str, depth: Optional[int] = None) -> Iterator[StoredFile]:
        """Every file under ``uri`` (or only those ``depth`` levels below it), paths relative to it. Locally,
        links leading out of ``uri`` are never followed; on S3, a key holding ``.`` or ``..`` parts is skipped."""
        where = _where(uri)
        if isinstance(where, Path):
            base = where.resolve()
            if not base.is_dir():
                return
            paths = base.glob("/".join(["*"] * depth)) if depth else _walk(base)
            for path in paths:
                if path.is_file() and _inside(path, str(base)) is not None:
                    stat = path.stat()
                    yield StoredFile(path.relative_to(base).as_posix(), stat.st_size, stat.st_mtime)
            return
        with _s3_errors(uri, "Listing"):
            # one level: a delimiter listing, which never pages through the objects of the folders below
            extra = {"Delimiter": "/"} if depth == 1 else {}
            pages = self.get_conn().get_paginator("list_objects_v2").paginate(Bucket=where.bucket, Prefix=where.prefix,
                                                                               **extra)
            for page in pages:
                for item in page.get("Contents", []):
                    path = item["Key"][len(where.prefix):]
                    parts = path.split("/")
                    if not path or any(part in ("", ".", "..") for part in parts) or (depth and len(parts) != depth):
                        continue
                    yield StoredFile(path, int(item.get("Size", 0)), item["LastModified"].timestamp())

    def list_folders(self, uri: str) -> List[str]:
        """Names of the folders (S3: common prefixes) directly under ``uri``, sorted."""
        where = _where(uri)
        if isinstance(where, Path):
            return sorted(p.name for p in where.iterdir() if p.is_dir()) if where.is_dir() else []
        names = []
        with _s3_errors(uri, "Listing"):
            pages = self.get_conn().get_paginator("list_objects_v2").paginate(
                Bucket=where.bucket, Prefix=where.prefix, Delimiter="/")
            for page in pages:
                names.extend(p["Prefix"][len(where.prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(names)

    # ------------------------------------------------------------------------------------ job folders

    def read_status(self, job_uri: str, offset: int = 0) -> Tuple[List[Dict[str, Any]], int]:
        """The complete status.json lines of a job folder from byte ``offset`` on, and the next offset."""
        data = self.read_bytes(join_uri(job_uri, results.STATUS_FILE), offset)
        lines, used = results.parse_status(data or b"")
        return lines, offset + used

    def is_finished(self, job_uri: str) -> bool:
        return self.exists(join_uri(job_uri, FINISHED_MARKER))

    def beat(self, job_uri: str, **info: Any) -> None:
        """Record that the job process is alive now."""
        self.write_json(join_uri(job_uri, HEARTBEAT_FILE), {"time": time.time(), **info})

    def last_beat(self, job_uri: str) -> Optional[Dict[str, Any]]:
        """The job process's last heartbeat (``time``, ``host``, ``pid``; ``exit_code`` once it ended), or None."""
        beat = self.read_json(join_uri(job_uri, HEARTBEAT_FILE))
        return beat if isinstance(beat, dict) and isinstance(beat.get("time"), (int, float)) else None

    def request_stop(self, job_uri: str, reason: str) -> None:
        self.write_json(join_uri(job_uri, STOP_FILE), {"time": time.time(), "reason": reason})

    def stop_requested(self, job_uri: str) -> Optional[str]:
        """The reason of a pending stop request, or None."""
        request = self.read_json(join_uri(job_uri, STOP_FILE))
        return str(request.get("reason", "stop requested")) if isinstance(request, dict) else None

    def clear_job_controls(self, job_uri: str) -> None:
        """Forget an earlier attempt's stop request, heartbeat and ``_FINISHED`` before a new attempt."""
        self.delete([join_uri(job_uri, name) for name in (STOP_FILE, HEARTBEAT_FILE, FINISHED_MARKER)])

    def index(self, uri: str, dest: Path) -> Path:
        """A local view of a job folder for the engine's resolvers: a local folder as it is; an S3 folder's
        names mirrored into ``dest``, the small :data:`INDEX_FILES` for real, the rest as empty placeholders."""
        where = _where(uri)
        if isinstance(where, Path):
            return where
        dest.mkdir(parents=True, exist_ok=True)
        for stored in self.list_files(uri):
            target = dest / stored.path
            target.parent.mkdir(parents=True, exist_ok=True)
            data = self.read_bytes(join_uri(uri, stored.path)) if stored.path in INDEX_FILES else b""
            target.write_bytes(data or b"")
        return dest

    def restore(self, uri: str, local_dir: Path, log: Log) -> int:
        """Bring an earlier attempt's checkpoints, best-epoch record and status from a published S3 folder
        into an empty local job folder, so that train resumes there. Returns the number of files restored."""
        if uri_scheme(uri) != "s3" or results.list_checkpoints(local_dir):
            return 0
        wanted = [f.path for f in self.list_files(uri, depth=1)
                  if f.path.endswith(".pth") or f.path in (results.BEST_FILE, results.STATUS_FILE)]
        where = _where(uri)
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            with _s3_errors(uri, "Restoring"):
                self.get_conn().download_file(where.bucket, where.child(name).key, str(local_dir / name),
                                              Config=self.s3.transfer_config)
        if wanted:
            log(f"restored {len(wanted)} file(s) of the earlier attempt from {uri}: {', '.join(wanted)}")
        return len(wanted)

    def remove_checkpoints(self, uri: str) -> int:
        """Delete the ``.pth`` files at the top of a job folder; returns how many."""
        doomed = [join_uri(uri, f.path) for f in self.list_files(uri, depth=1) if f.path.endswith(".pth")]
        self.delete(doomed)
        return len(doomed)

    # ---------------------------------------------------------------------------------------- staging

    def stage(self, overrides: Mapping[str, Any], cache_dir: Path, *, log: Log, max_workers: int = 4) -> StagingResult:
        """Every ``s3://`` / ``file://`` value of ``overrides`` made local (archives extracted); other values
        pass through. One URI used by several keys is staged once; sources are staged in parallel, and the
        first failure (:class:`~mask2former.data.staging.SourceNotFoundError` naming the URI and the keys
        that use it, ``S3AccessError``, an unsafe archive) cancels the rest."""
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        began = time.monotonic()
        users: Dict[str, List[str]] = {}
        for key, value in overrides.items():
            if not isinstance(value, str):
                continue
            try:
                scheme = uri_scheme(value)
            except ValueError as error:
                raise ValueError(f"override {key}: {error}") from error
            if scheme in ("s3", "file"):
                users.setdefault(value, []).append(key)
        client = self.get_conn() if any(uri_scheme(uri) == "s3" for uri in users) else None
        staged = {}
        if users:
            with ThreadPoolExecutor(max_workers=min(max_workers, len(users)), thread_name_prefix="stage") as pool:
                futures = {uri: pool.submit(cache_source, uri, cache=Path(cache_dir), client=client, extract=True,
                                            report=log) for uri in users}
                wait(futures.values(), return_when=FIRST_EXCEPTION)
                for future in futures.values():
                    future.cancel()
            for uri, future in futures.items():
                error = future.exception() if future.done() and not future.cancelled() else None
                if isinstance(error, (SourceNotFoundError, S3AccessError)):
                    raise type(error)(f"{error} (needed by {', '.join(users[uri])})") from error
                if error is not None:
                    raise error
            staged = {uri: future.result() for uri, future in futures.items()}
        result = StagingResult(local_overrides=dict(overrides))
        for uri, outcome in staged.items():
            for key in users[uri]:
                result.local_overrides[key] = str(outcome.local_path)
            result.downloaded_bytes += outcome.downloaded_bytes
            result.downloaded_files += int(outcome.downloaded)
            result.cache_hits += int(outcome.from_cache)
            result.extracted_archives += int(outcome.extracted)
            result.used_in_place += int(outcome.in_place)
        result.seconds = time.monotonic() - began
        log(f"staged {len(staged)} source(s) in {result.seconds:.2f} s: {result.downloaded_files} downloaded "
            f"({megabytes(result.downloaded_bytes)}), {result.cache_hits} from cache, "
            f"{result.extracted_archives} archive(s) extracted")
        return result

    # --------------------------------------------------------------------------------------- publishing

    def publish(self, local_dir: Path, uri: str, *, log: Optional[Log] = None, max_workers: int = 4) -> PublishResult:
        """Publish a job folder to ``uri`` with ``_FINISHED`` written last.

        S3: ``_FINISHED`` is deleted first (readers never see it beside half-updated files), then only the
        files whose object differs in size or holds no SHA-256 equal to the file's (:data:`DIGEST_METADATA`,
        recorded by an earlier publish) are uploaded; objects with no local file are kept. Local: the copy
        is built in a temporary sibling and renamed over the destination; when the destination is the folder
        itself only the marker is written.
        """
        source = Path(local_dir)
        if not source.is_dir():
            raise FileNotFoundError(f"results folder {source} does not exist or is not a folder")
        files = [(rel, path) for rel, path in _files(source) if rel not in (FINISHED_MARKER, STOP_FILE)]
        marker = json.dumps({"finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "files": len(files), "bytes": sum(p.stat().st_size for _, p in files)}) + "\n"
        where = _where(uri)
        outcome = (self._publish_s3(files, uri, where, marker.encode(), max_workers) if isinstance(where, _S3)
                   else _publish_local(source.resolve(), files, where.absolute(), uri, marker))
        if log is not None:
            log(f"published {source} to {outcome.destination}: {outcome.uploaded_files} file(s) copied, "
                f"{outcome.skipped_files} unchanged, marker {outcome.marker}")
        return outcome

    def _publish_s3(self, files: List[Tuple[str, Path]], uri: str, where: _S3, marker: bytes,
                    max_workers: int) -> PublishResult:
        client = self.get_conn()
        with _s3_errors(uri, "Publishing to"):
            sizes: Dict[str, int] = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=where.bucket, Prefix=where.prefix):
                sizes.update({item["Key"][len(where.prefix):]: int(item["Size"]) for item in page.get("Contents", [])})
            client.delete_object(Bucket=where.bucket, Key=where.child(FINISHED_MARKER).key)
            with ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="publish") as pool:
                digests = dict(zip([rel for rel, _ in files], pool.map(lambda item: _sha256(item[1]), files)))
                same_size = [rel for rel, path in files if sizes.get(rel) == path.stat().st_size]
                stored = dict(zip(same_size, pool.map(lambda rel: self._stored_digest(where.child(rel)), same_size)))
                todo = [(rel, path) for rel, path in files if stored.get(rel) != digests[rel]]
                list(pool.map(lambda item: client.upload_file(
                    str(item[1]), where.bucket, where.child(item[0]).key, Config=self.s3.transfer_config,
                    ExtraArgs={"Metadata": {DIGEST_METADATA: digests[item[0]]}}), todo))
            self.s3.load_bytes(marker, where.child(FINISHED_MARKER).key, where.bucket, replace=True)
        return PublishResult(destination=uri, uploaded_files=len(todo),
                             uploaded_bytes=sum(path.stat().st_size for _, path in todo),
                             skipped_files=len(files) - len(todo), marker=join_uri(uri, FINISHED_MARKER))

    def _stored_digest(self, where: _S3) -> Optional[str]:
        """The SHA-256 an earlier publish recorded in the object's metadata (None: absent, or no such object)."""
        from botocore.exceptions import ClientError

        try:
            head = self.get_conn().head_object(Bucket=where.bucket, Key=where.key)
        except ClientError as error:
            if _code(error) in _MISSING:
                return None
            raise
        return head.get("Metadata", {}).get(DIGEST_METADATA)


def _publish_local(source: Path, files: List[Tuple[str, Path]], dest: Path, uri: str, marker: str) -> PublishResult:
    if dest.exists() and dest.resolve() == source:
        (dest / FINISHED_MARKER).write_text(marker)
        return PublishResult(destination=uri, uploaded_files=0, uploaded_bytes=0, skipped_files=len(files),
                             marker=str(dest / FINISHED_MARKER))
    resolved = dest.resolve()
    if source in resolved.parents or resolved in source.parents:
        raise ValueError(f"cannot publish {source} to {dest}: one folder contains the other")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        for relative, path in files:
            target = partial / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        (partial / FINISHED_MARKER).write_text(marker)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dest, old)
            os.rename(partial, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PublishResult(destination=uri, uploaded_files=len(files), uploaded_bytes=sum(p.stat().st_size
                                                                                        for _, p in files),
                         skipped_files=0, marker=str(dest / FINISHED_MARKER))


def _files(source: Path) -> List[Tuple[str, Path]]:
    """(relative POSIX path, path) of every regular file under ``source``, sorted."""
    return [(path.relative_to(source).as_posix(), path) for path in sorted(source.rglob("*")) if path.is_file()]


def _walk(base: Path) -> Iterator[Path]:
    for folder, _, names in os.walk(base):  # never follows links to folders (no loops)
        for name in names:
            yield Path(folder, name)


def _chunks(handle: Any) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class BotoS3:
    """The ``S3Hook`` calls :class:`ObjectStore` makes, on a boto3 client with boto3's own credential chain
    (``AWS_*`` variables, a web identity, an instance role) and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``."""

    @cached_property
    def transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=TRANSFER_CHUNK_BYTES, multipart_chunksize=TRANSFER_CHUNK_BYTES,
                              max_concurrency=TRANSFER_CONCURRENCY)

    @cached_property
    def _client(self) -> Any:
        import boto3

        from botocore.config import Config

        return boto3.session.Session().client("s3", config=Config(retries=dict(S3_RETRIES)))

    def get_conn(self) -> Any:
        return self._client

    def head_object(self, key: str, bucket_name: str) -> Optional[Dict[str, Any]]:
        """The object's metadata, or None when there is none (404)."""
        from botocore.exceptions import ClientError

        try:
            return self._client.head_object(Bucket=bucket_name, Key=key)
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise

    def load_bytes(self, bytes_data: bytes, key: str, bucket_name: str, replace: bool = True) -> None:
        import io

        self._client.upload_fileobj(io.BytesIO(bytes_data), bucket_name, key, Config=self.transfer_config)

    def load_file(self, filename: str, key: str, bucket_name: str, replace: bool = True) -> None:
        self._client.upload_file(filename, bucket_name, key, Config=self.transfer_config)

    def delete_objects(self, bucket: str, keys: List[str]) -> None:
        """Delete ``keys`` (1000 per request, S3's limit); a key S3 refuses to delete raises."""
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            response = self._client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk]})
            if response.get("Errors"):
                raise StorageUnavailable(f"Deleting from s3://{bucket} failed for {len(response['Errors'])} key(s).")


class JobStore(ObjectStore):
    """The store of a job process (no Airflow): S3 through :class:`BotoS3`."""

    @cached_property
    def s3(self) -> BotoS3:
        return BotoS3()
