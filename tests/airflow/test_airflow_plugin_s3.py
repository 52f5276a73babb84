"""The plugin on an S3 results root: a real S3 endpoint (moto's server) reached through the Airflow
connection ``aws_default``, as in the deployment. Lists, job pages, files, the per-run ``root`` parameter,
path refusals, clear errors, and the connection's secret key kept out of every response and log."""

from __future__ import annotations

import json
import logging
import os
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

import mask2former_plugin as plugin
from s3_server import free_port, moto_endpoint, moto_server, new_bucket, s3_client  # noqa: F401 - fixtures
from test_airflow_plugin import job_documents

ACCESS_KEY = "AKIAPLUGINTEST"
SECRET_KEY = "plugin-secret-Vq8rT2xWz5"
PREFIX = "results"
#: Larger than one streamed chunk (mask2former_jobs.CHUNK_BYTES): served in several.
IMAGE = b"\x89PNG\r\n\x1a\n" + os.urandom(600 * 1024)
#: In every object that no route may serve.
NOT_SERVED = "must-not-be-served"


def put_job(client, bucket: str, prefix: str, job: str, extra=None, **kwargs) -> None:
    files = {**job_documents(**kwargs), **(extra or {})}
    for name, content in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{job}/{name}", Body=content)


@pytest.fixture(scope="module")
def s3_jobs(moto_endpoint):
    """A results root with three jobs (status.json written in two rounds, a second apart) and decoys.

    Newest first is run_c's mapped trial, then run_a, then run_b: neither name order. Decoys: a status.json
    too deep and one too shallow, a root-level file, literal ``..`` keys, objects outside the prefix.
    """
    client = s3_client(moto_endpoint)
    bucket = new_bucket(moto_endpoint)
    put_job(client, bucket, PREFIX, "pipe/run_b/train", metrics={"mIoU": 4.0, "PQ": 2.0, "panoptic": {"SQ": 70.0}},
            extra={"overlay.png": IMAGE, "spec.yaml": b"train:\n  num_epochs: 3\n"})
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    put_job(client, bucket, PREFIX, "pipe/run_a/train", metrics={"mIoU": 7.5})
    put_job(client, bucket, PREFIX, "pipe/run_c/trial.map0", action="train", metrics={"mIoU": 9.25})
    decoys = {f"{PREFIX}/pipe/run_a/train/trials/t0/status.json": job_documents()["status.json"],
              f"{PREFIX}/pipe/status.json": job_documents()["status.json"],
              f"{PREFIX}/champion.json": NOT_SERVED.encode(),
              f"{PREFIX}/pipe/run_a/train/../leak.json": NOT_SERVED.encode(),
              f"{PREFIX}/../outside.json": NOT_SERVED.encode(),
              "outside.json": NOT_SERVED.encode(),
              f"{PREFIX}/pipe/run_b/train/model.pth": NOT_SERVED.encode()}
    for key, content in decoys.items():
        client.put_object(Bucket=bucket, Key=key, Body=content)
    other = new_bucket(moto_endpoint)
    put_job(client, other, "team/results", "pipe/run_x/train", metrics={"mIoU": 33.0},
            extra={"overlay.png": b"\x89PNG other"})
    return SimpleNamespace(bucket=bucket, root=f"s3://{bucket}/{PREFIX}", other_root=f"s3://{other}/team/results")


def set_connection(monkeypatch, endpoint_url: str, **extra) -> None:
    """``aws_default`` as the deployment defines it: an environment connection with the endpoint in its extra."""
    connection = {"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
                  "extra": {"endpoint_url": endpoint_url, "region_name": "us-east-1", **extra}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))


def refuse_secrets(response) -> None:
    response.read()
    assert SECRET_KEY.encode() not in response.content


@pytest.fixture
def client(monkeypatch, moto_endpoint, s3_jobs):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)  # only the connection can lead to the server
    set_connection(monkeypatch, moto_endpoint)
    monkeypatch.setenv("MASK2FORMER_RESULTS_ROOT", s3_jobs.root)
    app = plugin.build_app()
    app.dependency_overrides[plugin.require_user] = lambda: object()
    app.dependency_overrides[plugin.current_access] = lambda: access_of(s3_jobs)
    test_client = TestClient(app)
    test_client.event_hooks = {"request": [], "response": [refuse_secrets]}
    return test_client


