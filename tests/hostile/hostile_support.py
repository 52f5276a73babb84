"""The hostile-input corpus's sandbox: each case runs the engine's CLI (``mask2former.cli.main``, what
``python -m mask2former`` runs) or the job's data staging in a folder of its own, and checks that nothing
changed outside the job folder.

    sandbox/data/      a copy of a small synthetic dataset (archives extracted), where hostile files go
    sandbox/outside/   a sentinel folder next to the data: an escaping archive member would land here
    sandbox/tmp/       the temporary folder while the case runs
    sandbox/jobs/job/  the job folder (results, and the staging cache of staging cases)
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from mask2former import cli
from mask2former.data.archives import safe_extract
from mask2former.results import read_status
from train_support import make_data, tiny_spec

#: (input, door, observed result) of every case run in this session, for the report (see conftest.py).
OUTCOMES: List[Tuple[str, str, str]] = []


@dataclass
class Outcome:
    code: Optional[int]  # the CLI's exit status; None where the door raises (staging)
    message: str  # the FAILURE line of status.json (exit 1), or the "error:" line of the output (exit 2)
    output: str
    seconds: float
    changed_outside: Dict[str, str]  # path -> "added" / "removed" / "modified", outside the job folder


def make_base_data(root: Path) -> Path:
    """coco and coco_panoptic training data (2 images of 64 px each) with every archive extracted."""
    for fmt in ("coco", "coco_panoptic"):
        roots = make_data(root / fmt / "train", dataset_format=fmt, images=2, val_images=None, size=64)
        for archive in sorted(roots["train"].glob("*.tar.gz")):
            safe_extract(archive, archive.parent / archive.name[:-len(".tar.gz")])
            archive.unlink()
    return root


class Sandbox:
    def __init__(self, root: Path, base: Path) -> None:
        self.root = root
        self.data = root / "data"
        shutil.copytree(base, self.data)
        self.outside = root / "outside"
        self.outside.mkdir()
        (self.outside / "sentinel.txt").write_text("must stay as it is\n")
        self.tmp = root / "tmp"
        self.tmp.mkdir()
        self.job = root / "jobs" / "job"

    def train_root(self, fmt: str) -> Path:
        return self.data / fmt / "train"

    def train_spec(self, fmt: str = "coco_panoptic") -> Dict[str, Any]:
        """A tiny train spec on this sandbox's data (one epoch, batch 1, no loader workers)."""
        root = self.train_root(fmt)
        spec = tiny_spec({"train": root}, dataset_format=fmt, mode="panoptic" if fmt == "coco_panoptic" else "instance",
                         batch_size=1)
        section = {"type": fmt, "img_dir": str(root / "images"), "batch_size": 1, "num_workers": 0}
        if fmt == "coco_panoptic":
            section.update(panoptic_json=str(root / "annotations_panoptic.json"),
                           panoptic_dir=str(root / "images_panoptic"))
        else:
            section["instance_json"] = str(root / "annotations.json")
        spec["dataset"]["train"] = section
        return copy.deepcopy(spec)

    def write_spec(self, spec: Dict[str, Any], name: str = "spec.yaml") -> Path:
        path = self.data / name
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    def snapshot(self) -> Dict[str, Tuple[int, int]]:
        """Every path under the sandbox but the job folder: (size, mtime) of files, (-1, -1) of folders and links.

        torch's own compile cache (``torchinductor_<user>`` in the temporary folder) is not the job's doing."""
        state = {}
        for path in self.root.rglob("*"):
            if path == self.job or self.job in path.parents or path == self.job.parent:
                continue
            if any(part.startswith("torchinductor_") for part in path.relative_to(self.root).parts):
                continue
            if path.is_symlink() or not path.is_file():
                state[str(path.relative_to(self.root))] = (-1, -1)
            else:
                info = path.stat()
                state[str(path.relative_to(self.root))] = (info.st_size, info.st_mtime_ns)
        return state

    @contextlib.contextmanager
    def watched(self):
        """Yields a dict filled, on exit, with what changed outside the job folder."""
        before = self.snapshot()
        saved_tmp = tempfile.tempdir
        tempfile.tempdir = str(self.tmp)
        changes: Dict[str, str] = {}
        try:
            yield changes
        finally:
            tempfile.tempdir = saved_tmp
            after = self.snapshot()
            changes.update({k: "removed" for k in before.keys() - after.keys()})
            changes.update({k: "added" for k in after.keys() - before.keys()})
            changes.update({k: "modified" for k in before.keys() & after.keys() if before[k] != after[k]})

    def run_cli(self, action: str, words: List[str], spec: Optional[Dict[str, Any]] = None,
                spec_path: Optional[Path] = None) -> Outcome:
        """``python -m mask2former ACTION [-e SPEC] --results-dir JOB WORDS...``, in this process."""
        if spec is not None:
            spec_path = self.write_spec(spec)
        args = [action] + (["-e", str(spec_path)] if spec_path else []) + ["--results-dir", str(self.job), *words]
        printed = io.StringIO()
        started = time.monotonic()
        with self.watched() as changes, contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            code = cli.main(args)
        output = printed.getvalue()
        if code == 2:
            message = next((line[len("error: "):] for line in output.splitlines() if line.startswith("error: ")), "")
        else:
            message = read_status(self.job)[-1]["message"] if (self.job / "status.json").is_file() else ""
        return Outcome(code=code, message=message, output=output, seconds=time.monotonic() - started,
                       changed_outside=changes)


def assert_refused(outcome: Outcome, pattern: str, *, case: str, door: str, code: Optional[int] = 1,
                   max_seconds: float = 120.0) -> None:
    """Refused with one sentence matching ``pattern``, no traceback, nothing changed outside the job folder."""
    assert outcome.code == code, (outcome.code, outcome.message, outcome.output[-3000:])
    assert re.search(pattern, outcome.message), (pattern, outcome.message)
    assert "\n" not in outcome.message and "Traceback" not in outcome.output, outcome.output[-3000:]
    assert outcome.changed_outside == {}, outcome.changed_outside
    assert outcome.seconds < max_seconds, outcome.seconds
    how = "raised" if code is None else f"exit {code}"
    OUTCOMES.append((case, door, f"refused, {how}: {outcome.message}"))


def record_accepted(case: str, door: str, what: str) -> None:
    OUTCOMES.append((case, door, f"accepted: {what}"))


# ------------------------------------------------------------------------------------------- hostile files


def png_bytes(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2,
              rows: Optional[bytes] = None) -> bytes:
    """A PNG written chunk by chunk (any size, any depth, without building the image in memory). ``rows``
    are the filtered scanlines; by default all zero, compressed as a stream so even huge images stay small."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    if rows is None:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
        row = bytes(1 + (width * channels * bit_depth + 7) // 8)
        packer = zlib.compressobj(9)
        compressed = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    else:
        compressed = zlib.compress(rows)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed) + chunk(b"IEND", b"")
