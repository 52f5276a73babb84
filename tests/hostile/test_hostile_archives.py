"""Hostile archives, through both doors that extract them: the CLI (``dataset.train.img_dir`` naming an
archive, extracted next to itself) and the job's data staging (the storage hook's ``stage`` of a ``file://`` URI into
the job's cache). Each is refused naming the archive and the member; nothing is written outside the job folder,
and no half-extracted folder is left anywhere."""

from __future__ import annotations

import io
import tarfile
import time
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict

import pytest

from hostile_support import Outcome, Sandbox, assert_refused
from mask2former.data.archives import UnsafeArchiveError
from operators.hooks.storage import Mask2FormerStorageHook

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg"


def _tar(path: Path, members) -> Path:
    """A .tar.gz of (TarInfo, bytes or None) members."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


ESCAPE = f"/tmp/m2f-hostile-{uuid.uuid4().hex}.jpg"  # where the absolute-path member would land

CASES: Dict[str, tuple] = {
    "member with an absolute path": (
        lambda s: [(_info(ESCAPE), JPEG)], r"member '/tmp/m2f-hostile-.*': absolute path"),
    "member with '..'": (
        lambda s: [(_info("images/../../../outside/pwned.jpg"), JPEG)],
        r"member '.*\.\./outside/pwned.jpg': path contains '\.\.'"),
    "symlink leaving the folder": (
        lambda s: [(_info("escape", tarfile.SYMTYPE, "../../outside"), None), (_info("escape/pwned.jpg"), JPEG)],
        r"member 'escape': symlink to '\.\./\.\./outside' leaves the destination folder"),
    "symlink to an absolute path": (
        lambda s: [(_info("passwd.jpg", tarfile.SYMTYPE, "/etc/passwd"), None)],
        r"member 'passwd.jpg': symlink to absolute path '/etc/passwd'"),
    "hardlink to a file outside": (
        lambda s: [(_info("sentinel.jpg", tarfile.LNKTYPE, str(s.outside / "sentinel.txt")), None)],
        r"member 'sentinel.jpg': hardlink to '.*sentinel.txt' leaves the destination folder"),
    "character device": (
        lambda s: [(_info("null.jpg", tarfile.CHRTYPE), None)], r"member 'null.jpg': device file"),
    "block device": (
        lambda s: [(_info("disk.jpg", tarfile.BLKTYPE), None)], r"member 'disk.jpg': device file"),
    "FIFO": (
        lambda s: [(_info("pipe.jpg", tarfile.FIFOTYPE), None)], r"member 'pipe.jpg': FIFO"),
}


def _gzip_bomb(path: Path, gib: int = 1) -> Path:
    """A real .tar.gz bomb: one member of ``gib`` GiB of zeros (about 4.5 MB compressed, 229:1)."""
    info = _info("bomb.jpg")
    info.size = gib << 30
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip framing
    zero = bytes(1 << 20)
    with open(path, "wb") as out:
        out.write(packer.compress(info.tobuf(format=tarfile.GNU_FORMAT)))
        for _ in range(gib << 10):
            out.write(packer.compress(zero))
        out.write(packer.compress(bytes(1024)))  # end-of-archive blocks
        out.write(packer.flush())
    return path


def _through_cli(sandbox: Sandbox, archive: Path):
    spec = sandbox.train_spec()
    spec["dataset"]["train"]["img_dir"] = str(archive)
    return sandbox.run_cli("train", [], spec=spec)


def _through_staging(sandbox: Sandbox, archive: Path):
    """The job's staging of a file:// source into its cache; a refusal becomes the outcome's message."""
    cache = sandbox.job / "cache"
    started = time.monotonic()
    with sandbox.watched() as changes:
        try:
            Mask2FormerStorageHook().stage({"dataset.train.img_dir": f"file://{archive}"}, cache, log=lambda line: None)
            message = ""
        except UnsafeArchiveError as error:
            message = str(error)
    assert not [p for p in cache.rglob("*") if p.is_file()], "nothing extracted into the cache"
    return Outcome(code=None, message=message, output="", seconds=time.monotonic() - started,
                   changed_outside=changes)


DOORS: Dict[str, Callable] = {"train CLI": _through_cli, "staging": _through_staging}


@pytest.mark.parametrize("door", sorted(DOORS))
@pytest.mark.parametrize("case", list(CASES))
def test_an_unsafe_member_is_refused_naming_it(sandbox, case, door):
    build, pattern = CASES[case]
    archive = _tar(sandbox.data / "evil.tar.gz", build(sandbox))
    outcome = DOORS[door](sandbox, archive)
    assert_refused(outcome, f"{archive}: refusing to extract {pattern}", case=f"archive: {case}", door=door,
                   code=None if door == "staging" else 1)
    assert not Path(ESCAPE).exists()
    assert not (sandbox.data / "evil").exists() and not list(sandbox.data.glob(".evil.partial-*"))


@pytest.fixture(scope="module")
def gzip_bomb(tmp_path_factory) -> Path:
    return _gzip_bomb(tmp_path_factory.mktemp("bomb") / "images.tar.gz")


@pytest.mark.parametrize("door", sorted(DOORS))
def test_a_gzip_bomb_is_refused_before_it_is_written(sandbox, gzip_bomb, door):
    archive = sandbox.data / "bomb.tar.gz"
    archive.symlink_to(gzip_bomb)  # 4.5 MB that would write 1 GiB
    outcome = DOORS[door](sandbox, archive)
    assert_refused(outcome, rf"{archive}: refusing to extract member 'bomb.jpg': the archive would expand to more "
                            r"than \d+ bytes \(100 times its \d+ bytes plus 64 MiB\): a decompression bomb",
                   case="archive: gzip bomb (1 GiB of zeros in 4.5 MB)", door=door, max_seconds=60,
                   code=None if door == "staging" else 1)
    assert not (sandbox.data / "bomb").exists()


def test_a_zip_bomb_is_not_an_archive_the_engine_opens(sandbox):
    bomb = sandbox.data / "images.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("bomb.jpg", "w", force_zip64=True) as member:
            for _ in range(256):
                member.write(bytes(1 << 20))
    outcome = _through_cli(sandbox, bomb)
    assert_refused(outcome, rf"dataset.train.img_dir='{bomb}' is a file but not a tar archive",
                   case="archive: zip bomb (256 MiB of zeros in a .zip)", door="train CLI")
