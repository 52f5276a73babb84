"""Trace an :class:`~mask2former.runtime.inference_model.InferenceModel` into an ONNX file.

The graph has one input, ``inputs`` float32 [B, C, H, W] (normalised images), and the named outputs of
:func:`~mask2former.runtime.inference_model.output_names` for the model's mode. The batch axis is
dynamic when ``batch_size`` is -1; H and W are fixed (the deformable attention's level shapes and the
position embeddings are computed from them at trace time).

Exporter choice: the TorchScript-based exporter (``dynamo=False``). It traces this model unchanged (the
decoder uses additive float attention masks, MSDeformAttn samples with 4-D float32 ``grid_sample``,
post-processing has no data-dependent shapes) and its graph matches PyTorch in onnxruntime to about
1e-6 (measured, opset 17). The dynamo exporter needs ``onnxscript``, which is not a requirement of this
project, and is the one that fails on data-dependent checks for the Hugging Face port of this model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import onnx
import torch

from .metadata import ModelRecord, write_record

INPUT_NAME = "inputs"
BATCH_AXIS = "batch"
Dim = Union[int, str]


@dataclass
class ExportedGraph:
    """Names and shapes of an exported graph (``batch`` marks the dynamic axis)."""

    path: Path
    opset_version: int
    input_name: str
    input_shape: List[Dim]
    output_names: List[str]
    output_shapes: Dict[str, List[Dim]] = field(default_factory=dict)

    @property
    def dynamic_batch(self) -> bool:
        return self.input_shape[0] == BATCH_AXIS


def trace_batch(batch_size: int) -> int:
    """The batch traced: the fixed size, or 2 for a dynamic axis (so no size-1 broadcast is baked in)."""
    return 2 if batch_size == -1 else int(batch_size)


def export_onnx(model: torch.nn.Module, path: Union[str, Path], *, output_names: Sequence[str], input_height: int,
                input_width: int, input_channel: int = 3, batch_size: int = -1, opset_version: int = 17,
                device: Union[str, torch.device] = "cpu", record: Optional[ModelRecord] = None,
                verbose: bool = False) -> ExportedGraph:
    """Write ``model`` (images -> dict of ``output_names`` tensors) to ``path`` as ONNX.

    Output shapes in the file are set from a PyTorch run of the traced batch (with ``batch`` as the
    first dimension when dynamic), so consumers such as TensorRT see static H/W sizes.
    """
    if batch_size == 0 or batch_size < -1:
        raise ValueError(f"export.batch_size must be -1 (dynamic) or >= 1; got {batch_size}")
    path = Path(path)
    device = torch.device(device)
    model = model.to(device).eval()
    sample = torch.zeros(trace_batch(batch_size), input_channel, input_height, input_width, device=device)
    names = list(output_names)
    dynamic_axes = None
    if batch_size == -1:
        dynamic_axes = {INPUT_NAME: {0: BATCH_AXIS}, **{name: {0: BATCH_AXIS} for name in names}}
    with torch.no_grad():
        reference = model(sample)
    if list(reference) != names:
        raise ValueError(f"the model returns {list(reference)}, expected the outputs {names} in that order")
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python int taken from a shape; those sizes are meant to be fixed.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(model, (sample,), str(path), input_names=[INPUT_NAME], output_names=names,
                          opset_version=opset_version, dynamic_axes=dynamic_axes, do_constant_folding=True,
                          dynamo=False, verbose=verbose)
    batch_dim: Dim = BATCH_AXIS if batch_size == -1 else int(batch_size)
    shapes = {name: [batch_dim] + list(reference[name].shape[1:]) for name in names}
    graph = onnx.load(str(path))
    _set_output_shapes(graph, shapes)
    if record is not None:
        write_record(graph, record)
    onnx.save(graph, str(path))
    return ExportedGraph(path=path, opset_version=opset_version, input_name=INPUT_NAME,
                         input_shape=[batch_dim, input_channel, input_height, input_width], output_names=names,
                         output_shapes=shapes)


def _set_output_shapes(model: onnx.ModelProto, shapes: Dict[str, List[Dim]]) -> None:
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        wanted = shapes[output.name]
        del dims[:]
        for value in wanted:
            dim = dims.add()
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = int(value)


def graph_io(path: Union[str, Path]) -> Dict[str, Dict[str, List[Dim]]]:
    """{"inputs": {name: shape}, "outputs": {name: shape}} of an ONNX file (symbolic dims as names)."""
    model = onnx.load(str(path), load_external_data=False)

    def shape_of(value: onnx.ValueInfoProto) -> List[Dim]:
        return [d.dim_param if d.dim_param else int(d.dim_value) for d in value.type.tensor_type.shape.dim]

    initializers = {init.name for init in model.graph.initializer}
    return {"inputs": {v.name: shape_of(v) for v in model.graph.input if v.name not in initializers},
            "outputs": {v.name: shape_of(v) for v in model.graph.output}}
