"""Import a quantization backend's package, or fail in one sentence that names it and where it is listed."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from ..errors import ActionError

_SOURCES = {
    "torchao": ("torchao.quantization", "the torchao package (requirements.txt)"),
    "modelopt.pytorch": ("modelopt.torch.quantization",
                         "nvidia-modelopt, a GPU-side requirement listed in requirements-gpu.txt "
                         "(pip install 'nvidia-modelopt[torch,onnx]')"),
    "modelopt.onnx": ("modelopt.onnx.quantization",
                      "nvidia-modelopt with its ONNX extras, a GPU-side requirement listed in requirements-gpu.txt "
                      "(pip install 'nvidia-modelopt[torch,onnx]')"),
}


def require_backend(backend: str) -> Any:
    """The backend's quantization module (torchao.quantization, modelopt.torch.quantization or
    modelopt.onnx.quantization)."""
    module_name, what = _SOURCES[backend]
    try:
        with warnings.catch_warnings():
            # ModelOpt warns on import about untested transformers versions; irrelevant to this model
            warnings.simplefilter("ignore", UserWarning)
            return importlib.import_module(module_name)
    except ImportError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ActionError(f"quantize.backend {backend} needs {what}, which is not installed here ({detail}).") from None
