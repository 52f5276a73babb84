"""Model arguments of the actions: a file or a parent results folder, and the early key check."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .checkpoint import CheckpointError, check_checkpoint_key
from .results import ParentModelError, resolve_parent_model
from .errors import ActionError


def require_model_key(path: Union[str, Path], encryption_key: Optional[str]) -> None:
    """Refuse with one sentence naming ``path`` when it is encrypted and ``encryption_key`` is missing or wrong.

    Reads the 56-byte header and derives the key once (~0.1 s); plain files and files that do not exist pass
    (their readers say what is wrong with them). Call it right after the model file is resolved, so a job with
    the wrong key stops before datasets are built, models are loaded or anything is written.
    """
    try:
        check_checkpoint_key(path, encryption_key)
    except CheckpointError as exc:
        raise ActionError(str(exc)) from None


def resolve_model_file(key: str, value: str, kind: str = "checkpoint") -> Path:
    """The file a model argument names: the file itself (``file://`` allowed), or for a results folder the
    file of ``kind`` it holds (``resolve_parent_model``: best checkpoint, model.onnx, ...). ``key`` is the spec
    key, named in every error."""
    path = Path(value[len("file://"):] if value.startswith("file://") else value)
    if path.is_dir():
        try:
            return resolve_parent_model(path, kind=kind)
        except ParentModelError as exc:
            raise ActionError(f"{key}={value!r}: {exc}") from None
    if not path.is_file():
        raise ActionError(f"{key}={value!r} does not exist (expected a {kind} file or a results folder).")
    return path
