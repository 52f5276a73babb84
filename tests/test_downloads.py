"""Pretrained weights by URL: cache, resume, checksum, clear failures, offline use, concurrent processes.

A real HTTP server on 127.0.0.1 (http.server in a thread) serves the files and records every request, so the
tests see exactly what went over the wire. Plain http:// is accepted for loopback hosts only; the https://
path is the same urllib code with certificate verification.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mask2former.config import SpecError, load_spec
from mask2former.data import downloads
from mask2former.data.downloads import ChecksumError, DownloadError, cached_file, download
from mask2former.data.staging import fetch_uri

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = os.urandom(300_000) + b"end-of-weights"
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FileServer:
    """Serves ``files`` over HTTP/1.0 with Range/If-Range support and records each request's headers.

    ``cut_after[path] = n`` makes the next full (non-range) answer for ``path`` announce the whole length,
    send ``n`` bytes and close the connection. ``honour_range = False`` answers every request with 200.
    ``delay_s`` sleeps before each answer; ``chunk_delay_s`` between 64 KiB blocks of the body.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.cut_after: dict[str, int] = {}
        self.honour_range = True
        self.delay_s = 0.0
        self.chunk_delay_s = 0.0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers.items())))
                time.sleep(server.delay_s)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if_range = self.headers.get("If-Range")
                if match and server.honour_range and (if_range is None or if_range == etag):
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_error(416, "Range Not Satisfiable")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", etag)
                self.end_headers()
                data = body[start:]
                cut = server.cut_after.pop(self.path, None) if start == 0 else None
                if cut is not None:
                    self.wfile.write(data[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                for offset in range(0, len(data), 65536):
                    self.wfile.write(data[offset:offset + 65536])
                    time.sleep(server.chunk_delay_s)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FileServer({"/weights/swin_tiny_22k.pth": PAYLOAD, "/other.bin": b"other"})
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(downloads, "RETRY_BACKOFF_S", 0.01)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_downloads_once_then_the_cache_answers_without_any_request(server, tmp_path):
    url = server.url("/weights/swin_tiny_22k.pth")
    lines = []
    first = download(url, cache_dir=tmp_path, progress=lines.append)
    assert first.read_bytes() == PAYLOAD and first.name == "swin_tiny_22k.pth"
    assert first.is_relative_to(tmp_path / "https")
    assert any("downloaded" in line for line in lines)
    assert len(server.requests) == 1
    assert not list(first.parent.glob("*.part*")), "no partial file is left behind"

    again = download(url, cache_dir=tmp_path, sha256=PAYLOAD_SHA)
    assert again == first
    assert len(server.requests) == 1, "a cache hit must not touch the network"
    assert cached_file(url, tmp_path) == first
    assert cached_file(url, tmp_path, sha256="0" * 64) is None


def test_offline_machine_uses_the_cached_copy(server, tmp_path):
    url = server.url("/weights/swin_tiny_22k.pth")
    download(url, cache_dir=tmp_path)
    server.stop()
    path = download(url, cache_dir=tmp_path, sha256=PAYLOAD_SHA.upper())
    assert path.read_bytes() == PAYLOAD


def test_default_cache_folder_comes_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv(downloads.CACHE_ENV, str(tmp_path / "shared-cache"))
    path = download(server.url("/other.bin"))
    assert path.is_relative_to(tmp_path / "shared-cache") and path.read_bytes() == b"other"


def test_cut_connection_is_resumed_with_a_range_request(server, tmp_path):
    url = server.url("/weights/swin_tiny_22k.pth")
    server.cut_after["/weights/swin_tiny_22k.pth"] = 100_000
    path = download(url, cache_dir=tmp_path, sha256=PAYLOAD_SHA, attempts=3)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PAYLOAD_SHA
    assert len(server.requests) == 2
    first, second = (headers for _, headers in server.requests)
    assert "Range" not in first
    assert second["Range"] == "bytes=100000-"
    assert second["If-Range"] == '"' + PAYLOAD_SHA[:16] + '"'


def test_interrupted_run_leaves_a_part_that_the_next_run_resumes(server, tmp_path):
    url = server.url("/weights/swin_tiny_22k.pth")
    server.cut_after["/weights/swin_tiny_22k.pth"] = 120_000
    with pytest.raises(DownloadError) as info:
        download(url, cache_dir=tmp_path, attempts=1)
    message = str(info.value)
    assert url in message and "cut" in message and "resumes" in message
    parts = list(tmp_path.rglob("swin_tiny_22k.pth.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == 120_000
    assert cached_file(url, tmp_path) is None

    path = download(url, cache_dir=tmp_path, sha256=PAYLOAD_SHA)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1][1]["Range"] == "bytes=120000-"


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    url = server.url("/weights/swin_tiny_22k.pth")
    server.honour_range = False
    server.cut_after["/weights/swin_tiny_22k.pth"] = 50_000
    path = download(url, cache_dir=tmp_path, sha256=PAYLOAD_SHA, attempts=2)
    assert path.read_bytes() == PAYLOAD, "a 200 answer to a Range request must not be appended to the part"
    assert server.requests[1][1]["Range"] == "bytes=50000-"


def test_checksum_mismatch_is_refused_and_nothing_is_cached(server, tmp_path):
    url = server.url("/weights/swin_tiny_22k.pth")
    wrong = "ab" * 32
    with pytest.raises(ChecksumError) as info:
        download(url, cache_dir=tmp_path, sha256=wrong)
    message = str(info.value)
    assert url in message and wrong in message and PAYLOAD_SHA in message
    assert cached_file(url, tmp_path) is None
    left = {path.name for path in tmp_path.rglob("*") if path.is_file()}
    assert left == {"swin_tiny_22k.pth.lock"}, "neither the file, its record nor a part may stay"
    assert download(url, cache_dir=tmp_path, sha256=PAYLOAD_SHA).read_bytes() == PAYLOAD


def test_a_damaged_cached_copy_is_fetched_again(server, tmp_path):
    url = server.url("/weights/swin_tiny_22k.pth")
    path = download(url, cache_dir=tmp_path)
    damaged = bytearray(PAYLOAD)
    damaged[10] ^= 0xFF
    path.write_bytes(bytes(damaged))  # same size, new mtime: the record's digest decides
    assert download(url, cache_dir=tmp_path).read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_http_404_names_the_status_and_the_url(server, tmp_path):
    url = server.url("/missing.pth")
    with pytest.raises(DownloadError) as info:
        download(url, cache_dir=tmp_path)
    assert str(info.value) == f"cannot download {url}: HTTP 404 Not Found"
    assert len(server.requests) == 1, "a 404 is not retried"


def test_connection_refused_is_named(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/w.pth"
    with pytest.raises(DownloadError) as info:
        download(url, cache_dir=tmp_path)
    assert str(info.value) == f"cannot download {url}: connection refused by 127.0.0.1:{port}"


def test_timeout_is_named_after_the_retries(server, tmp_path):
    server.delay_s = 1.0
    url = server.url("/other.bin")
    with pytest.raises(DownloadError) as info:
        download(url, cache_dir=tmp_path, timeout=0.2, attempts=2)
    message = str(info.value)
    assert url in message and "timeout" in message and "after 2 attempts" in message


def test_plain_http_is_refused_for_other_hosts(tmp_path):
    with pytest.raises(DownloadError, match="only from this machine.*use https://"):
        download("http://example.com/w.pth", cache_dir=tmp_path)


def test_two_processes_download_the_same_file_once(server, tmp_path):
    server.chunk_delay_s = 0.05  # ~0.25 s per download: the second process must wait on the lock
    url = server.url("/weights/swin_tiny_22k.pth")
    code = ("import sys; from mask2former.data.downloads import download; "
            "print(download(sys.argv[1], cache_dir=sys.argv[2], sha256=sys.argv[3]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(tmp_path), PAYLOAD_SHA], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert Path(outputs[0][0].strip()).read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_fetch_uri_dispatches_urls_to_the_download_cache(server, tmp_path):
    url = server.url("/weights/swin_tiny_22k.pth")
    path = fetch_uri(url, tmp_path, sha256=PAYLOAD_SHA)
    assert path.read_bytes() == PAYLOAD and path.is_relative_to(tmp_path / "https")
    assert fetch_uri(url, tmp_path) == path and len(server.requests) == 1


def test_fetch_uri_checks_the_digest_of_local_files(tmp_path):
    local = tmp_path / "w.pth"
    local.write_bytes(PAYLOAD)
    assert fetch_uri(f"file://{local}", tmp_path / "cache", sha256=PAYLOAD_SHA) == local
    with pytest.raises(ChecksumError, match=f"expected {'0' * 64}, got {PAYLOAD_SHA}"):
        fetch_uri(str(local), tmp_path / "cache", sha256="0" * 64)
    assert local.read_bytes() == PAYLOAD, "a local file is never deleted"


EXPORT = {"export.checkpoint": "m.pth"}


def test_spec_accepts_digests_next_to_their_files():
    cfg = load_spec("train", overrides={
        "dataset.train.img_dir": "/d/img", "dataset.train.panoptic_json": "/d/p.json",
        "dataset.train.panoptic_dir": "/d/p", "dataset.label_map": "/d/l.json",
        "train.pretrained_model_path": "https://example.com/m.pth", "train.pretrained_model_sha256": PAYLOAD_SHA,
        "model.backbone.pretrained_weights": "https://example.com/swin.pth",
        "model.backbone.pretrained_weights_sha256": PAYLOAD_SHA.upper()})
    assert cfg.train.pretrained_model_sha256 == PAYLOAD_SHA


@pytest.mark.parametrize("overrides,expected", [
    ({"model.backbone.pretrained_weights": "w.pth", "model.backbone.pretrained_weights_sha256": "abc"},
     "model.backbone.pretrained_weights_sha256 'abc' is not a SHA-256 digest: expected 64 hexadecimal digits"),
    ({"model.backbone.pretrained_weights_sha256": PAYLOAD_SHA},
     "model.backbone.pretrained_weights_sha256 is set but model.backbone.pretrained_weights is not"),
])
def test_spec_refuses_bad_digests_in_one_sentence(overrides, expected):
    with pytest.raises(SpecError) as info:
        load_spec("export", overrides={**EXPORT, **overrides})
    assert expected in str(info.value)
