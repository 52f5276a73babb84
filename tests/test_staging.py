"""Staging against a real moto S3 server, safe archive extraction, and publishing results folders."""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from s3_server import (  # noqa: F401
    MotoS3Server,
    count_calls,
    moto_endpoint,
    moto_server,
    new_bucket,
    s3_client,
    s3_env,
)

from mask2former.data.archives import COMPLETE_MARKER, UnsafeArchiveError, safe_extract
from mask2former.data.sources import plan_data_sources
from mask2former.data.staging import (
    FINISHED_MARKER,
    SourceNotFoundError,
    airflow_s3_client_factory,
    fetch_uri,
    is_finished,
    stage_sources,
    sync_results,
    upload_dir,
)

# ------------------------------------------------------------------------------------------ helpers


def tar_gz(members: dict[str, bytes]) -> bytes:
    """A .tar.gz holding regular files ``name -> content``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def hostile_tar(path: Path, special: tarfile.TarInfo) -> Path:
    """A benign file first (so extraction has started), then the hostile member."""
    with tarfile.open(path, mode="w:gz") as tar:
        benign = tarfile.TarInfo("ok/first.txt")
        benign.size = 2
        tar.addfile(benign, io.BytesIO(b"ok"))
        tar.addfile(special, io.BytesIO(b"evil") if special.isreg() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


def dataset_objects() -> dict[str, bytes]:
    """A tiny coco_panoptic train root and eval root."""
    objects = {}
    for split, count in (("train", 3), ("val", 2)):
        objects[f"{split}/images.tar.gz"] = tar_gz({f"img_{i}.jpg": os.urandom(2000) for i in range(count)})
        objects[f"{split}/images_panoptic.tar.gz"] = tar_gz({f"img_{i}.png": os.urandom(500) for i in range(count)})
        objects[f"{split}/annotations_panoptic.json"] = json.dumps({"split": split}).encode()
    objects["train/label_map_panoptic.json"] = b'[{"id": 1, "name": "a", "color": [1, 2, 3], "isthing": 1}]'
    return objects


def upload(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    client = s3_client(endpoint)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def counted_factory(endpoint: str) -> tuple[Callable[[], Any], Any]:
    client = s3_client(endpoint)
    return (lambda: client), count_calls(client)


@pytest.fixture
def dataset(s3_env: str) -> tuple[str, dict[str, bytes], dict[str, str]]:  # noqa: F811
    """(bucket, objects, planned overrides) for a train job staged from moto."""
    bucket = new_bucket(s3_env)
    objects = dataset_objects()
    upload(s3_env, bucket, objects)
    plan = plan_data_sources("train", f"s3://{bucket}/train", f"s3://{bucket}/val", "coco_panoptic")
    return bucket, objects, plan


# ---------------------------------------------------------------------------------- safe extraction


HOSTILE = {
    "absolute path": (member("/tmp/evil.txt"), "absolute path"),
    "dotdot": (member("ok/../../x"), "'..'"),
    "symlink to /etc": (member("etc", tarfile.SYMTYPE, "/etc"), "symlink to absolute path '/etc'"),
    "symlink leaving": (member("up", tarfile.SYMTYPE, "../.."), "leaves the destination"),
    "hardlink outside": (member("pw", tarfile.LNKTYPE, "../../etc/passwd"), "hardlink"),
    "hardlink absolute": (member("pw", tarfile.LNKTYPE, "/etc/passwd"), "hardlink"),
    "char device": (member("dev/null", tarfile.CHRTYPE), "device"),
    "block device": (member("dev/sda", tarfile.BLKTYPE), "device"),
    "fifo": (member("pipe", tarfile.FIFOTYPE), "FIFO"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_is_refused_by_name_and_nothing_is_left(tmp_path: Path, case: str) -> None:
    special, reason = HOSTILE[case]
    archive = hostile_tar(tmp_path / "evil.tar.gz", special)
    dest = tmp_path / "out" / "images"
    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(archive, dest)
    assert caught.value.member == special.name
    assert repr(special.name) in str(caught.value) and reason in str(caught.value)
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no partial folder either


def test_symlink_chain_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    # "a" -> "." is harmless alone, but "a/b" -> ".." then resolves to the folder's parent.
    archive = tmp_path / "chain.tar"
    with tarfile.open(archive, mode="w") as tar:
        tar.addfile(member("a", tarfile.SYMTYPE, "."))
        tar.addfile(member("a/b", tarfile.SYMTYPE, ".."))
    with pytest.raises(UnsafeArchiveError, match="'a/b'"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_links_inside_the_folder_are_extracted(tmp_path: Path) -> None:
    archive = tmp_path / "fine.tar.gz"
    with tarfile.open(archive, mode="w:gz") as tar:
        data = member("data/a.txt")
        tar.addfile(data, io.BytesIO(b"abcd"))
        tar.addfile(member("alias.txt", tarfile.SYMTYPE, "data/a.txt"))
        tar.addfile(member("hard.txt", tarfile.LNKTYPE, "data/a.txt"))
    dest = safe_extract(archive, tmp_path / "out")
    assert dest == tmp_path / "out"
    assert (dest / "alias.txt").read_bytes() == b"abcd" and (dest / "alias.txt").is_symlink()
    assert (dest / "hard.txt").read_bytes() == b"abcd"
    assert (dest / COMPLETE_MARKER).is_file()


def test_safe_extract_runs_once_and_refuses_unfinished_folders(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({"x.txt": b"1"}))
    dest = safe_extract(archive, tmp_path / "out")
    (dest / "x.txt").write_text("changed")
    assert safe_extract(archive, dest) == dest
    assert (dest / "x.txt").read_text() == "changed"  # reused, not extracted again
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    with pytest.raises(FileExistsError, match=f"{COMPLETE_MARKER}"):
        safe_extract(archive, unfinished)


def test_not_a_tar_archive_is_named(tmp_path: Path) -> None:
    bogus = tmp_path / "images.tar.gz"
    bogus.write_bytes(b"definitely not gzip")
    with pytest.raises(tarfile.ReadError, match="images.tar.gz"):
        safe_extract(bogus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ staging from S3


def test_stage_through_boto3_then_from_cache(
    dataset: tuple[str, dict[str, bytes], dict[str, str]], tmp_path: Path, moto_server: MotoS3Server  # noqa: F811
) -> None:
    bucket, objects, plan = dataset
    factory, calls = counted_factory(moto_server.endpoint_url)
    lines: list[str] = []
    first = stage_sources(plan, tmp_path / "cache", s3_client_factory=factory, progress=lines.append)

    local = first.local_overrides
    assert local.keys() == plan.keys() and local["dataset.train.type"] == "coco_panoptic"
    train_images = Path(local["dataset.train.img_dir"])
    assert train_images.is_dir() and sorted(p.name for p in train_images.glob("*.jpg")) == [
        "img_0.jpg", "img_1.jpg", "img_2.jpg"]
    assert Path(local["dataset.val.panoptic_dir"]).is_dir()
    assert local["dataset.test.img_dir"] == local["dataset.val.img_dir"]
    assert json.loads(Path(local["dataset.val.panoptic_json"]).read_text()) == {"split": "val"}
    assert Path(local["dataset.label_map"]).read_bytes() == objects["train/label_map_panoptic.json"]
    assert str(tmp_path / "cache") in local["dataset.train.img_dir"]
    assert first.downloaded_files == len(objects) == 7
    assert first.downloaded_bytes == sum(len(body) for body in objects.values())
    assert first.extracted_archives == 4 and first.cache_hits == 0
    assert calls["GetObject"] == 7 and any("downloaded" in line for line in lines)

    gets_before = len(moto_server.object_gets(bucket))
    calls.clear()
    second = stage_sources(plan, tmp_path / "cache", s3_client_factory=factory)
    assert second.local_overrides == first.local_overrides
    assert second.downloaded_bytes == 0 and second.downloaded_files == 0 and second.extracted_archives == 0
    assert second.cache_hits == 7
    assert calls["GetObject"] == 0 and calls["HeadObject"] == 7  # client side
    assert len(moto_server.object_gets(bucket)) == gets_before  # server side: no object was read


def test_default_factory_uses_aws_endpoint_url(
    dataset: tuple[str, dict[str, bytes], dict[str, str]], tmp_path: Path  # noqa: F811
) -> None:
    bucket, objects, plan = dataset
    result = stage_sources({"dataset.label_map": plan["dataset.label_map"], "train.num_epochs": 3}, tmp_path)
    assert result.local_overrides["train.num_epochs"] == 3
    assert Path(result.local_overrides["dataset.label_map"]).read_bytes() == objects["train/label_map_panoptic.json"]


def test_stage_through_airflow_s3_hook(
    moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    bucket = new_bucket(moto_endpoint)
    upload(moto_endpoint, bucket, {"train/images.tar.gz": tar_gz({"a.jpg": b"jpeg"}), "train/annotations.json": b"{}"})
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    connection = {"conn_type": "aws", "login": "testing", "password": "testing",
                  "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # the endpoint and keys must come from the connection
    plan = {"dataset.train.img_dir": f"s3://{bucket}/train/images.tar.gz",
            "dataset.train.instance_json": f"s3://{bucket}/train/annotations.json"}
    factory = functools.partial(airflow_s3_client_factory, "aws_default")
    result = stage_sources(plan, tmp_path / "cache", s3_client_factory=factory)
    assert (Path(result.local_overrides["dataset.train.img_dir"]) / "a.jpg").read_bytes() == b"jpeg"
    assert result.downloaded_files == 2
    assert stage_sources(plan, tmp_path / "cache", s3_client_factory=factory).downloaded_bytes == 0


def test_changed_object_is_downloaded_again(
    dataset: tuple[str, dict[str, bytes], dict[str, str]], tmp_path: Path, moto_server: MotoS3Server  # noqa: F811
) -> None:
    bucket, _, plan = dataset
    sources = {"dataset.train.img_dir": plan["dataset.train.img_dir"]}
    first = stage_sources(sources, tmp_path, s3_client_factory=lambda: s3_client(moto_server.endpoint_url))
    new_archive = tar_gz({"new.jpg": b"fresh"})
    upload(moto_server.endpoint_url, bucket, {"train/images.tar.gz": new_archive})
    second = stage_sources(sources, tmp_path, s3_client_factory=lambda: s3_client(moto_server.endpoint_url))
    assert second.downloaded_bytes == len(new_archive) and second.cache_hits == 0
    folder = Path(second.local_overrides["dataset.train.img_dir"])
    assert folder != Path(first.local_overrides["dataset.train.img_dir"])
    assert sorted(p.name for p in folder.iterdir() if p.name != COMPLETE_MARKER) == ["new.jpg"]


def test_concurrent_stagings_share_one_cache(
    dataset: tuple[str, dict[str, bytes], dict[str, str]], tmp_path: Path  # noqa: F811
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    _, _, plan = dataset
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: stage_sources(plan, tmp_path, max_workers=2), range(3)))
    assert results[0].local_overrides == results[1].local_overrides == results[2].local_overrides
    folder = Path(results[0].local_overrides["dataset.train.img_dir"])
    assert sorted(p.name for p in folder.glob("*.jpg")) == ["img_0.jpg", "img_1.jpg", "img_2.jpg"]
    leftovers = [p for p in tmp_path.rglob(".*") if ".part-" in p.name or ".partial-" in p.name]
    assert leftovers == []


def test_missing_object_names_the_uri_and_the_keys(s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    bucket = new_bucket(s3_env)
    uri = f"s3://{bucket}/train/images.tar.gz"
    with pytest.raises(SourceNotFoundError, match=rf"{uri} does not exist.*dataset.train.img_dir") as caught:
        stage_sources({"dataset.train.img_dir": uri}, tmp_path)
    assert "testing" not in str(caught.value)  # no credentials in messages
    assert not any(tmp_path.rglob("*.tar.gz"))


def test_half_extracted_folder_is_never_reused(
    dataset: tuple[str, dict[str, bytes], dict[str, str]], tmp_path: Path  # noqa: F811
) -> None:
    _, _, plan = dataset
    sources = {"dataset.train.img_dir": plan["dataset.train.img_dir"]}
    folder = Path(stage_sources(sources, tmp_path).local_overrides["dataset.train.img_dir"])
    (folder / COMPLETE_MARKER).unlink()  # as if a crash had happened before the marker
    (folder / "junk.bin").write_bytes(b"partial")
    again = stage_sources(sources, tmp_path)
    assert again.downloaded_bytes == 0 and again.extracted_archives == 1 and again.cache_hits == 0
    assert not (folder / "junk.bin").exists() and (folder / COMPLETE_MARKER).is_file()


def test_local_sources(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "images.tar.gz").write_bytes(tar_gz({"a.jpg": b"1"}))
    (root / "annotations.json").write_text("{}")
    overrides = {
        "dataset.train.img_dir": f"file://{root}/images.tar.gz",
        "dataset.train.instance_json": f"file://{root}/annotations.json",
        "dataset.val.img_dir": str(root / "images.tar.gz"),  # plain paths are used in place
        "dataset.train.batch_size": 2,
    }
    first = stage_sources(overrides, tmp_path / "cache")
    local = first.local_overrides
    assert (Path(local["dataset.train.img_dir"]) / "a.jpg").read_bytes() == b"1"
    assert str(tmp_path / "cache") in local["dataset.train.img_dir"]
    assert local["dataset.train.instance_json"] == str(root / "annotations.json")  # not copied
    assert local["dataset.val.img_dir"] == str(root / "images.tar.gz") and local["dataset.train.batch_size"] == 2
    assert (first.extracted_archives, first.used_in_place, first.downloaded_files) == (1, 1, 0)
    second = stage_sources(overrides, tmp_path / "cache")
    assert (second.cache_hits, second.extracted_archives) == (1, 0)
    with pytest.raises(SourceNotFoundError, match="file:///nowhere/x.json does not exist"):
        stage_sources({"dataset.label_map": "file:///nowhere/x.json"}, tmp_path / "cache")


def test_bad_values_are_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="override dataset.label_map: unsupported URI scheme 'gs'"):
        stage_sources({"dataset.label_map": "gs://b/x.json"}, tmp_path)
    with pytest.raises(ValueError, match="names a prefix, not an object"):
        stage_sources({"dataset.train.img_dir": "s3://b/images/"}, tmp_path, s3_client_factory=lambda: None)
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        stage_sources({}, tmp_path, max_workers=0)


def test_hostile_archive_on_s3_is_refused(s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    bucket = new_bucket(s3_env)
    archive = hostile_tar(tmp_path / "evil.tar.gz", member("../../escape.txt"))
    upload(s3_env, bucket, {"images.tar.gz": archive.read_bytes()})
    with pytest.raises(UnsafeArchiveError, match=rf"s3://{bucket}/images.tar.gz: .*'../../escape.txt'"):
        stage_sources({"dataset.train.img_dir": f"s3://{bucket}/images.tar.gz"}, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("first.txt"))  # the benign member was not left behind
    assert not (tmp_path / "escape.txt").exists()


def test_fetch_uri(s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    bucket = new_bucket(s3_env)
    upload(s3_env, bucket, {"jobs/1/model.pth": b"weights", "jobs/1/pack.tar.gz": tar_gz({"a": b"1"})})
    factory, calls = counted_factory(s3_env)
    path = fetch_uri(f"s3://{bucket}/jobs/1/model.pth", tmp_path, s3_client_factory=factory)
    assert path.read_bytes() == b"weights" and path.name == "model.pth"
    assert fetch_uri(f"s3://{bucket}/jobs/1/model.pth", tmp_path, s3_client_factory=factory) == path
    assert calls["GetObject"] == 1
    assert fetch_uri(f"s3://{bucket}/jobs/1/pack.tar.gz", tmp_path, s3_client_factory=factory).is_file()
    assert fetch_uri(str(path), tmp_path) == path
    with pytest.raises(SourceNotFoundError, match=f"s3://{bucket}/jobs/1/none.pth"):
        fetch_uri(f"s3://{bucket}/jobs/1/none.pth", tmp_path, s3_client_factory=factory)


# -------------------------------------------------------------------------------- publishing results


def results_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "status.json").write_text('{"status": "SUCCESS"}\n')
    (root / "metrics.json").write_text('{"mIoU": 0.5}')
    (root / "train").mkdir()
    (root / "train" / "model_latest.pth").write_bytes(os.urandom(9 * 1024 * 1024))  # multipart upload
    return root


def test_upload_dir_writes_the_marker_last_and_skips_unchanged(s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    bucket = new_bucket(s3_env)
    local = results_folder(tmp_path / "job")
    factory, calls = counted_factory(s3_env)
    dest = f"s3://{bucket}/results/job-1"
    assert not is_finished(dest, s3_client_factory=factory)

    first = upload_dir(local, dest, s3_client_factory=factory)
    assert (first.uploaded_files, first.skipped_files) == (3, 0)
    assert first.marker == f"s3://{bucket}/results/job-1/{FINISHED_MARKER}"
    writes = [(op, key) for op, key in calls.order if op in ("PutObject", "CompleteMultipartUpload")]
    assert writes[-1] == ("PutObject", f"results/job-1/{FINISHED_MARKER}")
    assert calls["CompleteMultipartUpload"] == 1 and len(writes) == 4
    assert calls.order[-1] == ("PutObject", f"results/job-1/{FINISHED_MARKER}")
    assert is_finished(dest, s3_client_factory=factory)
    keys = {item["Key"] for item in s3_client(s3_env).list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"results/job-1/{name}" for name in
                    ("status.json", "metrics.json", "train/model_latest.pth", FINISHED_MARKER)}

    (local / "metrics.json").write_text('{"mIoU": 0.6}')
    calls.clear()
    calls.order.clear()
    second = sync_results(local, dest, s3_client_factory=factory)
    assert (second.uploaded_files, second.skipped_files) == (1, 2)  # the 9 MB checkpoint is unchanged
    assert calls.order[0][0] == "ListObjectsV2"
    assert calls.order[1] == ("DeleteObject", f"results/job-1/{FINISHED_MARKER}")  # unfinished while updating
    assert calls.order[-1] == ("PutObject", f"results/job-1/{FINISHED_MARKER}")
    body = s3_client(s3_env).get_object(Bucket=bucket, Key="results/job-1/metrics.json")["Body"].read()
    assert json.loads(body) == {"mIoU": 0.6}
    # a multipart object comes back whole through ranged downloads (its ETag is an MD5 of MD5s)
    fetched = fetch_uri(f"{dest}/train/model_latest.pth", tmp_path / "cache", s3_client_factory=factory)
    assert fetched.read_bytes() == (local / "train" / "model_latest.pth").read_bytes()


def test_sync_results_to_a_local_root(tmp_path: Path) -> None:
    local = results_folder(tmp_path / "job")
    dest = tmp_path / "published" / "job-1"
    first = sync_results(local, f"file://{dest}")
    assert first.uploaded_files == 3 and (dest / FINISHED_MARKER).is_file()
    assert json.loads((dest / FINISHED_MARKER).read_text())["files"] == 3
    assert (dest / "train" / "model_latest.pth").read_bytes() == (local / "train" / "model_latest.pth").read_bytes()
    assert is_finished(str(dest)) and is_finished(f"file://{dest}")

    (local / "metrics.json").unlink()
    (dest / "stale.txt").write_text("from an older copy")
    sync_results(local, str(dest))
    assert not (dest / "metrics.json").exists() and not (dest / "stale.txt").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["job-1"]  # no temporary folders left

    in_place = sync_results(local, str(local))
    assert in_place.uploaded_files == 0 and (local / FINISHED_MARKER).is_file()
    with pytest.raises(ValueError, match="one folder contains the other"):
        sync_results(local, str(local / "copy"))
    with pytest.raises(FileNotFoundError, match="results folder"):
        sync_results(tmp_path / "absent", str(dest))
