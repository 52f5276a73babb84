"""The engine's cache of source files: an ``s3://`` object, an ``https://`` URL or a local archive, made local once.

* :func:`fetch_uri` gives the local path of one file the engine reads (a checkpoint, pretrained weights):
  S3 objects are downloaded once into a cache keyed by bucket, key and ETag (atomic: temp name, size and
  ETag checked, then rename), ``https://`` URLs through :mod:`mask2former.data.downloads`, local files in
  place. The engine talks to S3 with plain boto3 (the standard environment, ``AWS_ENDPOINT_URL``
  respected): it runs without Airflow.
* :func:`cache_source` is that cache for one source, through any boto3-style client, with archives
  extracted once and safely (:func:`mask2former.data.archives.safe_extract`). The Airflow side stages a
  job's datasets with it, through its storage hook's client (``operators.hooks.storage``).

Credentials are never logged: messages name URIs, sizes and S3 error codes only. No torch import here.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .archives import COMPLETE_MARKER, UnsafeArchiveError, archive_stem, is_archive, safe_extract
from .downloads import download, is_url, verify_sha256
from .sources import S3Location, local_path_of, parse_s3_uri, uri_scheme

__all__ = [
    "CachedSource",
    "S3AccessError",
    "SourceNotFoundError",
    "cache_source",
    "default_s3_client_factory",
    "fetch_uri",
    "head_s3_object",
    "transfer_config",
]

logger = logging.getLogger(__name__)

#: botocore retries of every S3 call (unless an Airflow connection sets its own ``config_kwargs.retries``): the
#: standard mode waits rand(0, 1) * 0.05 * 2**i s before retry i (throttling: rand(0, 1) * 2**i, at most 20 s), so
#: 8 attempts wait about 3 s in all (at most 6.4 s): an endpoint that is briefly unreachable is ridden out, a
#: longer outage fails the call (and the Airflow task, which has its own retries). botocore's default of 3
#: attempts gives up after about 0.1 s.
S3_RETRIES = {"mode": "standard", "total_max_attempts": 8}
#: Multipart part size and threshold for uploads and downloads.
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

    return boto3.client("s3", config=Config(max_pool_connections=32, retries=dict(S3_RETRIES)))


def head_s3_object(client: Any, location: S3Location) -> dict[str, Any] | None:
    """``head_object`` of the object, or None when it does not exist; other failures raise S3AccessError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client.head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            return None
        detail = f"S3 error {code or 'unknown'} ({error_text(error)})"
        raise S3AccessError(f"cannot read {location.uri}: {detail}") from error
    except BotoCoreError as error:
        raise S3AccessError(f"cannot read {location.uri}: {type(error).__name__} ({error_text(error)})") from error


def error_text(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# ------------------------------------------------------------------------------------------- staging


@dataclass(frozen=True)
class CachedSource:
    """One source made local: where it is now and what it took (nothing, when it came from the cache)."""

    local_path: Path
    downloaded_bytes: int = 0
    downloaded: bool = False
    extracted: bool = False
    in_place: bool = False

    @property
    def from_cache(self) -> bool:
        return not (self.downloaded or self.extracted or self.in_place)


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
    path = cache_source(uri, cache=Path(cache_dir), client=client, extract=False, report=logger.info).local_path
    if sha256 is not None:
        verify_sha256(path, sha256, source=uri)
    return path


def cache_source(uri: str, *, cache: Path, client: Any, extract: bool, report: Progress) -> CachedSource:
    """Make one ``s3://`` or local source local: an S3 object is downloaded once into ``cache`` (keyed by
    bucket, key and ETag) through ``client`` (a boto3-style S3 client; None for local sources); with
    ``extract`` an archive is extracted once beside it (a ``file://`` or plain-path archive into the cache,
    keyed by path, size and mtime); any other local file is used in place."""
    if uri_scheme(uri) == "s3":
        return _stage_s3(parse_s3_uri(uri), cache=cache, client=client, extract=extract, report=report)
    return _stage_local(uri, cache=cache, extract=extract, report=report)


def _stage_s3(location: S3Location, *, cache: Path, client: Any, extract: bool, report: Progress) -> CachedSource:
    if not location.key or location.key.endswith("/"):
        raise ValueError(f"{location.uri} names a prefix, not an object; staging fetches single objects "
                         "(e.g. .../images.tar.gz)")
    head = head_s3_object(client, location)
    if head is None:
        raise SourceNotFoundError(f"{location.uri} does not exist (S3 object not found)")
    key_parts = location.key.split("/")
    entry = cache.joinpath("s3", _segment(location.bucket), *map(_segment, key_parts), "@" + _segment(etag_of(head)))
    cached_file = entry / _segment(key_parts[-1])
    folder = entry / _segment(archive_stem(location.key)) if extract and is_archive(location.key) else None
    if folder is not None and (folder / COMPLETE_MARKER).is_file():
        report(f"{location.uri}: cached, extracted at {folder}")
        return CachedSource(local_path=folder)
    downloaded = not cached_file.is_file()
    if downloaded:
        size = _download(client, location, head=head, target=cached_file, report=report)
    else:
        size = 0
        report(f"{location.uri}: cached at {cached_file}")
    if folder is None:
        return CachedSource(local_path=cached_file, downloaded_bytes=size, downloaded=downloaded)
    _extract_into_cache(cached_file, folder=folder, source=location.uri, report=report)
    return CachedSource(local_path=folder, downloaded_bytes=size, downloaded=downloaded, extracted=True)


def _stage_local(uri: str, *, cache: Path, extract: bool, report: Progress) -> CachedSource:
    path = Path(local_path_of(uri))
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise SourceNotFoundError(f"{uri} does not exist (no file {path})") from None
    if not (extract and path.is_file() and is_archive(path.name)):
        return CachedSource(local_path=path, in_place=True)
    absolute = path.resolve()
    entry = cache.joinpath("file", *map(_segment, absolute.parts[1:]), f"@{stat.st_size}-{stat.st_mtime_ns}")
    folder = entry / _segment(archive_stem(path.name))
    if (folder / COMPLETE_MARKER).is_file():
        report(f"{uri}: cached, extracted at {folder}")
        return CachedSource(local_path=folder)
    _extract_into_cache(path, folder=folder, source=uri, report=report)
    return CachedSource(local_path=folder, extracted=True)


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
                                 Config=transfer_config())
        except Exception as error:  # botocore / s3transfer errors: name the object, never the credentials
            raise S3AccessError(f"cannot download {location.uri}: {error_text(error)}") from error
        got = partial.stat().st_size
        if got != size:
            raise S3AccessError(f"download of {location.uri} is incomplete: {got} of {size} bytes")
        after = head_s3_object(client, location)
        if after is None or etag_of(after) != etag_of(head):
            raise S3AccessError(f"{location.uri} changed while it was downloaded; run the staging again")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    seconds = time.monotonic() - began
    report(f"{location.uri}: downloaded {megabytes(size)} in {seconds:.2f} s")
    return size


def transfer_config() -> Any:
    """s3transfer settings shared by downloads and uploads."""
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
        self._report(f"{self._uri}: {megabytes(done)} of {megabytes(self._total)}")


def _segment(text: str) -> str:
    """One path component that cannot escape the cache: percent-encoded, never '', '.' or '..'."""
    if text in ("", ".", ".."):
        return "%" + "2E" * len(text)
    return quote(text, safe="")


def etag_of(head: Mapping[str, Any]) -> str:
    return str(head.get("ETag", "")).strip('"') or "no-etag"


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
