"""The results folder of one job: its layout, status lines, metrics, best-epoch record, parent models.

Layout (one folder per job, never shared by two runs)::

    experiment.yaml                      resolved spec
    status.json                          JSON lines: date, time, status, message [, kpi, epoch, max_epoch, eta]
    metrics.json                         the action's final metrics
    best_model.json                      train: epoch, step, metric and checkpoint of the best validation
    model_epoch_{EEE}_step_{SSSSSS}.pth  train checkpoints
    model_latest.pth                     train: the newest checkpoint
    model.onnx, export_report.json       export
    model.engine                         gen_trt_engine
    quantized_model_<backend>.pth|.onnx  quantize

No torch import here: Airflow operators use this module at DAG-parse time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

PathLike = Union[str, Path]

EXPERIMENT_FILE = "experiment.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
BEST_FILE = "best_model.json"
LATEST_CHECKPOINT = "model_latest.pth"
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
STATUSES = ("STARTED", "RUNNING", "SUCCESS", "FAILURE")
CHOOSE_METHODS = ("best_model", "latest_model", "from_epoch_number")
PARENT_KINDS = ("checkpoint", "onnx", "engine", "quantized")

_CHECKPOINT_RE = re.compile(r"^model_epoch_(\d{3,})_step_(\d{6,})\.pth$")
#: Checkpoints written by NVIDIA TAO's trainer: ``model_epoch_009_step_01000.pth`` (5-digit steps), older
#: Lightning names ``model_epoch=099.pth`` / ``model_epoch=099_step=01000.pth`` and their version suffix
#: (``model_epoch=129-v1.pth``). Read by the parent-model resolver only; train writes and resumes its own names.
_TAO_CHECKPOINT_RE = re.compile(r"^model_epoch[=_](\d+)(?:[_-]step[=_](\d+))?(?:-v(\d+))?\.pth$")
#: TAO's link to its newest checkpoint: ``<model name>_latest.pth`` (``mask2former_model_latest.pth``).
_TAO_LATEST_SUFFIX = "_latest.pth"
_QUANTIZED_RE = re.compile(r"^quantized_model_\w+\.(pth|onnx)$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"model_epoch_{epoch:03d}_step_{step:06d}.pth"


def quantized_name(backend: str, suffix: str) -> str:
    """``quantized_model_<backend>.<suffix>``; dots in a backend name become underscores."""
    return f"quantized_model_{backend.replace('.', '_')}.{suffix}"


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write a file so readers see the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class StatusWriter:
    """Appends status lines to status.json; the last line of a finished job is SUCCESS or FAILURE."""

    def __init__(self, results_dir: PathLike, enabled: bool = True):
        self.path = Path(results_dir) / STATUS_FILE
        self.enabled = enabled
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, status: str, message: str, **extra: Any) -> Dict[str, Any]:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        now = _dt.datetime.now(_dt.timezone.utc)
        line = {"date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H:%M:%S"), "status": status,
                "message": message}
        line.update({k: v for k, v in extra.items() if v is not None})
        if not self.enabled:
            return line
        with open(self.path, "a") as fh:
            fh.write(json.dumps(line, default=_json_default) + "\n")
            fh.flush()
        return line

    def started(self, message: str) -> Dict[str, Any]:
        return self.write("STARTED", message)

    def running(self, message: str, **extra: Any) -> Dict[str, Any]:
        return self.write("RUNNING", message, **extra)

    def success(self, message: str, **extra: Any) -> Dict[str, Any]:
        return self.write("SUCCESS", message, **extra)

    def failure(self, message: str, **extra: Any) -> Dict[str, Any]:
        return self.write("FAILURE", message, **extra)


def parse_status(data: bytes) -> Tuple[List[Dict[str, Any]], int]:
    """The complete status lines of a status.json chunk and how many bytes they take.

    The one parser of status lines: a torn last line (being written, or its writer killed mid-line) is
    neither returned nor counted, so a reader following the file from an offset reads it once it is whole;
    a line that is not a JSON object is skipped.
    """
    complete = data[: data.rfind(b"\n") + 1]
    lines = []
    for raw in complete.decode("utf-8", errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines, len(complete)


def describe_status(line: Dict[str, Any]) -> str:
    """One human-readable log line for a status line."""
    parts = [f"[{line.get('status', '?')}] {line.get('message', '')}"]
    if line.get("epoch") is not None:
        parts.append(f"epoch {line['epoch']}/{line.get('max_epoch', '?')}")
    if line.get("kpi"):
        parts.append("kpi " + json.dumps(line["kpi"], sort_keys=True))
    if line.get("eta"):
        parts.append(f"eta {line['eta']}")
    return "status.json: " + ", ".join(parts)


def read_status(results_dir: PathLike, offset: int = 0) -> List[Dict[str, Any]]:
    """The status lines of a job folder (from byte ``offset`` on); see :func:`parse_status`."""
    return follow_status(Path(results_dir) / STATUS_FILE, offset)[0]


def follow_status(path: PathLike, offset: int = 0) -> Tuple[List[Dict[str, Any]], int]:
    """The complete lines of a status.json from byte ``offset`` on, and the offset after them."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    lines, used = parse_status(data)
    return lines, offset + used


def final_status(results_dir: PathLike) -> Optional[str]:
    lines = read_status(results_dir)
    return lines[-1]["status"] if lines else None


