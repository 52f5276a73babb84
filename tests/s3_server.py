"""A real S3 endpoint for tests: moto's threaded server on 127.0.0.1 and a free port.

Import the fixtures into a test module (pytest collects fixtures from the module namespace)::

    from s3_server import moto_endpoint, moto_server, s3_env  # noqa: F401

* ``moto_server`` (session): the running :class:`MotoS3Server` (``endpoint_url``, ``requests``).
* ``moto_endpoint`` (session): the server's ``http://127.0.0.1:PORT`` URL.
* ``s3_env``: sets fake AWS credentials, region and ``AWS_ENDPOINT_URL`` for the test, so boto3 clients
  built from the standard environment talk to the server; returns the endpoint URL.
* ``new_bucket(endpoint_url)``: creates a uniquely named bucket and returns its name.
* ``count_calls(client)``: counts the S3 operations a boto3 client sends (client-side view).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoS3Server:
    """moto's ``ThreadedMotoServer`` on 127.0.0.1 and a free port, recording the requests it serves.

    ``requests`` holds ``(method, path)`` of every request the server logged (path without the query),
    so tests can assert what reached the server, independently of any client-side counting.
    """

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._handler = _RequestRecorder(self.requests)

    def start(self) -> None:
        log = logging.getLogger("werkzeug")
        log.setLevel(logging.INFO)
        log.addHandler(self._handler)
        log.propagate = False
        self._server.start()

    def stop(self) -> None:
        self._server.stop()
        logging.getLogger("werkzeug").removeHandler(self._handler)

    def object_gets(self, bucket: str) -> list[str]:
        """Paths of the GET requests for objects (not listings) of ``bucket``."""
        prefix = f"/{bucket}/"
        return [path for method, path in list(self.requests) if method == "GET" and path.startswith(prefix)
                and len(path) > len(prefix)]


class _RequestRecorder(logging.Handler):
    _ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, sink: list[tuple[str, str]]) -> None:
        super().__init__(level=logging.INFO)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if not record.args or not isinstance(record.args, tuple):
            return
        line = self._ANSI.sub("", str(record.args[0])).split()
        if len(line) >= 2:
            self._sink.append((line[0], line[1].split("?", 1)[0]))


@contextmanager
def running_moto_server() -> Iterator[MotoS3Server]:
    """Start a :class:`MotoS3Server`; yield it; stop it."""
    server = MotoS3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def s3_client(endpoint_url: str) -> Any:
    """A boto3 S3 client of the server with the fake credentials (independent of the environment)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=FAKE_CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def new_bucket(endpoint_url: str) -> str:
    """Create a bucket with a unique name (tests share one server) and return the name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint_url).create_bucket(Bucket=name)
    return name


class CallCounter(Counter):
    """Counts the S3 operations one boto3 client sends, through its ``provide-client-params`` event hook.

    ``counter["GetObject"]`` is a count; ``counter.order`` lists ``(operation, Key)`` in sending order.
    """

    def __init__(self, client: Any) -> None:
        super().__init__()
        self.order: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        client.meta.events.register("provide-client-params.s3.*", self._seen)

    def _seen(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        with self._lock:
            self[model.name] += 1
            self.order.append((model.name, params.get("Key")))


def count_calls(client: Any) -> CallCounter:
    """Start counting the S3 operations ``client`` sends."""
    return CallCounter(client)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3Server]:
    with running_moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def moto_endpoint(moto_server: MotoS3Server) -> str:
    return moto_server.endpoint_url


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    return moto_endpoint
