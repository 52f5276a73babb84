"""Execute a :class:`~mask2former.tensorrt.plan.BuildPlan` through the TensorRT Python API (TensorRT 10; 8.6
works too).

The ``tensorrt`` module is passed in (``trt=``), so the same code runs against the real package on a GPU
machine and against a recording stand-in in the CPU tests. Calls, in order::

    logger = trt.Logger(trt.Logger.WARNING); builder = trt.Builder(logger)
    network = builder.create_network(flags)          # EXPLICIT_BATCH before TensorRT 10, 0 from 10 on
    parser = trt.OnnxParser(network, logger); parser.parse(onnx_bytes, onnx_file)  # errors listed
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)
    config.set_flag(trt.BuilderFlag.X) / config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile(); profile.set_shape(input, min, opt, max)
    config.add_optimization_profile(profile)
    config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
    layer.precision = trt.float32; layer.set_output_type(i, trt.float32)     # constrained layers
    serialized = builder.build_serialized_network(network, config)

Encryption: the ONNX model is read through :func:`mask2former.crypto.open_model_bytes` (decrypted in
memory with ``encryption_key`` when it is encrypted) and handed to ``OnnxParser.parse(bytes, path)``; the
path only lets TensorRT find weights stored outside the file. The serialized engine is written atomically
with :func:`mask2former.crypto.write_model_bytes`, encrypted with the same key when one is given (the
TensorRT runtime deserializes engines from bytes, so mask2former.runtime.tensorrt_runner decrypts it in
memory). The timing cache holds kernel timings, no weights, and stays plain so TensorRT tools can share it.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import crypto
from ..results import atomic_write_bytes
from .plan import BuildPlan
from .precision import match_layer

log = logging.getLogger(__name__)

NEEDS_GPU = ("gen_trt_engine needs a CUDA GPU with TensorRT installed (requirements-gpu.txt), and this machine has "
             "no CUDA GPU.")
NEEDS_TENSORRT = ("gen_trt_engine needs the tensorrt Python package (TensorRT 10, requirements-gpu.txt), which is not "
                  "installed on this CUDA machine.")


class EngineBuildError(RuntimeError):
    """TensorRT refused the graph or the build; the message lists TensorRT's own errors."""


def require_tensorrt(*, what: str = "gen_trt_engine") -> Any:
    """The ``tensorrt`` module, after checking that a CUDA GPU is present; raises ActionError in one
    sentence otherwise (before anything is read or parsed)."""
    import torch

    from ..errors import ActionError

    if not torch.cuda.is_available():
        raise ActionError(NEEDS_GPU.replace("gen_trt_engine", what))
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise ActionError(NEEDS_TENSORRT.replace("gen_trt_engine", what)) from None


def build_device(gpu_id: int) -> str:
    """The CUDA device an engine is built and checked on (TAO's ``gen_trt_engine.gpu_id``, among the visible
    GPUs); raises ActionError naming the key when there is no such GPU."""
    import torch

    from ..errors import ActionError

    visible = torch.cuda.device_count()
    if gpu_id >= visible:
        numbers = f"0..{visible - 1}; " if visible else ""
        raise ActionError(f"gen_trt_engine.gpu_id {gpu_id} names no GPU: {visible} visible ({numbers}"
                          "CUDA_VISIBLE_DEVICES renumbers them).")
    return f"cuda:{gpu_id}"


def tensorrt_major(trt: Any) -> int:
    try:
        return int(str(getattr(trt, "__version__", "10")).split(".")[0])
    except ValueError:
        return 10


def network_flags(trt: Any) -> int:
    """Explicit batch: a flag before TensorRT 10, the only mode (flag deprecated) from 10 on."""
    if tensorrt_major(trt) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


@dataclass
class BuildOutcome:
    engine_file: str
    engine_bytes: int
    seconds: float
    tensorrt_version: str
    network_layers: int
    constrained_layers: Dict[str, str] = field(default_factory=dict)  # TensorRT layer -> precision
    # planned nodes with no floating-point layer of their name (index/shape nodes of the tensor stage, or
    # nodes TensorRT folded away)
    unconstrained_nodes: List[str] = field(default_factory=list)
    timing_cache: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"engine_file": self.engine_file, "engine_bytes": self.engine_bytes, "seconds": self.seconds,
                "tensorrt_version": self.tensorrt_version, "network_layers": self.network_layers,
                "constrained_layers": len(self.constrained_layers),
                "constrained_by_precision": {p: sum(1 for v in self.constrained_layers.values() if v == p)
                                             for p in ("fp32", "fp16")},
                "unconstrained_nodes": len(self.unconstrained_nodes),
                "unconstrained_examples": self.unconstrained_nodes[:20], "timing_cache": self.timing_cache}


