"""Run a quantized model (runner kind ``quantized``): ``quantized_model_<backend>.pth`` is rebuilt with its
backend (mask2former.quantization.artifact) and served like a checkpoint; ``quantized_model_modelopt_onnx.onnx``
(Q/DQ ONNX) is served by onnxruntime. Encrypted files are opened in memory with the spec's ``encryption_key``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from ..errors import ActionError
from ..checkpoint import CheckpointError
from .onnx_runner import OnnxRunner
from .torch_runner import TorchRunner


def load(path: Union[str, Path], config: Any, device: torch.device):
    """Runner loader of kind 'quantized' (see mask2former.runtime.load_runner)."""
    encryption_key = getattr(config, "encryption_key", None)
    if Path(path).suffix.lower() == ".onnx":
        return OnnxRunner(path, device=device, encryption_key=encryption_key)
    from ..quantization.artifact import load_quantized

    try:
        model, model_cfg, _ = load_quantized(path, getattr(config, "model", None), encryption_key=encryption_key)
    except (CheckpointError, ValueError) as exc:
        raise ActionError(f"'{path}' cannot be loaded as a quantized model: {exc}") from exc
    return TorchRunner(model, model_cfg=model_cfg, device=device)
