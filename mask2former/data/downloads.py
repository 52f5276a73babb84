"""Files named by ``https://`` URLs (pretrained weights, released checkpoints) in a shared cache.

:func:`download` fetches a URL once into the cache and returns the local path:

* **Cached**: a later call finds the complete file through its record and makes no network request at all
  (offline machines keep working). The record beside the file holds the URL, size, SHA-256, mtime, ETag
  and Last-Modified; a file whose size differs from its record, or whose content no longer has the recorded
  digest, is not a cache hit.
* **Resumed**: bytes arrive in ``<name>.part``; a cut connection, a timeout or a killed process leaves it
  there, and the next attempt (the same call retries, a later call resumes) asks for the rest with an HTTP
  ``Range`` header (plus ``If-Range`` with the first answer's ETag or Last-Modified). Only a ``206`` whose
  ``Content-Range`` starts where the part ends is appended; any other answer restarts from byte 0.
* **Verified**: with ``sha256`` the complete file must have that digest; a mismatch raises
  :class:`ChecksumError` naming the URL and both digests, and the bad bytes are deleted, never cached.
* **Atomic and shared**: the complete file is renamed into place; an ``fcntl`` lock on ``<name>.lock``
  makes concurrent processes wait for the one downloading instead of fetching the file twice.

Plain ``http://`` is accepted only for loopback hosts (127.0.0.1, localhost, ::1: tests and local mirrors);
``https://`` goes through urllib with certificate verification. Every failure is a :class:`DownloadError`
that names the URL and why (HTTP status, connection refused, timeout, name resolution, TLS).

Cache layout under ``cache_dir`` (default ``$MASK2FORMER_CACHE``, else ``~/.cache/mask2former``)::

    https/<host>/<16 hex digits of sha256(url)>/<file name>        the file
                                                <file name>.json   its record
                                                <file name>.part   an unfinished download (+ .part.json)
                                                <file name>.lock   held while downloading

No torch import here: the Airflow layer may import this module at DAG-parse time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import unquote, urlsplit

__all__ = [
    "CACHE_ENV",
    "ChecksumError",
    "DownloadError",
    "cached_file",
    "default_cache_dir",
    "download",
    "file_sha256",
    "is_url",
    "normalize_sha256",
    "verify_sha256",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the shared cache folder.
CACHE_ENV = "MASK2FORMER_CACHE"
#: Bytes read from the network per write.
CHUNK_BYTES = 1024 * 1024
#: Seconds between progress lines of one download.
PROGRESS_INTERVAL_S = 5.0
#: Seconds to wait before retry n (n = 1, 2, ...): RETRY_BACKOFF_S * n.
RETRY_BACKOFF_S = 0.5
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
USER_AGENT = "mask2former-airflow"

PathLike = Union[str, "os.PathLike[str]"]
Progress = Callable[[str], None]
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """A URL that could not be downloaded; the message names the URL and the reason."""


class ChecksumError(DownloadError):
    """Downloaded (or local) bytes whose SHA-256 is not the expected one."""


# ------------------------------------------------------------------------------------------- helpers


def default_cache_dir() -> Path:
    """``$MASK2FORMER_CACHE``, else ``~/.cache/mask2former``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mask2former")


def is_url(value: str) -> bool:
    """True for ``http://`` and ``https://`` values (case-insensitive scheme)."""
    return value.lower().startswith(("http://", "https://"))


def normalize_sha256(digest: Optional[str]) -> Optional[str]:
    """Lower-case hex digest, or None; anything but 64 hex digits raises ValueError."""
    if digest is None:
        return None
    text = digest.strip().lower()
    if not _SHA256.fullmatch(text):
        raise ValueError(f"expected a SHA-256 digest of 64 hexadecimal digits, got {digest!r}")
    return text


def file_sha256(path: PathLike) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            hasher.update(block)
    return hasher.hexdigest()