def parse_onnx(trt: Any, *, builder: Any, logger: Any, onnx_file: str,
               encryption_key: Optional[str] = None) -> Tuple[Any, Any]:
    """(network, parser) for ``onnx_file`` (decrypted in memory when encrypted); EngineBuildError listing every
    parser error, or saying that the key does not open the file."""
    try:
        model = crypto.open_model_bytes(onnx_file, encryption_key)
    except crypto.EncryptionError as exc:
        raise EngineBuildError(str(exc)) from None
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model, str(onnx_file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse '{onnx_file}': " + ("; ".join(errors) or "no error given"))
    return network, parser  # the parser owns weights the network refers to: keep both alive


def check_network_input(network: Any, plan: BuildPlan) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = [tensor.name for tensor in inputs]
    if names != [plan.input_name]:
        raise EngineBuildError(f"the parsed network has inputs {names}; the plan expects ['{plan.input_name}']")


def _float_types(trt: Any) -> tuple:
    return tuple(t for t in (getattr(trt, "float32", None), getattr(trt, "float16", None)) if t is not None)


def apply_layer_precisions(trt: Any, network: Any, plan: BuildPlan) -> Dict[str, str]:
    """Constrain the planned layers (layer precision and float output types); returns layer -> precision.

    A layer is constrained when it comes from a planned ONNX node (see
    :func:`~mask2former.tensorrt.precision.match_layer`) and all its outputs are floating point (shape and
    index layers are left alone).
    """
    wanted = plan.precision_by_node
    if not wanted:
        return {}
    dtype = {"fp32": trt.float32, "fp16": trt.float16}
    node_names = set(wanted)
    floats = _float_types(trt)
    applied: Dict[str, str] = {}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        node = match_layer(layer.name, node_names)
        if node is None:
            continue
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not outputs or any(out.dtype not in floats for out in outputs):
            continue
        precision = wanted[node]
        layer.precision = dtype[precision]
        for i in range(layer.num_outputs):
            layer.set_output_type(i, dtype[precision])
        applied[layer.name] = precision
    return applied


def build_engine(plan: BuildPlan, *, trt: Any, engine_file: Optional[str] = None,
                 verbose: bool = False, encryption_key: Optional[str] = None) -> BuildOutcome:
    """Build ``plan`` with the TensorRT module ``trt`` and write the engine to ``engine_file`` (default
    ``plan.engine_file``) and the timing cache to ``plan.timing_cache``. ``encryption_key`` opens an encrypted
    ONNX model and encrypts the engine (see the module docstring). ``verbose`` logs TensorRT's builder at its
    verbose level (TAO's ``gen_trt_engine.verbose``); else warnings and errors. The engine is built on the current
    CUDA device (see :func:`build_device`)."""
    started = time.perf_counter()
    target = Path(engine_file or plan.engine_file)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, parser = parse_onnx(trt, builder=builder, logger=logger, onnx_file=plan.onnx_file,
                                 encryption_key=encryption_key)
    check_network_input(network, plan)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    profile.set_shape(plan.profile.input_name, plan.profile.min, plan.profile.opt, plan.profile.max)
    config.add_optimization_profile(profile)

    cache_info = None
    if plan.timing_cache:
        cache_path = Path(plan.timing_cache)
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
        cache_info = {"path": str(cache_path), "read_bytes": len(blob)}

    constrained = apply_layer_precisions(trt, network, plan)
    matched_nodes = {match_layer(name, set(plan.precision_by_node)) for name in constrained}
    unconstrained = [n for n in plan.precision_by_node if n not in matched_nodes]

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from '{plan.onnx_file}' (see the TensorRT "
                               "messages in the log above)")
    data = bytes(serialized)
    crypto.write_model_bytes(target, data, encryption_key)
    if plan.timing_cache:
        cache_bytes = bytes(config.get_timing_cache().serialize())
        atomic_write_bytes(Path(plan.timing_cache), cache_bytes)
        cache_info["written_bytes"] = len(cache_bytes)
    return BuildOutcome(engine_file=str(target), engine_bytes=len(data), seconds=round(time.perf_counter() - started, 3),
                        tensorrt_version=str(getattr(trt, "__version__", "unknown")),
                        network_layers=int(network.num_layers), constrained_layers=constrained,
                        unconstrained_nodes=unconstrained, timing_cache=cache_info)
