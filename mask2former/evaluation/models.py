"""Which model an evaluate or inference job runs, and the label map its outputs are read with.

An encrypted model file (checkpoint, quantized model, ONNX model or TensorRT engine) is opened with the
spec's ``encryption_key``; a missing or wrong key is refused right after the file is resolved, before the
device is chosen, the model is loaded or any dataset is built.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..errors import ActionError
from ..model_files import require_model_key, resolve_model_file
from ..checkpoint import CheckpointError, read_checkpoint
from ..data.label_map import LabelEntry, LabelMap, default_color
from ..runtime import load_runner, runner_kind_for, select_device
from ..runtime.inference_model import output_names
from ..runtime.precision import choose_precision

log = logging.getLogger(__name__)

# spec key of the section -> runner kind (None: from the file name, see runner_kind_for)
MODEL_KEYS = (("checkpoint", None), ("onnx_file", "onnx"), ("trt_engine", "engine"))


def model_source(section: Any, *, action: str) -> Tuple[str, Path]:
    """(runner kind, file) from ``<action>.checkpoint`` / ``onnx_file`` / ``trt_engine``: exactly one must
    be set. A results folder is resolved to its model file (best checkpoint, model.onnx, model.engine)."""
    given = [(key, kind, getattr(section, key)) for key, kind in MODEL_KEYS if getattr(section, key)]
    keys = ", ".join(f"{action}.{key}" for key, _ in MODEL_KEYS)
    if not given:
        extra = f" (or {action}.predictions to score files)" if action == "evaluate" else ""
        raise ActionError(f"No model to run: set one of {keys}{extra}.")
    if len(given) > 1:
        raise ActionError(f"Set only one of {keys}; got " + ", ".join(f"{action}.{k}={v!r}" for k, _, v in given) + ".")
    key, kind, value = given[0]
    path = resolve_model_file(f"{action}.{key}", str(value), kind or "checkpoint")
    return kind or runner_kind_for(path), path


def load_job_runner(config: Any, *, action: str) -> Tuple[Any, str, Path]:
    """The runner of the job's model on its device, checked against ``model.mode``: (runner, kind, path).
    The runner runs in the precision ``<action>.precision`` allows on that device; ``runner.precision_choice``
    says which and why."""
    section = getattr(config, action)
    kind, path = model_source(section, action=action)
    require_model_key(path, config.encryption_key)
    device = select_device(num_gpus=section.num_gpus, gpu_ids=section.gpu_ids, action=action)
    runner = load_runner(kind, path, config, device)
    wanted = config.model.mode
    if not set(output_names(wanted)) <= set(output_names(runner.mode)):
        raise ActionError(f"model.mode={wanted} needs the outputs {list(output_names(wanted))}, but {path} was built "
                          f"for mode {runner.mode} ({list(output_names(runner.mode))}); set model.mode={runner.mode}.")
    runner.precision_choice = choose_precision(section.precision, kind=kind, device=device)
    if runner.precision_choice.used == "bf16":
        runner.set_precision("bf16")
    log.info("%s: runs in %s (%s.precision=%s: %s)", action, runner.precision_choice.used, action,
             section.precision, runner.precision_choice.reason)
    return runner, kind, path


def with_num_classes(config: Any, num_classes: int) -> Any:
    """A copy of ``config`` whose model.sem_seg_head.num_classes is the model's (the label map is checked
    against the model actually run, not the spec's default)."""
    if config.model.sem_seg_head.num_classes == num_classes:
        return config
    log.info("model.sem_seg_head.num_classes: using the model's %d (the spec says %d)", num_classes,
             config.model.sem_seg_head.num_classes)
    config = copy.deepcopy(config)
    config.model.sem_seg_head.num_classes = num_classes
    return config


def checkpoint_label_map(path: Path, *, num_classes: int, encryption_key: Optional[str] = None) -> Optional[LabelMap]:
    """The label map a checkpoint recorded at training time, or None when it has none (or is unreadable)."""
    try:
        payload = read_checkpoint(path, encryption_key=encryption_key)
    except CheckpointError:
        return None
    entries: Optional[List[dict]] = payload.get("label_map")
    if not entries:
        return None
    parsed = [LabelEntry(id=int(e["id"]), name=str(e["name"]),
                         color=tuple(int(c) for c in e["color"]) if e.get("color") else default_color(int(e["id"])),
                         isthing=bool(e.get("isthing", 1))) for e in entries]
    return LabelMap(entries=parsed, contiguous_id=bool(payload.get("contiguous_id", False)), num_classes=num_classes,
                    source=f"checkpoint {path}")


def job_label_map(config: Any, *, kind: str, path: Path, num_classes: int) -> LabelMap:
    """dataset.label_map when set, else the label map recorded in the checkpoint."""
    if config.dataset.label_map:
        try:
            return LabelMap.load(config.dataset.label_map, contiguous_id=config.dataset.contiguous_id,
                                 num_classes=num_classes)
        except (OSError, ValueError) as exc:
            raise ActionError(str(exc)) from exc
    recorded = checkpoint_label_map(path, num_classes=num_classes, encryption_key=config.encryption_key) \
        if kind in ("checkpoint", "quantized") else None
    if recorded is None:
        raise ActionError(f"dataset.label_map is not set and {path} records no label map: set dataset.label_map to "
                          "the label_map.json the model was trained with.")
    return recorded
