"""Safe, atomic extraction of tar archives (``.tar``, ``.tar.gz``, ``.tgz``, ...).

Dataset images arrive as ``images.tar.gz`` / ``images_panoptic.tar.gz``. Extraction refuses members
that could write outside the destination or create special files, and never leaves a half-extracted
folder behind: members go into a temporary sibling folder, a completion marker is written last, and
the folder is renamed into place. A folder holding the marker is a finished extraction and is reused.

Extraction is bounded against decompression bombs: the bytes an archive may write (each member's size as
its header declares it, plus :data:`MEMBER_COST_BYTES` per member for its file-system entry) are at most
:data:`MAX_EXPANSION_RATIO` times the archive's own size plus :data:`EXPANSION_ALLOWANCE_BYTES`. The sum is
checked from each header before the member is written. JPEG and PNG files hardly compress, so a real image
archive expands about 1:1; a gzip bomb expands about 1000:1.

No torch import here: the Airflow layer imports this module at DAG-parse time.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputFileError

__all__ = ["COMPLETE_MARKER", "UnsafeArchiveError", "archive_stem", "is_archive", "safe_extract"]

#: File written last inside an extracted folder; its presence means the extraction finished.
COMPLETE_MARKER = ".extract_complete"
MAX_EXPANSION_RATIO = 100
EXPANSION_ALLOWANCE_BYTES = 64 * 1024 * 1024
MEMBER_COST_BYTES = 512  # one tar header block: what an empty member costs the archive, uncompressed

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")


class UnsafeArchiveError(InputFileError):
    """An archive member that must not be extracted (absolute path, ``..``, link or special file)."""

    def __init__(self, *, archive_path: str | os.PathLike[str], member: str, reason: str) -> None:
        super().__init__(f"{archive_path}: refusing to extract member {member!r}: {reason}")
        self.archive_path = archive_path
        self.member = member
        self.reason = reason


def is_archive(name: str | os.PathLike[str]) -> bool:
    """Whether a file name (or URI) names a tar archive that staging extracts."""
    return str(name).lower().endswith(_ARCHIVE_SUFFIXES)


def archive_stem(name: str | os.PathLike[str]) -> str:
    """The archive's base name without its tar suffix: ``images.tar.gz`` -> ``images``."""
    base = posixpath.basename(str(name).rstrip("/"))
    for suffix in _ARCHIVE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    raise ValueError(f"{name!r} is not a tar archive; expected one of the suffixes {list(_ARCHIVE_SUFFIXES)}")


def safe_extract(archive_path: str | os.PathLike[str], dest_dir: str | os.PathLike[str]) -> Path:
    """Extract ``archive_path`` into ``dest_dir`` and return ``dest_dir``.

    If ``dest_dir`` already holds :data:`COMPLETE_MARKER` it is returned unchanged (extracted once).
    If it exists without the marker, :class:`FileExistsError` is raised: it is not a finished
    extraction and is not ours to delete. Members are checked one by one before they are written;
    an unsafe one raises :class:`UnsafeArchiveError` naming it, and the temporary folder is removed,
    so ``dest_dir`` never appears half-filled.
    """
    archive_path = Path(archive_path)
    dest_dir = Path(dest_dir)
    if (dest_dir / COMPLETE_MARKER).is_file():
        return dest_dir
    if dest_dir.exists() or dest_dir.is_symlink():
        raise FileExistsError(
            f"cannot extract {archive_path} into {dest_dir}: the folder exists but holds no {COMPLETE_MARKER} "
            "marker (not a finished extraction); remove it first"
        )
    if not archive_path.is_file():
        raise FileNotFoundError(f"archive {archive_path} does not exist or is not a file")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.partial-", dir=dest_dir.parent))
    try:
        _extract_checked(archive_path=archive_path, into=partial)
        (partial / COMPLETE_MARKER).write_text(f"{archive_path.name}\n")
        try:
            os.rename(partial, dest_dir)
        except OSError:
            # Another process finished the same extraction first: keep its folder.
            if not (dest_dir / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest_dir


def _extract_checked(*, archive_path: Path, into: Path) -> None:
    """Stream the archive once, checking each member before ``tarfile`` writes it."""
    try:
        with tarfile.open(archive_path, mode="r|*") as tar:
            # ``data`` filter as a second line of defence; our checks run first and name the reason.
            members = _checked_members(tar, archive_path=archive_path, root=into)
            tar.extractall(path=into, members=members, filter="data")
    except tarfile.ReadError as error:
        raise tarfile.ReadError(f"{archive_path}: not a readable tar archive ({error})") from error


def _checked_members(tar: tarfile.TarFile, *, archive_path: Path, root: Path) -> Iterator[tarfile.TarInfo]:
    """Yield members in archive order after checking them against what is already on disk.

    ``extractall`` writes each member before asking for the next one, so links extracted earlier are
    on disk and ``realpath`` sees through them.
    """
    real_root = os.path.realpath(root)
    budget = MAX_EXPANSION_RATIO * archive_path.stat().st_size + EXPANSION_ALLOWANCE_BYTES
    written = 0
    for member in tar:
        reason = _refusal_reason(member, real_root=real_root)
        if reason is not None:
            raise UnsafeArchiveError(archive_path=archive_path, member=member.name, reason=reason)
        written += max(member.size, 0) + MEMBER_COST_BYTES
        if written > budget:
            raise UnsafeArchiveError(
                archive_path=archive_path, member=member.name,
                reason=f"the archive would expand to more than {budget} bytes ({MAX_EXPANSION_RATIO} times its "
                       f"{archive_path.stat().st_size} bytes plus {EXPANSION_ALLOWANCE_BYTES >> 20} MiB): a "
                       "decompression bomb?")
        yield member


def _refusal_reason(member: tarfile.TarInfo, *, real_root: str) -> str | None:
    name = member.name
    if name.startswith("/") or os.path.isabs(name):
        return "absolute path"
    if ".." in name.split("/"):
        return "path contains '..'"
    if member.ischr() or member.isblk():
        return "device file; only regular files, folders and links inside the archive are allowed"
    if member.isfifo():
        return "FIFO; only regular files, folders and links inside the archive are allowed"
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return f"unsupported member type {member.type!r}"
    if not _inside(os.path.join(real_root, name), real_root=real_root):
        return "path leads outside the destination through a symlink"
    if member.issym():
        if os.path.isabs(member.linkname):
            return f"symlink to absolute path {member.linkname!r}"
        target = os.path.join(real_root, posixpath.dirname(name), member.linkname)
        if not _inside(target, real_root=real_root):
            return f"symlink to {member.linkname!r} leaves the destination folder"
    if member.islnk():
        if os.path.isabs(member.linkname) or ".." in member.linkname.split("/"):
            return f"hardlink to {member.linkname!r} leaves the destination folder"
        if not _inside(os.path.join(real_root, member.linkname), real_root=real_root):
            return f"hardlink to {member.linkname!r} leaves the destination folder"
    return None


def _inside(path: str, *, real_root: str) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, real_root]) == real_root