def write_metrics(results_dir: PathLike, metrics: Dict[str, Any]) -> None:
    write_json(Path(results_dir) / METRICS_FILE, metrics)


def read_metrics(results_dir: PathLike) -> Dict[str, Any]:
    path = Path(results_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    epoch: int
    step: int


def list_checkpoints(results_dir: PathLike) -> List[CheckpointInfo]:
    """Epoch checkpoints, oldest first."""
    folder = Path(results_dir)
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            match = _CHECKPOINT_RE.match(entry.name)
            if match:
                found.append(CheckpointInfo(entry, int(match.group(1)), int(match.group(2))))
    return sorted(found, key=lambda c: (c.epoch, c.step))


def list_parent_checkpoints(results_dir: PathLike) -> List[CheckpointInfo]:
    """Epoch checkpoints of a parent folder, oldest first: this tool's names and TAO's (a TAO name without a
    step sorts before this epoch's named steps; versions ``-vN`` after the unversioned file)."""
    folder = Path(results_dir)
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            match = _CHECKPOINT_RE.match(entry.name) or _TAO_CHECKPOINT_RE.match(entry.name)
            if match and entry.is_file():
                groups = match.groups() + (None,) * (3 - len(match.groups()))
                found.append((int(groups[2] or 0), CheckpointInfo(entry, int(groups[0]), int(groups[1] or -1))))
    return [info for _, info in sorted(found, key=lambda item: (item[1].epoch, item[1].step, item[0]))]


def latest_checkpoint_link(results_dir: PathLike) -> Optional[Path]:
    """``model_latest.pth``, else TAO's ``*_latest.pth`` (e.g. ``mask2former_model_latest.pth``), when present."""
    folder = Path(results_dir)
    if (folder / LATEST_CHECKPOINT).is_file():
        return folder / LATEST_CHECKPOINT
    if not folder.is_dir():
        return None
    links = sorted(p for p in folder.iterdir() if p.name.endswith(_TAO_LATEST_SUFFIX) and p.is_file())
    return links[0] if links else None


def record_best(results_dir: PathLike, *, epoch: int, step: int, metric: str, value: float,
                checkpoint: str) -> None:
    write_json(Path(results_dir) / BEST_FILE,
               {"epoch": epoch, "step": step, "metric": metric, "value": value, "checkpoint": checkpoint})


def read_best(results_dir: PathLike) -> Optional[Dict[str, Any]]:
    path = Path(results_dir) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class ParentModelError(FileNotFoundError):
    """No file of the wanted kind in a parent results folder; the message lists what the folder holds."""


def _listing(folder: Path) -> str:
    if not folder.is_dir():
        return f"the folder '{folder}' does not exist"
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    return f"'{folder}' holds: {', '.join(names) if names else '(nothing)'}"


def resolve_parent_model(results_dir: PathLike, kind: str = "checkpoint", choose: str = "best_model",
                         epoch: Optional[int] = None) -> Path:
    """The file of ``kind`` that a downstream action takes from a parent job's results folder.

    checkpoint: ``best_model`` (the best validation epoch, else the latest checkpoint when the run had
    no validation), ``latest_model`` or ``from_epoch_number`` (``epoch``). onnx, engine, quantized: the
    one such file in the folder. A folder of NVIDIA TAO's training holds no best-epoch record: best and
    latest are its ``*_latest.pth`` link, else its newest ``model_epoch...`` checkpoint.
    """
    folder = Path(results_dir)
    if kind not in PARENT_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(PARENT_KINDS)}")
    if choose not in CHOOSE_METHODS:
        raise ValueError(f"checkpoint choose method {choose!r} is not one of {', '.join(CHOOSE_METHODS)}")
    if kind == "onnx":
        return _single(folder, [folder / ONNX_FILE], "an ONNX model (model.onnx)")
    if kind == "engine":
        return _single(folder, [folder / ENGINE_FILE], "a TensorRT engine (model.engine)")
    if kind == "quantized":
        candidates = sorted(p for p in folder.glob("quantized_model_*") if _QUANTIZED_RE.match(p.name)) \
            if folder.is_dir() else []
        return _single(folder, candidates, "a quantized model (quantized_model_<backend>.pth|.onnx)")
    checkpoints = list_parent_checkpoints(folder)
    if choose == "from_epoch_number":
        if epoch is None:
            raise ValueError("choose=from_epoch_number needs epoch")
        matches = [c for c in checkpoints if c.epoch == epoch]
        if not matches:
            raise ParentModelError(f"No checkpoint of epoch {epoch} in the parent results folder; {_listing(folder)}.")
        return matches[-1].path
    if choose == "best_model":
        best = read_best(folder)
        if best and (folder / best["checkpoint"]).is_file():
            return folder / best["checkpoint"]
    latest = latest_checkpoint_link(folder)
    if latest is not None:
        return latest
    if checkpoints:
        return checkpoints[-1].path
    raise ParentModelError(f"No checkpoint ({choose}) in the parent results folder; {_listing(folder)}.")


def _single(folder: Path, candidates: Iterable[Path], what: str) -> Path:
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise ParentModelError(f"No {what} in the parent results folder; {_listing(folder)}.")
    return found[-1]


def new_results_dir(root: PathLike, action: str) -> Path:
    """A fresh folder name under root for a job that was given none."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return Path(root) / f"{action}-{stamp}"
