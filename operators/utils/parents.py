"""The parent model of a downstream task, from the parent task's XCom dict.

``parent`` is what an upstream Mask2Former operator returned (``{"action", "results_dir",
"artifacts", ...}``). The kind of model follows from the parent's action (train: checkpoint, export:
ONNX, gen_trt_engine: TensorRT engine, quantize: quantized model) and is found by the engine's own
resolver (:func:`mask2former.results.resolve_parent_model`) with the task's checkpoint choose method,
on the local folder or on an index of the published S3 folder (the storage hook's ``index``). The answer
is one dotted override of the downstream action, a URI or path (staged later like any data source).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Optional

from mask2former import results
from mask2former.config import SpecError
from mask2former.data.sources import join_uri, uri_scheme


#: The model kind each parent action produces.
PARENT_KIND = {"train": "checkpoint", "export": "onnx", "gen_trt_engine": "engine", "quantize": "quantized"}

#: (downstream action, model kind) -> the spec key that takes it. Quantized .onnx files use "onnx".
TARGET_KEY = {
    ("evaluate", "checkpoint"): "evaluate.checkpoint",
    ("evaluate", "onnx"): "evaluate.onnx_file",
    ("evaluate", "engine"): "evaluate.trt_engine",
    ("inference", "checkpoint"): "inference.checkpoint",
    ("inference", "onnx"): "inference.onnx_file",
    ("inference", "engine"): "inference.trt_engine",
    ("export", "checkpoint"): "export.checkpoint",
    ("quantize", "checkpoint"): "quantize.model_path",
    ("gen_trt_engine", "onnx"): "gen_trt_engine.onnx_file",
}


class ParentError(ValueError):
    """A parent that cannot feed this action; the message names the parent and what was expected."""


def _target(action: str, kind: str, name: str) -> str:
    key_kind = ("onnx" if name.endswith(".onnx") else "checkpoint") if kind == "quantized" else kind
    key = TARGET_KEY.get((action, key_kind))
    if key is None:
        takes = sorted({k for (a, k) in TARGET_KEY if a == action})
        raise ParentError(f"action {action} cannot take a {key_kind} model from its parent; it takes "
                          f"{', '.join(takes) or 'no parent model'}.")
    return key


def resolve_parent(action: str, parent: Any, *, choose: str, epoch: Optional[int], hook: Any) -> Dict[str, str]:
    """``{spec_key: uri}`` of the parent's model for ``action``; ``{}`` when ``parent`` is None."""
    if parent is None:
        return {}
    if not isinstance(parent, Mapping) or "results_dir" not in parent or "action" not in parent:
        raise ParentError(f"parent must be the XCom dict of an upstream Mask2Former task (with 'action' and "
                          f"'results_dir'), got {parent!r}.")
    parent_action = parent["action"]
    kind = PARENT_KIND.get(parent_action)
    if kind is None:
        raise ParentError(f"the parent task ran {parent_action}, which produces no model; a parent must be a "
                          f"{', '.join(PARENT_KIND)} task.")
    if choose not in results.CHOOSE_METHODS:
        raise SpecError(f"checkpoint_choose_method {choose!r} is not one of {', '.join(results.CHOOSE_METHODS)}.")
    if choose == "from_epoch_number" and epoch is None:
        raise SpecError("checkpoint_choose_method from_epoch_number needs checkpoint_epoch_number.")
    results_dir = str(parent["results_dir"])
    with tempfile.TemporaryDirectory(prefix="m2f-parent-") as tmp:
        folder = hook.index(results_dir, Path(tmp))
        try:
            found = results.resolve_parent_model(folder, kind=kind, choose=choose, epoch=epoch)
        except results.ParentModelError as exc:
            where = f" (published at {results_dir})" if uri_scheme(results_dir) == "s3" else ""
            raise ParentError(f"parent job {parent.get('job_id', results_dir)}{where}: {exc}") from None
        relative = found.relative_to(folder).as_posix()
    return {_target(action, kind, relative): join_uri(results_dir, relative)}