def verify_sha256(path: PathLike, expected: Optional[str], *, source: str) -> None:
    """Raise :class:`ChecksumError` when ``path``'s digest is not ``expected`` (no-op when None)."""
    expected = normalize_sha256(expected)
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumError(f"{source}: SHA-256 mismatch: expected {expected}, got {actual}")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


# ---------------------------------------------------------------------------------------- cache entries


@dataclass(frozen=True)
class _Entry:
    """The cache paths of one URL."""

    folder: Path
    name: str

    @property
    def file(self) -> Path:
        return self.folder / self.name

    @property
    def record(self) -> Path:
        return self.folder / f"{self.name}.json"

    @property
    def part(self) -> Path:
        return self.folder / f"{self.name}.part"

    @property
    def part_record(self) -> Path:
        return self.folder / f"{self.name}.part.json"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.name}.lock"


def _safe_component(text: str, fallback: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("._")
    return cleaned[:120] or fallback


def _entry(url: str, cache_dir: Path) -> _Entry:
    parts = urlsplit(url)
    url_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = _safe_component(unquote(parts.path.rsplit("/", 1)[-1]), "download")
    return _Entry(folder=cache_dir / "https" / _safe_component(parts.netloc, "host") / url_key, name=name)


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _intact(entry: _Entry, url: str, expected: Optional[str]) -> Optional[Path]:
    """The cached file when its record says it is complete and it still is; no network involved."""
    record = _read_json(entry.record)
    if record is None or record.get("url") != url:
        return None
    try:
        stat = entry.file.stat()
    except FileNotFoundError:
        return None
    if stat.st_size != record.get("size"):
        return None
    if stat.st_mtime_ns != record.get("mtime_ns"):
        # touched or rewritten since it was cached: trust only the content
        if file_sha256(entry.file) != record.get("sha256"):
            return None
        _write_json(entry.record, {**record, "mtime_ns": stat.st_mtime_ns})
    if expected is not None and record.get("sha256") != expected:
        return None
    return entry.file


def cached_file(url: str, cache_dir: Optional[PathLike] = None, sha256: Optional[str] = None) -> Optional[Path]:
    """The cached copy of ``url`` when it is complete and intact (and has ``sha256`` when given), else None.

    Never touches the network.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _intact(_entry(url, cache), url, normalize_sha256(sha256))


@contextlib.contextmanager
def _locked(path: Path, *, url: str, report: Progress) -> Iterator[None]:
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            report(f"{url}: another process is downloading it; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ downloading


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"cannot download {url!r}: expected an https:// URL with a host name")
    if scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise DownloadError(f"cannot download {url}: plain http:// is accepted only from this machine "
                            f"({', '.join(LOOPBACK_HOSTS)}); use https:// so the file is fetched over TLS")


class _Retryable(Exception):
    """A transient failure worth another attempt (cut connection, timeout, 5xx); the message says what."""


class _Fatal(Exception):
    """A failure another attempt would not fix (404, connection refused, unknown host, TLS)."""


def _reason(error: BaseException, *, url: str, timeout: float) -> tuple[str, bool]:
    """(why, retryable) of an error from urllib / http.client / the socket."""
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or (443 if parts.scheme.lower() == 'https' else 80)}"
    if isinstance(error, urllib.error.HTTPError):
        retryable = error.code >= 500 or error.code in (408, 429)
        return f"HTTP {error.code} {error.reason}", retryable
    inner = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(inner, ConnectionRefusedError):
        return f"connection refused by {where}", False
    if isinstance(inner, socket.gaierror):
        return f"the host name {parts.hostname} cannot be resolved (no network, or a wrong URL)", False
    if isinstance(inner, ssl.SSLCertVerificationError):
        return f"the TLS certificate of {parts.hostname} cannot be verified ({inner.verify_message})", False
    if isinstance(inner, (TimeoutError, socket.timeout)):
        return f"no answer from {where} within {timeout:g} s (timeout)", True
    if isinstance(inner, http.client.IncompleteRead):
        return "the connection was cut before the end of the file", True
    if isinstance(inner, (ConnectionError, http.client.HTTPException, ssl.SSLError)):
        return f"the connection failed ({type(inner).__name__}: {inner})", True
    if isinstance(inner, OSError) and inner.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"{where} is unreachable ({inner.strerror})", False
    return f"{type(inner).__name__}: {inner}", False


def _content_range_start(value: Optional[str]) -> Optional[int]:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    return int(match.group(1)) if match else None


@dataclass
class _Meter:
    url: str
    total: Optional[int]
    report: Progress
    done: int = 0  # bytes in the part file, resumed ones included
    started: float = 0.0
    last: float = 0.0
    resumed: int = 0

    def __post_init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.resumed = self.done

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL_S:
            self.last = now
            of = f" of {_megabytes(self.total)}" if self.total else ""
            rate = (self.done - self.resumed) / max(now - self.started, 1e-9)
            self.report(f"{self.url}: {_megabytes(self.done)}{of} ({_megabytes(int(rate))}/s)")


def _resume_offset(entry: _Entry, url: str) -> tuple[int, Optional[str], Optional[int]]:
    """(bytes already in .part, If-Range validator, total size) of a resumable part, else (0, None, None)."""
    record = _read_json(entry.part_record)
    size = entry.part.stat().st_size if entry.part.is_file() else 0
    if record is None or record.get("url") != url or size == 0:
        entry.part.unlink(missing_ok=True)
        entry.part_record.unlink(missing_ok=True)
        return 0, None, None
    return size, record.get("etag") or record.get("last_modified"), record.get("total")


def _attempt(url: str, entry: _Entry, *, timeout: float, report: Progress) -> dict[str, Any]:
    """One request; appends to or restarts ``.part``. Returns the part's record once it is complete."""
    offset, validator, total = _resume_offset(entry, url)
    if offset and total == offset:
        return _read_json(entry.part_record) or {}  # complete before an earlier process could rename it
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    context = ssl.create_default_context() if url.lower().startswith("https://") else None
    try:
        response = urllib.request.urlopen(request, timeout=timeout, context=context)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            entry.part.unlink(missing_ok=True)  # the part does not fit the file any more: start again
            raise _Retryable("the server refused to resume (HTTP 416); starting again") from error
        why, retryable = _reason(error, url=url, timeout=timeout)
        raise (_Retryable if retryable else _Fatal)(why) from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        why, retryable = _reason(error, url=url, timeout=timeout)
        raise (_Retryable if retryable else _Fatal)(why) from error
    with response:
        status = response.status
        if status == 206:
            if not offset or _content_range_start(response.headers.get("Content-Range")) != offset:
                entry.part.unlink(missing_ok=True)
                entry.part_record.unlink(missing_ok=True)
                raise _Retryable(f"the server sent the byte range {response.headers.get('Content-Range')!r}, not "
                                 f"the one asked for ({headers.get('Range', 'none')}); starting again")
            mode = "ab"
            report(f"{url}: resuming at {_megabytes(offset)}")
        elif status == 200:
            if offset:
                report(f"{url}: the server does not resume (HTTP 200 instead of 206); downloading from the start")
            offset, mode = 0, "wb"
        else:
            raise _Fatal(f"unexpected HTTP {status} {response.reason}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        record = {"url": url, "etag": response.headers.get("ETag"),
                  "last_modified": response.headers.get("Last-Modified"), "total": total}
        if mode == "wb":
            _write_json(entry.part_record, record)
        meter = _Meter(url=url, total=total, report=report, done=offset)
        try:
            with open(entry.part, mode) as out:
                while block := response.read(CHUNK_BYTES):
                    out.write(block)
                    meter.add(len(block))
        except (OSError, http.client.HTTPException) as error:
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # a full disk is not the network's fault: let the caller see the OSError
            why, _ = _reason(error, url=url, timeout=timeout)
            raise _Retryable(f"{why} ({_megabytes(meter.done)} received)") from error
    size = entry.part.stat().st_size
    if total is not None and size != total:
        raise _Retryable(f"the connection was cut after {size} of {total} bytes")
    record["total"] = size
    _write_json(entry.part_record, record)
    return record


def download(
    url: str,
    cache_dir: Optional[PathLike] = None,
    sha256: Optional[str] = None,
    timeout: float = 60.0,
    progress: Optional[Progress] = None,
    attempts: int = 4,
) -> Path:
    """Local path of ``url``'s file, downloading it into the cache when no intact copy is there.

    ``timeout`` bounds the connection and each read (seconds); ``attempts`` counts requests for transient
    failures (cut connections resume where they stopped). ``progress`` receives human-readable lines
    (default: this module's logger). Raises :class:`DownloadError` / :class:`ChecksumError`.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    _check_url(url)
    expected = normalize_sha256(sha256)
    report = progress if progress is not None else logger.info
    entry = _entry(url, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    hit = _intact(entry, url, expected)
    if hit is not None:
        return hit
    entry.folder.mkdir(parents=True, exist_ok=True)
    with _locked(entry.lock, url=url, report=report):
        hit = _intact(entry, url, expected)  # another process may have finished while we waited
        if hit is not None:
            report(f"{url}: downloaded by another process, cached at {hit}")
            return hit
        began = time.monotonic()
        try:
            record = _fetch(url, entry, timeout=timeout, attempts=attempts, report=report)
        except DownloadError as error:
            note = _stale_copy_note(entry, url, expected)
            raise DownloadError(f"{error}{note}") from error.__cause__
        digest = file_sha256(entry.part)
        if expected is not None and digest != expected:
            entry.part.unlink(missing_ok=True)
            entry.part_record.unlink(missing_ok=True)
            raise ChecksumError(f"{url}: SHA-256 mismatch: expected {expected}, got {digest}; the download was "
                                "deleted (a changed or corrupted file, or a wrong digest in the spec)")
        os.replace(entry.part, entry.file)
        stat = entry.file.stat()
        _write_json(entry.record, {"url": url, "size": stat.st_size, "sha256": digest, "mtime_ns": stat.st_mtime_ns,
                                   "etag": record.get("etag"), "last_modified": record.get("last_modified"),
                                   "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        entry.part_record.unlink(missing_ok=True)
    report(f"{url}: downloaded {_megabytes(stat.st_size)} in {time.monotonic() - began:.1f} s to {entry.file}")
    return entry.file


def _fetch(url: str, entry: _Entry, *, timeout: float, attempts: int, report: Progress) -> dict[str, Any]:
    why = "no attempt was made"
    for attempt in range(1, attempts + 1):
        try:
            return _attempt(url, entry, timeout=timeout, report=report)
        except _Fatal as error:
            raise DownloadError(f"cannot download {url}: {error}") from error.__cause__
        except _Retryable as error:
            why = str(error)
            if attempt < attempts:
                report(f"{url}: attempt {attempt} of {attempts} failed ({why}); retrying")
                time.sleep(RETRY_BACKOFF_S * attempt)
    kept = entry.part.stat().st_size if entry.part.is_file() else 0
    resume = f"; {_megabytes(kept)} are kept and the next run resumes from there" if kept else ""
    raise DownloadError(f"cannot download {url} after {attempts} attempts: {why}{resume}")


def _stale_copy_note(entry: _Entry, url: str, expected: Optional[str]) -> str:
    """Why a cached copy was not used, for a download that failed (the user may think it is cached)."""
    record = _read_json(entry.record)
    if expected is None or record is None or record.get("url") != url or not entry.file.is_file():
        return ""
    return (f" (a cached copy exists at {entry.file}, but its SHA-256 {record.get('sha256')} is not the expected "
            f"{expected})")
