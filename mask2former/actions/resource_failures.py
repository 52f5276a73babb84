"""Out of GPU memory, host memory or disk in an action other than train: FAILURE with one actionable message.

:func:`reports_resource_failures` wraps an action's ``run(config, job)``. An exception that
:func:`mask2former.resources.classify_resource_error` recognises (anywhere in its cause/context chain or in
its text) becomes an :class:`~mask2former.actions.job.ActionError` whose message says what ran out, in which
action, and which of that action's spec keys (with their current values) need less of it; any other
exception passes unchanged. Train reports its own failures with the training keys
(:mod:`mask2former.actions.train`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional

from ..resources import DISK, GPU_MEMORY, classify_resource_error
from .job import ActionError, ActionResult, Job

Run = Callable[[Any, Job], ActionResult]

#: What each action writes, for the full-disk message.
_WRITES = {
    "evaluate": "per-class reports",
    "inference": "masks, JSON results and overlays",
    "export": "the ONNX model and a work copy of it beside the target",
    "quantize": "the quantized model (and, for modelopt.onnx, an fp32 ONNX work copy)",
    "gen_trt_engine": "the engine, its timing cache and a work copy beside the target",
}


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _test_size_lever(config: Any) -> str:
    return (f"lower dataset.augmentation.test_min_size (now {_get(config, 'dataset.augmentation.test_min_size')}) and "
            f"test_max_size (now {_get(config, 'dataset.augmentation.test_max_size')}), the size images are resized "
            "to")


def _batch_lever(config: Any, key: str) -> List[str]:
    batch = _get(config, key)
    return [f"lower {key} (now {batch})"] if batch is not None and batch > 1 else []


def _workers_lever(config: Any, key: str) -> List[str]:
    workers = _get(config, key)
    return [f"lower {key} (now {workers}; each loader process holds its own images)"] if workers else []


def _evaluate_levers(config: Any, kind: str) -> List[str]:
    levers = _batch_lever(config, "evaluate.batch_size") + [_test_size_lever(config)]
    return levers + (_workers_lever(config, "dataset.val.num_workers") if kind != GPU_MEMORY else [])


def _inference_levers(config: Any, kind: str) -> List[str]:
    levers = _batch_lever(config, "inference.batch_size") + [_test_size_lever(config)]
    return levers + (_workers_lever(config, "dataset.test.num_workers") if kind != GPU_MEMORY else [])


def _export_levers(config: Any, kind: str) -> List[str]:
    levers = [f"lower export.input_height and export.input_width (now {_get(config, 'export.input_height')}x"
              f"{_get(config, 'export.input_width')})"]
    batch = _get(config, "export.batch_size")
    if batch == -1:
        levers.append("set export.batch_size to 1 (now -1: a dynamic batch is traced and checked with 2 images)")
    elif batch is not None and batch > 1:
        levers.append(f"lower export.batch_size (now {batch})")
    if kind == GPU_MEMORY and _get(config, "export.on_cpu") is False:
        levers.append("set export.on_cpu to true (trace on the CPU)")
    return levers


def _quantize_levers(config: Any, kind: str) -> List[str]:
    levers = []
    if kind == GPU_MEMORY and _get(config, "quantize.device") == "cuda":
        levers.append("set quantize.device to cpu")
    calibrated = _get(config, "quantize.mode") == "static_ptq" or _get(config, "quantize.backend") == "modelopt.onnx"
    levers.append(_test_size_lever(config) + (" for calibration and latency" if calibrated else " for latency"))
    images = _get(config, "dataset.quant_calibration_dataset.num_images")
    if calibrated and images is not None and images > 1:
        levers.append(f"lower dataset.quant_calibration_dataset.num_images (now {images})")
    levers += _batch_lever(config, "dataset.val.batch_size")
    return levers + (_workers_lever(config, "dataset.val.num_workers") if kind != GPU_MEMORY else [])


def _gen_trt_engine_levers(config: Any, kind: str) -> List[str]:  # noqa: ARG001 - same form as the others
    workspace = _get(config, "gen_trt_engine.tensorrt.workspace_size")
    levers = [f"lower gen_trt_engine.tensorrt.workspace_size (now {workspace} MB)"]
    largest = _get(config, "gen_trt_engine.tensorrt.max_batch_size")
    if largest is not None and largest > 1:
        levers.append(f"lower gen_trt_engine.tensorrt.max_batch_size (now {largest})")
    return levers


_LEVERS: Dict[str, Callable[[Any, str], List[str]]] = {
    "evaluate": _evaluate_levers,
    "inference": _inference_levers,
    "export": _export_levers,
    "quantize": _quantize_levers,
    "gen_trt_engine": _gen_trt_engine_levers,
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 240 else line[:237] + "..."


def _joined(levers: List[str]) -> str:
    return levers[0] if len(levers) == 1 else f"{', '.join(levers[:-1])} or {levers[-1]}"


def resource_failure_message(error: BaseException, *, config: Any, action: str) -> Optional[str]:
    """The message for ``error`` when it is an out-of-memory or full-disk failure of ``action``, else None."""
    if action not in _LEVERS:
        raise ValueError(f"action must be one of {sorted(_LEVERS)}, got {action!r}")
    failure = classify_resource_error(error, config)
    if failure is None:
        return None
    detail = _first_line(error)
    if failure.kind == DISK:
        where = getattr(error, "filename", None)
        place = f"writing {where}" if where else f"results in {_get(config, 'results_dir')}"
        return (f"The disk is full during {action} ({place}): free space there or set results_dir to a larger disk; "
                f"{action} writes {_WRITES[action]} there, and downloaded and extracted data are cached under "
                f"$MASK2FORMER_CACHE (~/.cache/mask2former). ({detail})")
    what = "The GPU ran out of memory" if failure.kind == GPU_MEMORY else "The machine ran out of host memory (RAM)"
    return f"{what} during {action}: {_joined(_LEVERS[action](config, failure.kind))}. ({detail})"


def reports_resource_failures(action: str) -> Callable[[Run], Run]:
    """Decorate an action's ``run(config, job)``: out-of-memory and full-disk errors end it with an ActionError
    that names the keys to change (see the module docstring)."""
    if action not in _LEVERS:
        raise ValueError(f"action must be one of {sorted(_LEVERS)}, got {action!r}")

    def decorate(run: Run) -> Run:
        @functools.wraps(run)
        def guarded(config: Any, job: Job) -> ActionResult:
            try:
                return run(config, job)
            except Exception as error:  # noqa: BLE001 - only resource failures are rewritten; others re-raised
                message = resource_failure_message(error, config=config, action=action)
                if message is None:
                    raise
                raise ActionError(message) from error
        return guarded
    return decorate
