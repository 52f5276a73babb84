"""Shared pieces of the fault-injection suite: an S3 endpoint that can really go down and come back, a
size-limited file system, the record of what each fault did."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

from s3_server import FAKE_CREDENTIALS, free_port
from waiting import wait_for  # noqa: F401 - the fault tests import it from here

#: (fault, how it was injected, what was observed, data lost), in the order the tests ran.
OBSERVED: List[Tuple[str, str, str, str]] = []


def observed(fault: str, injected: str, result: str, lost: str) -> None:
    OBSERVED.append((fault, injected, result, lost))
    print(f"FAULT | {fault} | {injected} | {result} | {lost}")


class S3Endpoint:
    """moto's S3 application served on 127.0.0.1 that :meth:`stop` takes down for real (the listening socket
    closed: clients get "connection refused") and :meth:`start` brings back on the same port, with the same
    buckets and objects (moto keeps them in this process)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> "S3Endpoint":
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self._server = make_server("127.0.0.1", self.port, DomainDispatcherApplication(create_backend_app), True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    @property
    def up(self) -> bool:
        return self._server is not None

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=FAKE_CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")


class Attempts:
    """Counts the HTTP requests a boto3 client sends (each retry is one more), by operation."""

    def __init__(self, client: Any, on_send: Callable[[str, Any], None] | None = None) -> None:
        self.sent: List[Tuple[float, str]] = []
        self._on_send = on_send
        self._lock = threading.Lock()
        client.meta.events.register("before-send.s3.*", self._seen)

    def _seen(self, request: Any, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        with self._lock:
            self.sent.append((time.monotonic(), operation))
        if self._on_send is not None:
            self._on_send(operation, request)

    def count(self, operation: str) -> int:
        return sum(1 for _, op in self.sent if op == operation)


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mount_point`` (needs root with CAP_SYS_ADMIN; the test is skipped,
    saying why, where the mount is refused), unmounted afterwards."""
    import pytest

    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "m2f-fault-tmpfs",
                           str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def can_mount() -> bool:
    return os.geteuid() == 0


def fill(folder: Path, *, leave: int) -> int:
    """Allocate a file that leaves ``leave`` bytes free on ``folder``'s file system; returns its size."""
    stat = os.statvfs(folder)
    size = stat.f_bavail * stat.f_frsize - leave
    fd = os.open(folder / "filler", os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return size


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


