"""The build plan of a TensorRT engine: everything the builder will ask TensorRT to do, decided in plain
Python from the spec and the ONNX file, so it can be checked without a GPU.

- input: the ONNX graph's single image input, ``[B, C, H, W]`` with fixed C, H, W;
- optimisation profile: batch min/opt/max from ``tensorrt.min/opt/max_batch_size`` when the ONNX batch
  axis is dynamic; exactly the exported batch when it is fixed;
- precision: FP32 (TF32 turned off, so the engine reproduces onnxruntime's FP32 numbers) or FP16
  (``BuilderFlag.FP16`` + ``OBEY_PRECISION_CONSTRAINTS``, and FP32 for the layers of
  :mod:`mask2former.tensorrt.precision`);
- workspace: ``workspace_size`` MB as the WORKSPACE memory-pool limit in bytes;
- timing cache: read before the build when the file exists, written after it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import onnx

from .precision import LayerPrecision, graph_nodes, resolve_layer_precisions

PRECISIONS = ("FP32", "FP16")
MB = 1 << 20
# Largest max-abs difference between the engine and onnxruntime that the build accepts, per precision.
# FP32 engines (TF32 off) match to float rounding; FP16 engines only to FP16 rounding of the unprotected
# layers, so FP16 gates the probability outputs and reports the logits.
PARITY_TOLERANCE = {"FP32": 1e-3, "FP16": 2e-2}
FP16_GATED_OUTPUTS = ("sem_scores", "pan_scores", "pan_mask_probs", "inst_scores")


class PlanError(ValueError):
    """The ONNX file or the spec cannot make an engine; the message names the key or the file."""


@dataclass
class ShapeProfile:
    """One optimisation profile of the image input: full [B, C, H, W] shapes."""

    input_name: str
    min: Tuple[int, int, int, int]
    opt: Tuple[int, int, int, int]
    max: Tuple[int, int, int, int]


@dataclass
class BuildPlan:
    onnx_file: str
    engine_file: str
    input_name: str
    input_shape: List[Union[int, str]]
    output_names: List[str]
    profile: ShapeProfile
    precision: str
    builder_flags: List[str]
    cleared_flags: List[str]
    workspace_bytes: int
    timing_cache: Optional[str]
    layer_precisions: List[LayerPrecision] = field(default_factory=list)
    parity_batch: int = 1
    parity_tolerance: float = 1e-3
    parity_gated: Optional[List[str]] = None
    notes: List[str] = field(default_factory=list)

    @property
    def dynamic_batch(self) -> bool:
        return not isinstance(self.input_shape[0], int)

    @property
    def precision_by_node(self) -> Dict[str, str]:
        return {item.node: item.precision for item in self.layer_precisions}

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["dynamic_batch"] = self.dynamic_batch
        out["layer_precisions"] = [asdict(item) for item in self.layer_precisions]
        out["layer_precision_counts"] = {p: sum(1 for i in self.layer_precisions if i.precision == p)
                                         for p in ("fp32", "fp16")}
        return out


def _shape(value: onnx.ValueInfoProto) -> List[Union[int, str]]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def image_input(model: onnx.ModelProto, *, path: str) -> Tuple[str, List[Union[int, str]]]:
    """(name, shape) of the graph's one non-initialiser input, checked to be [B, C, H, W] with fixed C, H, W."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise PlanError(f"'{path}' has {len(inputs)} inputs ({[v.name for v in inputs]}); expected one image input")
    shape = _shape(inputs[0])
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise PlanError(f"'{path}' input '{inputs[0].name}' has shape {shape}; expected [batch, channels, height, "
                        "width] with fixed channels, height and width (export with export.input_height/width)")
    return inputs[0].name, shape


def batch_range(shape: List[Union[int, str]], *, tensorrt: Any) -> Tuple[int, int, int, List[str]]:
    """(min, opt, max, notes) of the batch axis."""
    notes = []
    if isinstance(shape[0], int) and shape[0] > 0:
        fixed = shape[0]
        asked = (tensorrt.min_batch_size, tensorrt.opt_batch_size, tensorrt.max_batch_size)
        if asked != (fixed, fixed, fixed):
            notes.append(f"the ONNX batch axis is fixed at {fixed}: the profile uses {fixed} for min/opt/max "
                         f"instead of tensorrt.min/opt/max_batch_size {list(asked)}")
        return fixed, fixed, fixed, notes
    if not tensorrt.min_batch_size <= tensorrt.opt_batch_size <= tensorrt.max_batch_size:
        raise PlanError("gen_trt_engine.tensorrt batch sizes must satisfy min_batch_size <= opt_batch_size <= "
                        f"max_batch_size; got {tensorrt.min_batch_size}, {tensorrt.opt_batch_size}, "
                        f"{tensorrt.max_batch_size}")
    return tensorrt.min_batch_size, tensorrt.opt_batch_size, tensorrt.max_batch_size, notes


def make_build_plan(gen_cfg: Any, *, onnx_file: Union[str, Path], engine_file: Union[str, Path],
                    onnx_model: Optional[onnx.ModelProto] = None) -> BuildPlan:
    """The plan for ``gen_trt_engine`` (the spec section) building ``onnx_file`` into ``engine_file``."""
    path = str(onnx_file)
    model = onnx_model if onnx_model is not None else onnx.load(path, load_external_data=False)
    trt_cfg = gen_cfg.tensorrt
    precision = str(trt_cfg.data_type).upper()
    if precision not in PRECISIONS:
        raise PlanError(f"gen_trt_engine.tensorrt.data_type {trt_cfg.data_type!r} is not supported for Mask2Former "
                        f"engines; expected one of {list(PRECISIONS)}")
    input_name, shape = image_input(model, path=path)
    low, opt, high, notes = batch_range(shape, tensorrt=trt_cfg)
    chw = tuple(int(d) for d in shape[1:])
    profile = ShapeProfile(input_name=input_name, min=(low,) + chw, opt=(opt,) + chw, max=(high,) + chw)
    fp16 = precision == "FP16"
    try:
        layers = resolve_layer_precisions(graph_nodes(model), fp16=fp16, patterns=list(trt_cfg.layers_precision))
    except ValueError as exc:
        raise PlanError(str(exc)) from exc
    outputs = [o.name for o in model.graph.output]
    parity_batch = opt if gen_cfg.batch_size == -1 else int(gen_cfg.batch_size)
    if not low <= parity_batch <= high:
        raise PlanError(f"gen_trt_engine.batch_size {gen_cfg.batch_size} is outside the engine's batch range "
                        f"{low}..{high}")
    return BuildPlan(
        onnx_file=path, engine_file=str(engine_file), input_name=input_name, input_shape=shape,
        output_names=outputs, profile=profile, precision=precision,
        builder_flags=["FP16", "OBEY_PRECISION_CONSTRAINTS"] if fp16 else [],
        cleared_flags=[] if fp16 else ["TF32"], workspace_bytes=int(trt_cfg.workspace_size) * MB,
        timing_cache=str(gen_cfg.timing_cache) if gen_cfg.timing_cache else None, layer_precisions=layers,
        parity_batch=parity_batch, parity_tolerance=PARITY_TOLERANCE[precision],
        parity_gated=[n for n in FP16_GATED_OUTPUTS if n in outputs] if fp16 else None, notes=notes,
    )
