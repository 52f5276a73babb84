"""The engine's cache of sources against a real moto S3 server, and safe archive extraction.

Staging a whole job and publishing job folders are the Airflow side's storage hook: tests/airflow/test_storage_hook.py.
"""

from __future__ import annotations

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
from mask2former.data.staging import SourceNotFoundError, cache_source, fetch_uri

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


# ---------------------------------------------------------------------------------- the source cache


def test_an_s3_archive_is_downloaded_and_extracted_once_per_etag(s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    bucket = new_bucket(s3_env)
    upload(s3_env, bucket, {"train/images.tar.gz": tar_gz({"a.jpg": b"jpeg"})})
    client = s3_client(s3_env)
    calls = count_calls(client)
    uri = f"s3://{bucket}/train/images.tar.gz"
    first = cache_source(uri, cache=tmp_path, client=client, extract=True, report=lambda _: None)
    assert (first.local_path / "a.jpg").read_bytes() == b"jpeg" and first.downloaded and first.extracted
    again = cache_source(uri, cache=tmp_path, client=client, extract=True, report=lambda _: None)
    assert again.local_path == first.local_path and again.from_cache and calls["GetObject"] == 1
    upload(s3_env, bucket, {"train/images.tar.gz": tar_gz({"b.jpg": b"new"})})
    changed = cache_source(uri, cache=tmp_path, client=client, extract=True, report=lambda _: None)
    assert changed.local_path != first.local_path and (changed.local_path / "b.jpg").read_bytes() == b"new"


def test_hostile_archive_on_s3_is_refused(s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    bucket = new_bucket(s3_env)
    archive = hostile_tar(tmp_path / "evil.tar.gz", member("../../escape.txt"))
    upload(s3_env, bucket, {"images.tar.gz": archive.read_bytes()})
    with pytest.raises(UnsafeArchiveError, match=rf"s3://{bucket}/images.tar.gz: .*'../../escape.txt'"):
        cache_source(f"s3://{bucket}/images.tar.gz", cache=tmp_path / "cache", client=s3_client(s3_env), extract=True,
                     report=lambda _: None)
    assert not list((tmp_path / "cache").rglob("first.txt"))  # the benign member was not left behind
    assert not (tmp_path / "escape.txt").exists()


def test_fetch_uri(s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    bucket = new_bucket(s3_env)
    big = os.urandom(9 * 1024 * 1024)  # multipart: its ETag is an MD5 of MD5s, fetched by ranged requests
    upload(s3_env, bucket, {"jobs/1/model.pth": b"weights", "jobs/1/pack.tar.gz": tar_gz({"a": b"1"}),
                            "jobs/1/big.pth": big})
    factory, calls = counted_factory(s3_env)
    path = fetch_uri(f"s3://{bucket}/jobs/1/model.pth", tmp_path, s3_client_factory=factory)
    assert path.read_bytes() == b"weights" and path.name == "model.pth"
    assert fetch_uri(f"s3://{bucket}/jobs/1/model.pth", tmp_path, s3_client_factory=factory) == path
    assert calls["GetObject"] == 1
    assert fetch_uri(f"s3://{bucket}/jobs/1/pack.tar.gz", tmp_path, s3_client_factory=factory).is_file()
    assert fetch_uri(f"s3://{bucket}/jobs/1/big.pth", tmp_path).read_bytes() == big  # default client: AWS_ENDPOINT_URL
    assert fetch_uri(str(path), tmp_path) == path
    with pytest.raises(SourceNotFoundError, match=f"s3://{bucket}/jobs/1/none.pth"):
        fetch_uri(f"s3://{bucket}/jobs/1/none.pth", tmp_path, s3_client_factory=factory)
