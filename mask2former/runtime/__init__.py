"""Runners: one call form for every way of running a model at evaluation and inference time.

A runner is any object with::

    runner(images: float32 [B, 3, H, W] normalised, any device) -> Dict[str, torch.Tensor]
        # the names of mask2former.runtime.inference_model.output_names(mode), on any device
    runner.fixed_input_size   # (H, W) the runner was built for, or None when any size divisible by 32 works
    runner.max_batch_size     # largest B accepted, or None for any (a static-batch runner pads inside)
    runner.num_classes        # K, the number of real classes of the model
    runner.mode               # the model.mode its outputs follow (panoptic | instance | semantic)

:func:`load_runner` dispatches on the kind of model file. Each kind lives in its own module of this
package exposing ``load(path, config, device) -> runner``; a kind whose module is absent from this
build, or whose module cannot be imported (e.g. onnxruntime or TensorRT not installed), fails with an
:class:`~mask2former.actions.job.ActionError` that says what is missing. ``register_runner`` lets other
code add or replace a kind at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, Tuple, Union

import torch

from ..errors import ActionError

log = logging.getLogger(__name__)

RUNNER_KINDS = ("checkpoint", "onnx", "engine", "quantized")
# kind -> module of this package that defines ``load(path, config, device)``.
RUNNER_MODULES: Dict[str, str] = {
    "checkpoint": f"{__name__}.torch_runner",
    "onnx": f"{__name__}.onnx_runner",
    "engine": f"{__name__}.tensorrt_runner",
    "quantized": f"{__name__}.quantized_runner",
}
_WHAT_IT_NEEDS = {
    "checkpoint": "PyTorch",
    "onnx": "onnxruntime (pip install onnxruntime or onnxruntime-gpu)",
    "engine": "TensorRT and a CUDA GPU (requirements-gpu.txt)",
    "quantized": "the quantization backend the model was made with (torchao or nvidia-modelopt)",
}
_ENGINE_SUFFIXES = (".engine", ".trt", ".plan")

Loader = Callable[[Union[str, Path], Any, torch.device], "Runner"]
_REGISTERED: Dict[str, Loader] = {}


class Runner(Protocol):
    """See the module docstring."""

    fixed_input_size: Optional[Tuple[int, int]]
    max_batch_size: Optional[int]
    num_classes: int
    mode: str

    def __call__(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        ...


def register_runner(kind: str, loader: Loader) -> None:
    """Use ``loader(path, config, device)`` for ``kind`` instead of the module named in RUNNER_MODULES."""
    if kind not in RUNNER_KINDS:
        raise ValueError(f"runner kind {kind!r} is not one of {list(RUNNER_KINDS)}")
    _REGISTERED[kind] = loader


def _module_loader(kind: str) -> Loader:
    module_name = RUNNER_MODULES[kind]
    if importlib.util.find_spec(module_name) is None:
        raise ActionError(f"Running a model of kind '{kind}' needs {module_name.replace('.', '/')}.py, which is "
                          f"not part of this build of the engine; it also needs {_WHAT_IT_NEEDS[kind]}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ActionError(f"Running a model of kind '{kind}' needs {_WHAT_IT_NEEDS[kind]}: importing "
                          f"{module_name} failed ({exc}).") from exc
    loader = getattr(module, "load", None)
    if loader is None:
        raise ActionError(f"{module_name} defines no load(path, config, device); cannot run kind '{kind}'.")
    return loader


def load_runner(kind: str, path: Union[str, Path], config: Any, device: Union[str, torch.device]) -> Runner:
    """The runner of a model file. ``config`` is the ExperimentConfig (its ``model`` section gives the
    post-processing mode, thresholds and top-k); ``device`` e.g. "cpu" or "cuda:0"."""
    if kind not in RUNNER_KINDS:
        raise ActionError(f"Model kind '{kind}' is not one of {', '.join(RUNNER_KINDS)}.")
    if not Path(path).is_file():
        raise ActionError(f"The {kind} model file '{path}' does not exist.")
    loader = _REGISTERED.get(kind) or _module_loader(kind)
    runner = loader(path, config, torch.device(device))
    log.info("loaded %s model %s (mode %s, %d classes, input %s, max batch %s) on %s", kind, path, runner.mode,
             runner.num_classes, runner.fixed_input_size or "any size", runner.max_batch_size or "any", device)
    return runner


def runner_kind_for(path: Union[str, Path]) -> str:
    """The runner kind a model file name implies: .onnx -> onnx, .engine/.trt/.plan -> engine,
    quantized_model_<backend>.pth -> quantized, anything else -> checkpoint."""
    name = Path(path).name
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in _ENGINE_SUFFIXES:
        return "engine"
    if name.startswith("quantized_model_"):
        return "quantized"
    return "checkpoint"


def select_device(*, num_gpus: int, gpu_ids: Sequence[int], action: str) -> torch.device:
    """The device an evaluate/inference job runs on: the first of ``gpu_ids`` when CUDA is present, else
    the CPU. Evaluation and inference use one device; more GPUs are logged as unused."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(gpu_ids[0]) if gpu_ids else 0
    if index >= torch.cuda.device_count():
        raise ActionError(f"{action}.gpu_ids={list(gpu_ids)} names GPU {index}, but this machine has "
                          f"{torch.cuda.device_count()} GPU(s).")
    if num_gpus > 1:
        log.warning("%s.num_gpus=%d: %s runs on one device (cuda:%d); the others stay idle", action, num_gpus,
                    action, index)
    return torch.device(f"cuda:{index}")
