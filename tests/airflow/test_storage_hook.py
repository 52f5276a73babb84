"""The storage hook against a real S3 endpoint (moto's server, reached through the Airflow connection
``aws_default`` as in the deployment, or through boto3's environment as in a pod) and the local disk:
staging (nothing downloaded the second time), publishing (``_FINISHED`` last), restoring a retried job,
listing, reading and writing files, and a job's heartbeat and stop requests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mask2former.data.archives import COMPLETE_MARKER
from mask2former.data.sources import plan_data_sources
from mask2former.data.staging import SourceNotFoundError
from operators.hooks import storage
from operators.hooks.object_store import JobStore
from operators.hooks.storage import (DIGEST_METADATA, FINISHED_MARKER, Mask2FormerStorageHook, StorageNotFound,
                                     StorageUnavailable)
from s3_server import (MotoS3Server, count_calls, free_port, moto_endpoint, moto_server, new_bucket,  # noqa: F401
                       s3_client, s3_env)
from test_staging import dataset_objects, tar_gz, upload

SECRET = "storage-hook-secret-Zq3"


@pytest.fixture
def aws_conn(moto_endpoint, monkeypatch):  # noqa: F811
    """``aws_default`` pointing at the moto server; boto3's own environment leads nowhere."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": "AKIAHOOKTEST", "password": SECRET,
        "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}}))
    return moto_endpoint


@pytest.fixture
def hook(aws_conn) -> Mask2FormerStorageHook:
    return Mask2FormerStorageHook(aws_conn_id="aws_default")


@pytest.fixture
def dataset(aws_conn, hook):
    """(bucket, objects, planned train overrides) on moto; planned with the hook's exists()."""
    bucket = new_bucket(aws_conn)
    objects = dataset_objects()
    upload(aws_conn, bucket, objects)
    plan = plan_data_sources("train", f"s3://{bucket}/train", f"s3://{bucket}/val", "coco_panoptic", exists=hook.exists)
    return bucket, objects, plan


# ------------------------------------------------------------------------------------------ staging


def test_stage_through_the_connection_then_nothing_the_second_time(dataset, hook, tmp_path, moto_server):  # noqa: F811
    bucket, objects, plan = dataset
    assert "dataset.train.instance_json" not in plan  # planning asked S3: there is no annotations.json
    calls = count_calls(hook.get_conn())
    lines = []
    first = hook.stage(plan, tmp_path / "cache", log=lines.append)
    local = first.local_overrides
    assert local.keys() == plan.keys() and local["dataset.train.type"] == "coco_panoptic"
    images = Path(local["dataset.train.img_dir"])
    assert sorted(p.name for p in images.glob("*.jpg")) == ["img_0.jpg", "img_1.jpg", "img_2.jpg"]
    assert local["dataset.test.img_dir"] == local["dataset.val.img_dir"]  # one URI, staged once
    assert Path(local["dataset.label_map"]).read_bytes() == objects["train/label_map_panoptic.json"]
    assert (first.downloaded_files, first.extracted_archives, first.cache_hits) == (7, 4, 0)
    assert first.downloaded_bytes == sum(len(body) for body in objects.values())
    assert calls["GetObject"] == 7 and any("downloaded" in line for line in lines)

    gets = len(moto_server.object_gets(bucket))
    second = hook.stage(plan, tmp_path / "cache", log=lines.append)
    assert second.local_overrides == first.local_overrides
    assert (second.downloaded_bytes, second.downloaded_files, second.extracted_archives, second.cache_hits) == \
        (0, 0, 0, 7)
    assert len(moto_server.object_gets(bucket)) == gets  # server side: no object was read again