#: Results roots that runs recorded (XCom mask2former_job_location), besides the test's other bucket.
RECORDED_ROOTS = ("s3://no-such-bucket-m2f/results", "s3://no-such-bucket-m2f/x", "s3:///results",
                  "s3://bad bucket/results")


def access_of(s3_jobs, *, dag_ids=None, conn_id="aws_default") -> "plugin.Access":
    """What the auth manager and the metadata database give a user who may read ``dag_ids`` (None: all):
    the runs' start times (newest: run_c, then run_a, then run_b) and the roots they recorded."""
    return plugin.Access(dag_ids=dag_ids, recorded_roots={s3_jobs.other_root: conn_id,
                                                          **{root: "aws_default" for root in RECORDED_ROOTS}},
                         run_order={("pipe", "run_c"): 3.0, ("pipe", "run_a"): 2.0, ("pipe", "run_b"): 1.0})


def job_ids(listing) -> list:
    return [job["job_id"] for job in listing["jobs"]]


def test_list_page_and_api_show_s3_jobs_newest_first_with_headline_metrics(client, s3_jobs):
    listing = client.get("/api/jobs").json()
    assert job_ids(listing) == ["pipe/run_c/trial.map0", "pipe/run_a/train", "pipe/run_b/train"]
    assert listing["total_entries"] == 3 and listing["results_root"] == s3_jobs.root
    run_b = listing["jobs"][2]
    assert run_b["action"] == "train" and run_b["status"] == "SUCCESS" and run_b["finished"]
    assert run_b["metrics"] == {"mIoU": 4.0, "PQ": 2.0, "panoptic.SQ": 70.0}
    page = client.get("/")
    assert page.status_code == 200 and s3_jobs.root in page.text
    positions = [page.text.index(f">{job}</a>") for job in job_ids(listing)]
    assert positions == sorted(positions)
    assert "<td>9.25</td>" in page.text and "<td>7.5</td>" in page.text and "<td>4</td>" in page.text


def test_limit_reads_only_the_jobs_shown_and_counts_them_all(client, s3_jobs, moto_server):
    before = len(moto_server.object_gets(s3_jobs.bucket))
    first = client.get("/api/jobs", params={"limit": 1}).json()
    assert job_ids(first) == ["pipe/run_c/trial.map0"] and first["total_entries"] == 3
    read = moto_server.object_gets(s3_jobs.bucket)[before:]
    job = f"/{s3_jobs.bucket}/{PREFIX}/pipe/run_c/trial.map0"
    assert sorted(read) == [f"{job}/metrics.json", f"{job}/status.json"]  # no GET for the jobs not shown
    second = client.get("/api/jobs", params={"limit": 1, "offset": 1}).json()
    assert job_ids(second) == ["pipe/run_a/train"] and second["total_entries"] == 3
    page = client.get("/", params={"limit": 2}).text
    assert "run_a/train" in page and "run_b/train" not in page and "offset=2&amp;limit=2" in page


def test_job_page_shows_metrics_the_plot_and_the_images_of_an_s3_job(client, s3_jobs):
    page = client.get("/jobs/pipe/run_b/train")
    assert page.status_code == 200
    assert "<svg" in page.text and 'aria-label="mIoU"' in page.text
    assert "<td>panoptic.SQ</td><td>70</td>" in page.text and ", published" in page.text
    assert f"{s3_jobs.root}/pipe/run_b/train" in page.text
    assert "src='/mask2former/files/pipe/run_b/train/overlay.png'" in page.text
    assert f"overlay.png</a> ({len(IMAGE)} bytes)" in page.text and "spec.yaml" in page.text
    mapped = client.get("/jobs/pipe/run_c/trial.map0")
    assert mapped.status_code == 200 and "<td>mIoU</td><td>9.25</td>" in mapped.text


def test_files_are_streamed_with_their_bytes_and_content_type(client):
    image = client.get("/files/pipe/run_b/train/overlay.png")
    assert image.status_code == 200 and image.content == IMAGE
    assert image.headers["content-type"] == "image/png" and image.headers["content-length"] == str(len(IMAGE))
    assert image.headers["content-security-policy"] == "sandbox"
    spec = client.get("/files/pipe/run_b/train/spec.yaml")
    assert spec.text == "train:\n  num_epochs: 3\n" and spec.headers["content-type"].startswith("text/plain")
    metrics = client.get("/files/pipe/run_b/train/metrics.json")
    assert metrics.headers["content-type"] == "application/json" and metrics.json()["PQ"] == 2.0


