"""Image folders given as a folder or as a tar archive, and finding files in them by name.

A spec value such as ``dataset.train.img_dir`` may name a folder or an ``images.tar.gz``. An archive is
extracted once, next to itself, into a folder named after it (``images.tar.gz`` -> ``images/``) with
:func:`mask2former.data.archives.safe_extract` (unsafe members refused, never half-extracted, reused
when already complete). Files may sit at the archive root or inside one top folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from .archives import archive_stem, is_archive, safe_extract


def open_folder(path: str | Path, *, key: str) -> Path:
    """The local folder holding the files of ``path`` (a folder or an archive); ``key`` names the spec key."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"{key}={text!r} is a remote URI: stage the data first (mask2former.data.staging) so the "
                         f"spec names a local folder or archive")
    local = Path(text[len("file://"):] if text.startswith("file://") else text)
    if local.is_dir():
        return local
    if local.is_file():
        if not is_archive(local.name):
            raise ValueError(f"{key}={text!r} is a file but not a tar archive (.tar.gz, .tgz, .tar); "
                             f"expected a folder or an archive")
        return safe_extract(local, local.parent / archive_stem(local.name))
    raise FileNotFoundError(f"{key}={text!r} does not exist (expected a folder or a .tar.gz archive)")


class FileLocator:
    """Finds a file by an annotation's ``file_name`` under a root folder or its single top folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        visible = [entry for entry in root.iterdir() if not entry.name.startswith(".")]
        self._bases: List[Path] = [root]
        if len(visible) == 1 and visible[0].is_dir():
            self._bases.append(visible[0])

    def find(self, file_name: str) -> Optional[Path]:
        """The path of ``file_name`` (which may hold sub-folders), or None when it is not there."""
        for base in self._bases:
            candidate = base / file_name
            if candidate.is_file():
                return candidate
        return None