def test_a_pod_stages_with_its_own_environment(s3_env, tmp_path):  # noqa: F811
    bucket = new_bucket(s3_env)
    upload(s3_env, bucket, {"train/images.tar.gz": tar_gz({"a.jpg": b"jpeg"})})
    staged = JobStore().stage(
        {"dataset.train.img_dir": f"s3://{bucket}/train/images.tar.gz", "train.num_epochs": 3}, tmp_path, log=print)
    assert (Path(staged.local_overrides["dataset.train.img_dir"]) / "a.jpg").read_bytes() == b"jpeg"
    assert staged.local_overrides["train.num_epochs"] == 3


def test_a_job_process_publishes_beats_and_stops_on_s3_without_airflow(s3_env, tmp_path):  # noqa: F811
    """The job process's store (boto3's environment, no Airflow import) does what the hook does on S3."""
    job_uri = f"s3://{new_bucket(s3_env)}/results/job"
    store = JobStore()
    folder = tmp_path / "job"
    (folder / "sub").mkdir(parents=True)
    (folder / "metrics.json").write_text('{"mIoU": 1.0}')
    (folder / "sub" / "model.pth").write_bytes(os.urandom(70_000))
    published = store.publish(folder, job_uri)
    assert published.uploaded_files == 2 and store.is_finished(job_uri)
    assert store.publish(folder, job_uri).skipped_files == 2  # unchanged files are not uploaded again
    assert store.read_bytes(f"{job_uri}/sub/model.pth") == (folder / "sub" / "model.pth").read_bytes()
    assert sorted(f.path for f in store.list_files(job_uri)) == [FINISHED_MARKER, "metrics.json", "sub/model.pth"]
    store.beat(job_uri, host="pod", pid=1)
    assert store.last_beat(job_uri)["host"] == "pod" and store.stop_requested(job_uri) is None
    Mask2FormerStorageHook(aws_conn_id=None).request_stop(job_uri, "asked")
    assert store.stop_requested(job_uri) == "asked"
    store.clear_job_controls(job_uri)
    assert store.stop_requested(job_uri) is None and not store.exists(f"{job_uri}/_STOP")
    imported = subprocess.run([sys.executable, "-c", "import sys, operators.pod_job; print('airflow' in sys.modules)"],
                              capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    assert imported.stdout.strip() == "False"


def test_concurrent_stagings_share_one_cache(dataset, hook, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    _, _, plan = dataset
    with ThreadPoolExecutor(max_workers=3) as pool:
        staged = list(pool.map(lambda _: hook.stage(plan, tmp_path, log=lambda _: None, max_workers=2), range(3)))
    assert staged[0].local_overrides == staged[1].local_overrides == staged[2].local_overrides
    assert not [p for p in tmp_path.rglob(".*") if ".part-" in p.name]


def test_a_missing_object_names_the_uri_and_the_keys(aws_conn, hook, tmp_path):
    uri = f"s3://{new_bucket(aws_conn)}/train/images.tar.gz"
    with pytest.raises(SourceNotFoundError, match=rf"{uri} does not exist.*dataset.train.img_dir") as caught:
        hook.stage({"dataset.train.img_dir": uri}, tmp_path, log=lambda _: None)
    assert SECRET not in str(caught.value)


def test_a_half_extracted_folder_is_never_reused(dataset, hook, tmp_path):
    _, _, plan = dataset
    sources = {"dataset.train.img_dir": plan["dataset.train.img_dir"]}
    folder = Path(hook.stage(sources, tmp_path, log=lambda _: None).local_overrides["dataset.train.img_dir"])
    (folder / COMPLETE_MARKER).unlink()  # as if a crash had happened before the marker
    (folder / "junk.bin").write_bytes(b"partial")
    again = hook.stage(sources, tmp_path, log=lambda _: None)
    assert (again.downloaded_bytes, again.extracted_archives) == (0, 1)
    assert not (folder / "junk.bin").exists() and (folder / COMPLETE_MARKER).is_file()


def test_local_sources_are_used_in_place_and_archives_extracted_once(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "images.tar.gz").write_bytes(tar_gz({"a.jpg": b"1"}))
    (root / "annotations.json").write_text("{}")
    overrides = {"dataset.train.img_dir": f"file://{root}/images.tar.gz",
                 "dataset.train.instance_json": f"file://{root}/annotations.json",
                 "dataset.val.img_dir": str(root / "images.tar.gz"), "dataset.train.batch_size": 2}
    hook = Mask2FormerStorageHook(aws_conn_id=None)
    first = hook.stage(overrides, tmp_path / "cache", log=lambda _: None)
    local = first.local_overrides
    assert (Path(local["dataset.train.img_dir"]) / "a.jpg").read_bytes() == b"1"
    assert local["dataset.train.instance_json"] == str(root / "annotations.json")  # not copied
    assert local["dataset.val.img_dir"] == str(root / "images.tar.gz")  # plain paths pass through
    assert (first.extracted_archives, first.used_in_place) == (1, 1)
    assert hook.stage(overrides, tmp_path / "cache", log=lambda _: None).cache_hits == 1
    with pytest.raises(SourceNotFoundError, match="file:///nowhere/x.json does not exist"):
        hook.stage({"dataset.label_map": "file:///nowhere/x.json"}, tmp_path / "cache", log=lambda _: None)
    with pytest.raises(ValueError, match="override dataset.label_map: unsupported URI scheme 'gs'"):
        hook.stage({"dataset.label_map": "gs://b/x.json"}, tmp_path, log=lambda _: None)


# --------------------------------------------------------------------------------------- publishing


def job_folder(root: Path, checkpoint_bytes: int = 9 * 1024 * 1024) -> Path:
    root.mkdir(parents=True)
    (root / "status.json").write_text('{"status": "SUCCESS"}\n')
    (root / "metrics.json").write_text('{"mIoU": 0.5}')
    (root / "model_epoch_001_step_000002.pth").write_bytes(b"ckpt")
    (root / "best_model.json").write_text('{"checkpoint": "model_epoch_001_step_000002.pth"}')
    (root / "sub").mkdir()
    (root / "sub" / "model_latest.pth").write_bytes(os.urandom(checkpoint_bytes))  # a multipart upload
    return root


def test_publish_to_s3_writes_the_marker_last_and_skips_what_is_unchanged(aws_conn, tmp_path, monkeypatch):
    """Unchanged files are found by the SHA-256 each object carries, whatever its ETag: here the checkpoint's
    ETag is a multipart one (5 MiB parts), and the part size changes between publishes."""
    part = 5 * 1024 * 1024  # S3's smallest part
    monkeypatch.setattr(storage, "TRANSFER_CHUNK_BYTES", part)  # the hook's multipart threshold and part size
    hook = Mask2FormerStorageHook(aws_conn_id="aws_default")
    bucket = new_bucket(aws_conn)
    local = job_folder(tmp_path / "job", checkpoint_bytes=part + 1024 * 1024)
    dest = f"s3://{bucket}/results/job-1"
    calls = count_calls(hook.get_conn())
    assert not hook.is_finished(dest)
    first = hook.publish(local, dest)
    assert (first.uploaded_files, first.skipped_files) == (5, 0) and first.marker == f"{dest}/{FINISHED_MARKER}"
    writes = [(op, key) for op, key in calls.order if op in ("PutObject", "CompleteMultipartUpload")]
    assert writes[-1] == ("PutObject", f"results/job-1/{FINISHED_MARKER}") and len(writes) == 6
    assert ("CompleteMultipartUpload", "results/job-1/sub/model_latest.pth") in writes
    client = s3_client(aws_conn)
    head = client.head_object(Bucket=bucket, Key="results/job-1/sub/model_latest.pth")
    assert head["ETag"].strip('"').endswith("-2")  # not an MD5 of the file
    assert head["Metadata"][DIGEST_METADATA] == hashlib.sha256((local / "sub" / "model_latest.pth").read_bytes()
                                                               ).hexdigest()
    assert hook.is_finished(dest)

    monkeypatch.setattr(storage, "TRANSFER_CHUNK_BYTES", 4 * part)  # as another release of the hook would
    hook = Mask2FormerStorageHook(aws_conn_id="aws_default")
    calls = count_calls(hook.get_conn())
    (local / "metrics.json").write_text('{"mIoU": 0.6}')
    (local / "model_epoch_001_step_000002.pth").write_bytes(b"CKPT")  # changed, same size
    second = hook.publish(local, dest)
    assert (second.uploaded_files, second.skipped_files) == (2, 3)  # the multipart checkpoint is unchanged
    uploads = {key for op, key in calls.order if op in ("PutObject", "CreateMultipartUpload")}
    assert uploads == {f"results/job-1/{name}" for name in ("metrics.json", "model_epoch_001_step_000002.pth",
                                                             FINISHED_MARKER)}
    deleted = calls.order.index(("DeleteObject", f"results/job-1/{FINISHED_MARKER}"))
    uploaded = calls.order.index(("PutObject", "results/job-1/metrics.json"))
    assert deleted < uploaded and calls.order[-1] == ("PutObject", f"results/job-1/{FINISHED_MARKER}")
    assert hook.read_json(f"{dest}/metrics.json") == {"mIoU": 0.6}
    assert hook.read_bytes(f"{dest}/model_epoch_001_step_000002.pth") == b"CKPT"

    # an object replaced by someone else (same size, no digest of ours) is uploaded again
    client.put_object(Bucket=bucket, Key="results/job-1/status.json", Body=b'{"status": "FAILURE"}\n')
    third = hook.publish(local, dest)
    assert (third.uploaded_files, third.skipped_files) == (1, 4)
    assert hook.read_json(f"{dest}/status.json") == {"status": "SUCCESS"}


def test_publish_to_a_local_root_replaces_the_folder_whole(tmp_path):
    hook = Mask2FormerStorageHook(aws_conn_id=None)
    local = job_folder(tmp_path / "job")
    dest = tmp_path / "published" / "job-1"
    assert hook.publish(local, f"file://{dest}").uploaded_files == 5
    assert json.loads((dest / FINISHED_MARKER).read_text())["files"] == 5 and hook.is_finished(str(dest))
    (local / "metrics.json").unlink()
    (dest / "stale.txt").write_text("from an older copy")
    hook.publish(local, str(dest))
    assert not (dest / "metrics.json").exists() and not (dest / "stale.txt").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["job-1"]  # no temporary folders left
    assert hook.publish(local, str(local)).uploaded_files == 0 and (local / FINISHED_MARKER).is_file()
    with pytest.raises(ValueError, match="one folder contains the other"):
        hook.publish(local, str(local / "copy"))


def test_restore_brings_back_an_earlier_attempts_checkpoints(aws_conn, hook, tmp_path):
    bucket = new_bucket(aws_conn)
    dest = f"s3://{bucket}/results/job"
    hook.publish(job_folder(tmp_path / "first"), dest)
    fresh = tmp_path / "second"
    lines = []
    assert hook.restore(dest, fresh, lines.append) == 3
    assert sorted(p.name for p in fresh.iterdir()) == ["best_model.json", "model_epoch_001_step_000002.pth",
                                                       "status.json"]
    assert "restored 3 file(s)" in lines[0]
    assert hook.restore(dest, fresh, lines.append) == 0  # a folder with checkpoints is left alone


# ---------------------------------------------------------------------------------- listing, reading


def test_list_read_and_write_on_s3_and_on_disk(aws_conn, hook, tmp_path):
    for root in (f"s3://{new_bucket(aws_conn)}/results", str(tmp_path / "results")):
        hook.write_json(f"{root}/d/r1/train/status.json", {"status": "STARTED"})
        hook.write_bytes(f"{root}/d/r1/train/nested/x.txt", b"0123456789")
        hook.write_bytes(f"{root}/d/r2/export/status.json", b'{"status": "RUNNING"}\n{"status": "SUC')
        assert hook.list_folders(f"{root}/d") == ["r1", "r2"]
        assert sorted(f.path for f in hook.list_files(root, depth=4)) == ["d/r1/train/status.json",
                                                                          "d/r2/export/status.json"]
        assert sorted(f.path for f in hook.list_files(f"{root}/d/r1")) == ["train/nested/x.txt", "train/status.json"]
        assert hook.read_bytes(f"{root}/d/r1/train/nested/x.txt", 4) == b"456789"
        assert hook.read_bytes(f"{root}/d/r1/train/nested/x.txt", 10) == b""
        assert hook.read_bytes(f"{root}/d/none.txt") is None and not hook.exists(f"{root}/d/none.txt")
        assert b"".join(hook.open(f"{root}/d/r1/train/nested/x.txt").chunks) == b"0123456789"
        lines, offset = hook.read_status(f"{root}/d/r2/export")
        assert lines == [{"status": "RUNNING"}] and offset == len('{"status": "RUNNING"}\n')  # a torn line waits
        hook.delete([f"{root}/d/r1/train/nested/x.txt"])
        assert not hook.exists(f"{root}/d/r1/train/nested/x.txt")


def test_a_local_file_behind_a_link_leaving_the_root_is_never_read(tmp_path):
    (tmp_path / "secret.txt").write_text("outside")
    root = tmp_path / "results"
    (root / "d/r/t").mkdir(parents=True)
    os.symlink(tmp_path / "secret.txt", root / "d/r/t/leak.txt")
    hook = Mask2FormerStorageHook(aws_conn_id=None)
    assert hook.open(str(root / "d/r/t/leak.txt"), inside=str(root)) is None
    assert not hook.exists(str(root / "d/r/t/leak.txt"), inside=str(root))
    assert [f.path for f in hook.list_files(str(root))] == []


def test_jobs_heartbeat_and_stop_requests_travel_through_storage(aws_conn, hook, tmp_path):
    for job in (f"s3://{new_bucket(aws_conn)}/results/d/r/t", str(tmp_path / "d/r/t")):
        assert hook.last_beat(job) is None and hook.stop_requested(job) is None
        hook.beat(job, host="worker-1", pid=42)
        assert hook.last_beat(job)["host"] == "worker-1"
        hook.request_stop(job, "the Airflow task was stopped by a user")
        assert hook.stop_requested(job) == "the Airflow task was stopped by a user"
        hook.clear_job_controls(job)
        assert hook.last_beat(job) is None and hook.stop_requested(job) is None


def test_errors_name_the_location_and_never_the_credentials(aws_conn, monkeypatch):
    missing = "s3://no-such-bucket-hook/results"
    with pytest.raises(StorageNotFound, match="no-such-bucket-hook.*the bucket does not exist") as caught:
        list(Mask2FormerStorageHook().list_files(missing))
    assert SECRET not in str(caught.value)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": "AKIAHOOKTEST", "password": SECRET,
        "extra": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "config_kwargs": {"retries": {"max_attempts": 1}}}}))
    with pytest.raises(StorageUnavailable, match="the S3 endpoint could not be reached") as caught:
        Mask2FormerStorageHook().read_bytes("s3://bucket/results/status.json")
    assert SECRET not in str(caught.value)


def test_a_job_process_gets_the_connections_s3_settings_in_its_environment(hook, aws_conn):
    env = hook.job_environment()
    assert env == {"AWS_ACCESS_KEY_ID": "AKIAHOOKTEST", "AWS_SECRET_ACCESS_KEY": SECRET,
                   "AWS_ENDPOINT_URL_S3": aws_conn, "AWS_DEFAULT_REGION": "us-east-1"}
    assert Mask2FormerStorageHook(aws_conn_id=None).job_environment() == {}