@pytest.mark.parametrize("url", [
    "/files/pipe/run_a/train/..%2Fleak.json",  # a literal '..' key exists: S3 would serve it
    "/files/..%2Foutside.json",
    "/files/pipe/run_a/train/..%2F..%2F..%2F..%2Foutside.json",
    "/files/%2Foutside.json",
    "/files/champion.json",  # inside the root, outside any job folder
    "/files/pipe/run_b/train/model.pth",  # not a served suffix
    "/files/pipe/run_b/train/missing.png",
    "/jobs/pipe/nope/train",
    "/jobs/pipe/run_a",
    "/jobs/pipe/run_a/train/trials/t0",  # a status.json, but deeper than a job
    "/jobs/pipe/run_a/train/..%2F..%2Frun_b%2Ftrain",
])
def test_escaping_paths_unknown_jobs_and_unserved_files_are_404(client, url):
    refused = client.get(url)
    assert refused.status_code == 404 and NOT_SERVED not in refused.text


def test_a_runs_own_s3_root_is_browsable_through_the_link_and_the_root_parameter(client, s3_jobs):
    from operators import Mask2FormerJobLink

    key = SimpleNamespace(dag_id="pipe", run_id="run_x", task_id="train", map_index=-1)
    link = Mask2FormerJobLink().get_link(SimpleNamespace(results_root=s3_jobs.other_root), ti_key=key)
    parts = urlsplit(link)
    assert parts.path == "/mask2former/jobs/pipe/run_x/train" and parts.query
    assert client.get("/jobs/pipe/run_x/train").status_code == 404  # not under the configured root
    page = client.get(f"/jobs/pipe/run_x/train?{parts.query}")
    assert page.status_code == 200 and "<td>mIoU</td><td>33</td>" in page.text
    image_url = page.text.split("<img class='result' src='")[1].split("'")[0].replace("&amp;", "&")
    image = client.get(image_url[len("/mask2former"):])
    assert image.status_code == 200 and image.content == b"\x89PNG other"
    listing = client.get("/api/jobs", params={"root": s3_jobs.other_root}).json()
    assert job_ids(listing) == ["pipe/run_x/train"] and listing["results_root"] == s3_jobs.other_root
    same_root = Mask2FormerJobLink().get_link(SimpleNamespace(results_root=s3_jobs.root), ti_key=key)
    assert "?" not in same_root  # the deployment's own root needs no parameter


@pytest.mark.parametrize("root", ["/etc", "file:///etc", "/tmp", "results"])
def test_local_roots_are_refused_when_the_configured_root_is_on_s3(client, root):
    for url in ("/", "/api/jobs", "/jobs/pipe/run_b/train", "/files/passwd", "/files/pipe/run_b/train/spec.yaml"):
        assert client.get(url, params={"root": root}).status_code == 403, url


