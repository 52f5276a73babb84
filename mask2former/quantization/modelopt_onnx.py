"""NVIDIA ModelOpt ONNX post-training quantization: an exported model -> a Q/DQ ONNX model.

The chosen Linear/Conv modules (mask2former.quantization.selection) are mapped to the MatMul/Gemm/Conv
nodes of the exported graph through the node names' scopes (``/model/backbone/layers.0/blocks.0/attn/
qkv/MatMul`` belongs to module ``backbone.layers.0.blocks.0.attn.qkv``) and passed as
``nodes_to_quantize``, so the same modules are quantized as with the PyTorch backends. Weights are stored
as int8/fp8 with DequantizeLinear only (``dq_only``), activations get Quantize/DequantizeLinear pairs
calibrated on the calibration images with onnxruntime on the CPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import onnx

from .selection import ModuleChoice

NETWORK_SCOPE = "/model/"  # InferenceModel wraps the network as ``self.model``
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
CALIBRATION_METHODS = {"minmax": "max", "max": "max", "entropy": "entropy"}
MODES = {"int8": "int8", "fp8_e4m3fn": "fp8"}


def node_module(node_name: str) -> Optional[str]:
    """The network module a node of the exported graph belongs to, or None outside the network."""
    if not node_name.startswith(NETWORK_SCOPE):
        return None
    parts = node_name[len(NETWORK_SCOPE):].split("/")
    return ".".join(parts[:-1]) if len(parts) > 1 else None


def nodes_for_modules(model: onnx.ModelProto, modules: Sequence[str]) -> List[str]:
    """Names of the weight nodes (MatMul/Gemm/Conv) of ``modules`` in graph order."""
    wanted = set(modules)
    return [node.name for node in model.graph.node if node.op_type in WEIGHT_OPS and node_module(node.name) in wanted]


def quantize_mode(chosen: Dict[str, ModuleChoice]) -> str:
    """int8 or fp8: ModelOpt's ONNX quantization applies one data type to the whole graph."""
    dtypes = {choice.weights for choice in chosen.values()} | {choice.activations for choice in chosen.values()}
    dtypes.discard(None)
    unsupported = dtypes - set(MODES)
    if unsupported:
        raise ValueError(f"quantize.backend modelopt.onnx supports int8 and fp8_e4m3fn; got {sorted(unsupported)}")
    if len(dtypes) > 1:
        raise ValueError(f"quantize.backend modelopt.onnx applies one data type to every layer; quantize.layers asks "
                         f"for {sorted(dtypes)}")
    return MODES[dtypes.pop()] if dtypes else "int8"


# Arguments of ModelOpt's quantize call that name this job's files and data: never taken from backend_kwargs.
RESERVED_ARGUMENTS = ("onnx_path", "output_path", "calibration_data")


def quantize_onnx(source: Union[str, Path], destination: Union[str, Path], *, chosen: Dict[str, ModuleChoice],
                  calibration: np.ndarray, input_name: str, algorithm: str, moq: Any,
                  backend_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write the Q/DQ model of ``source`` to ``destination``; returns what was asked of ModelOpt.

    ``backend_kwargs`` (quantize.backend_kwargs, as in TAO) are passed on to ModelOpt's quantize call and
    replace the settings chosen here of the same name.
    """
    extra = dict(backend_kwargs or {})
    reserved = sorted(set(extra) & set(RESERVED_ARGUMENTS))
    if reserved:
        raise ValueError(f"quantize.backend_kwargs {reserved} name this job's files and data, which quantize sets "
                         "itself; remove them.")
    model = onnx.load(str(source))
    nodes = nodes_for_modules(model, list(chosen))
    if not nodes:
        raise ValueError("none of the chosen modules has a MatMul/Gemm/Conv node in the exported graph")
    mode = quantize_mode(chosen)
    method = CALIBRATION_METHODS[algorithm]
    settings = {"quantize_mode": mode, "calibration_method": method, "calibration_eps": ["cpu"],
                "nodes_to_quantize": [f"^{re.escape(name)}$" for name in nodes], "dq_only": True,
                "high_precision_dtype": "fp32", "log_level": "WARNING", **extra}
    moq.quantize(str(source), calibration_data={input_name: calibration}, output_path=str(destination), **settings)
    return {"quantize_mode": settings["quantize_mode"], "calibration_method": settings["calibration_method"],
            "nodes_to_quantize": len(nodes), "calibration_images": int(calibration.shape[0]),
            **({"backend_kwargs": extra} if extra else {})}