def test_an_unreachable_endpoint_is_a_502_naming_the_root(client, s3_jobs, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    set_connection(monkeypatch, f"http://127.0.0.1:{free_port()}", config_kwargs={"retries": {"max_attempts": 1}})
    for url in ("/", "/api/jobs", "/jobs/pipe/run_b/train", "/files/pipe/run_b/train/spec.yaml"):
        failed = client.get(url)
        assert failed.status_code == 502, url
        detail = failed.json()["detail"]
        assert s3_jobs.root in detail and "the S3 endpoint could not be reached" in detail
        assert "Traceback" not in failed.text
    assert SECRET_KEY not in caplog.text


def test_a_missing_bucket_is_a_404_naming_the_root_and_a_malformed_one_a_400(client, caplog):
    caplog.set_level(logging.DEBUG)
    root = "s3://no-such-bucket-m2f/results"
    for url in ("/api/jobs", "/", "/jobs/pipe/run_b/train"):
        missing = client.get(url, params={"root": root})
        assert missing.status_code == 404, url
        assert root in missing.json()["detail"] and "the bucket does not exist" in missing.json()["detail"]
    assert SECRET_KEY not in caplog.text
    for not_a_root in ("s3:///results", "s3://bad bucket/results"):
        assert client.get("/api/jobs", params={"root": not_a_root}).status_code == 400


def test_the_secret_key_reaches_no_response_and_no_log(client, s3_jobs, caplog):
    """The client's response hook checks every response of this module; here the logs of a full tour too."""
    caplog.set_level(logging.DEBUG)
    assert client.get("/").status_code == 200
    assert client.get("/jobs/pipe/run_b/train").status_code == 200
    assert client.get("/files/pipe/run_b/train/spec.yaml").status_code == 200
    assert client.get("/api/jobs", params={"root": "s3://no-such-bucket-m2f/x"}).status_code == 404
    assert ACCESS_KEY in caplog.text or "aws_default" in caplog.text  # the tour did log about the connection
    assert SECRET_KEY not in caplog.text
    with pytest.raises(AssertionError):  # the hook would catch a response carrying the key
        refuse_secrets(SimpleNamespace(read=lambda: None, content=f"key={SECRET_KEY}".encode()))


def test_one_s3_client_serves_the_requests_until_the_connection_changes(client, monkeypatch, moto_endpoint):
    """A client costs ~120 ms to create and a job page makes one request per image: it is reused, but a
    changed connection (endpoint, keys) takes effect on the next request."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    clients = []
    create = S3Hook.get_conn
    monkeypatch.setattr(S3Hook, "get_conn", lambda hook: clients.append(create(hook)) or clients[-1])
    plugin._cached_hooks.clear()
    for _ in range(3):
        assert client.get("/api/jobs").status_code == 200
    assert len({id(c) for c in clients}) == 1
    set_connection(monkeypatch, f"http://127.0.0.1:{free_port()}", config_kwargs={"retries": {"max_attempts": 1}})
    assert client.get("/api/jobs").status_code == 502 and len({id(c) for c in clients}) == 2
    set_connection(monkeypatch, moto_endpoint)
    assert client.get("/api/jobs").status_code == 200 and len({id(c) for c in clients}) == 3
    assert SECRET_KEY not in str(plugin._cached_hooks)


def test_a_root_no_readable_run_recorded_is_refused(client, s3_jobs):
    """As a viewer tried: a bucket the deployment's credentials reach, named in ``root``."""
    stranger = s3_jobs.other_root.replace("/team/results", "/elsewhere")
    for url in ("/api/jobs", "/jobs/pipe/run_x/train", "/files/pipe/run_x/train/secrets.json"):
        assert client.get(url, params={"root": stranger}).status_code == 403, url


def test_a_user_sees_only_jobs_of_dags_they_may_read(client, s3_jobs):
    client.app.dependency_overrides[plugin.current_access] = lambda: access_of(s3_jobs, dag_ids=frozenset({"other"}))
    assert client.get("/api/jobs").json()["jobs"] == []
    assert client.get("/jobs/pipe/run_b/train").status_code == 404
    assert client.get("/files/pipe/run_b/train/spec.yaml").status_code == 404
    client.app.dependency_overrides[plugin.current_access] = lambda: access_of(s3_jobs, dag_ids=frozenset({"pipe"}))
    assert job_ids(client.get("/api/jobs").json()) == ["pipe/run_c/trial.map0", "pipe/run_a/train", "pipe/run_b/train"]


def test_only_the_projects_files_are_served(client, s3_jobs, moto_endpoint):
    s3_client(moto_endpoint).put_object(Bucket=s3_jobs.bucket, Key=f"{PREFIX}/pipe/run_b/train/secrets.json",
                                        Body=NOT_SERVED.encode())
    assert client.get("/files/pipe/run_b/train/secrets.json").status_code == 404
    assert client.get("/files/pipe/run_b/train/status.json").status_code == 200


def test_a_runs_root_is_read_through_the_runs_own_connection(client, s3_jobs, monkeypatch, moto_endpoint):
    """aws_default cannot reach the run's bucket; the connection the run published with can."""
    connection = {"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
                  "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_TEAM_S3", json.dumps(connection))
    set_connection(monkeypatch, f"http://127.0.0.1:{free_port()}", config_kwargs={"retries": {"max_attempts": 1}})
    client.app.dependency_overrides[plugin.current_access] = lambda: access_of(s3_jobs, conn_id="team_s3")
    listing = client.get("/api/jobs", params={"root": s3_jobs.other_root})
    assert listing.status_code == 200 and job_ids(listing.json()) == ["pipe/run_x/train"]
    assert client.get("/api/jobs").status_code == 502  # the configured root, through aws_default
