"""Sections of the actions other than train: evaluate, inference, export, quantize, gen_trt_engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .fields import section, spec_field


@dataclass
class EvaluateConfig:
    checkpoint: Optional[str] = spec_field(None, description="Model checkpoint (.pth) or quantized model.",
                                           nullable=True, popular=True)
    onnx_file: Optional[str] = spec_field(None, description="Evaluate an exported ONNX model with onnxruntime.",
                                          nullable=True)
    trt_engine: Optional[str] = spec_field(None, description="Evaluate a TensorRT engine (CUDA GPU).",
                                           nullable=True)
    predictions: Optional[str] = spec_field(
        None, description="Score predictions already on disk instead of running a model: a COCO-panoptic JSON "
                          "(PNGs beside it in a folder of the same stem), a COCO results JSON, or a folder of "
                          "semantic PNGs.", nullable=True)
    batch_size: int = spec_field(-1, description="Images per batch; -1: dataset.val.batch_size (as TAO).",
                                 minimum=-1)
    num_gpus: int = spec_field(1, description="GPUs (CPU when none).", minimum=1)
    gpu_ids: List[int] = spec_field([0], description="GPU indices.", minimum=0)
    num_nodes: int = spec_field(1, description="Nodes.", minimum=1, maximum=1,
                                no_effect="evaluation runs on one node.")
    results_dir: Optional[str] = spec_field(
        None, description="This action's results folder, as TAO's update_results_dir: used when set, else "
                          "<results_dir>/evaluate (--results-dir and the operators name the job folder exactly).",
        nullable=True)
    precision: str = spec_field(
        "fp32", description="Model precision: bf16 autocast for a PyTorch checkpoint on hardware with bf16 units "
                            "(a CUDA GPU; a CPU with AMX or AVX-512-bf16), else fp32; the log says which and why. "
                            "When bf16 is used, evaluate also scores in fp32 and records the difference in "
                            "metrics.json.",
        enum=["fp32", "bf16"])


@dataclass
class InferenceConfig:
    checkpoint: Optional[str] = spec_field(None, description="Model checkpoint (.pth) or quantized model.",
                                           nullable=True, popular=True)
    onnx_file: Optional[str] = spec_field(None, description="Run an exported ONNX model with onnxruntime.",
                                          nullable=True)
    trt_engine: Optional[str] = spec_field(None, description="Run a TensorRT engine (CUDA GPU).", nullable=True)
    batch_size: int = spec_field(-1, description="Images per batch; -1: dataset.test.batch_size (as TAO).",
                                 minimum=-1)
    num_gpus: int = spec_field(1, description="GPUs (CPU when none).", minimum=1)
    gpu_ids: List[int] = spec_field([0], description="GPU indices.", minimum=0)
    num_nodes: int = spec_field(1, description="Nodes.", minimum=1, maximum=1,
                                no_effect="inference runs on one node.")
    results_dir: Optional[str] = spec_field(
        None, description="This action's results folder, as TAO's update_results_dir: used when set, else "
                          "<results_dir>/inference (--results-dir and the operators name the job folder exactly).",
        nullable=True)
    precision: str = spec_field(
        "fp32", description="Model precision: bf16 autocast for a PyTorch checkpoint on hardware with bf16 units "
                            "(a CUDA GPU; a CPU with AMX or AVX-512-bf16), else fp32; the log says which and why.",
        enum=["fp32", "bf16"])
    save_overlays: bool = spec_field(True, description="Write overlay images with a legend beside the "
                                                       "machine-readable outputs.")


@dataclass
class ExportConfig:
    checkpoint: Optional[str] = spec_field(None, description="Checkpoint to export.", nullable=True, popular=True)
    onnx_file: Optional[str] = spec_field(None, description="Output ONNX file (default: results_dir/model.onnx).",
                                          nullable=True)
    opset_version: int = spec_field(17, description="ONNX opset.", minimum=16, maximum=21)
    input_width: int = spec_field(960, description="Input width (multiple of 32).", minimum=32, math_cond="/ 32", multiple_of=32)
    input_height: int = spec_field(544, description="Input height (multiple of 32).", minimum=32, math_cond="/ 32", multiple_of=32)
    input_channel: int = spec_field(3, description="Input channels.", enum=[3])
    batch_size: int = spec_field(-1, description="Batch size; -1 exports a dynamic batch axis.", minimum=-1)
    on_cpu: bool = spec_field(True, description="Trace on the CPU (false: on GPU gpu_id).")
    parity_tolerance: float = spec_field(1e-3, description="Largest allowed max-abs difference between "
                                                           "onnxruntime and PyTorch mask logits.", exclusive_minimum=0)
    gpu_id: int = spec_field(0, description="GPU that traces the model when on_cpu is false.", minimum=0)
    verbose: bool = spec_field(False, description="Print the traced graph while exporting (torch.onnx.export's "
                                                   "verbose).")
    results_dir: Optional[str] = spec_field(
        None, description="This action's results folder, as TAO's update_results_dir: used when set, else "
                          "<results_dir>/export (--results-dir and the operators name the job folder exactly).",
        nullable=True)


@dataclass
class QuantizeLayerDtype:
    dtype: str = spec_field("int8", description="Data type.", enum=["int8", "fp8_e4m3fn", "fp8_e5m2", "native"])
    observer_or_fake_quant: str = spec_field("", description="TAO: observer of the statistics. Accepted for TAO "
                                                             "spec files; the backends here choose their own.")
    quant_axis: Optional[int] = spec_field(None, description="TAO: per-channel axis. Accepted for TAO spec "
                                                             "files; the backends here choose their own.",
                                           nullable=True)
    observer_or_fake_quant_kwargs: Dict[str, Any] = spec_field({}, description="TAO: observer settings. Accepted "
                                                                               "for TAO spec files.")


@dataclass
class QuantizeLayer:
    module_name: str = spec_field("*", description="Module-name pattern (fnmatch), e.g. 'backbone.*' or "
                                                   "'*.linear1'.")
    weights: QuantizeLayerDtype = section(QuantizeLayerDtype, "Weight data type.")
    activations: QuantizeLayerDtype = section(QuantizeLayerDtype, "Activation data type (static_ptq only).")


@dataclass
class QuantizeConfig:
    backend: str = spec_field("torchao", description="Quantization backend.",
                              enum=["torchao", "modelopt.pytorch", "modelopt.onnx"])
    mode: str = spec_field("weight_only_ptq", description="Weight-only or static (calibrated) post-training "
                                                          "quantization.", enum=["weight_only_ptq", "static_ptq"])
    algorithm: str = spec_field(
        "minmax", description="Calibration algorithm (static_ptq).", enum=["minmax", "max", "entropy"],
        unimplemented={name: "AWQ and RTN-DQ are ModelOpt's weight-only algorithms for language models; "
                             "quantize here calibrates with minmax, max or entropy."
                       for name in ("awq_clip", "awq_lite", "awq_full", "rtn_dq")})
    layers: List[QuantizeLayer] = spec_field([], description="Per-module data types; empty: int8 for every "
                                                             "Linear and Conv layer.")
    skip_names: List[str] = spec_field([], description="Module-name patterns left in full precision.")
    model_path: Optional[str] = spec_field(None, description="Checkpoint to quantize.", nullable=True, popular=True)
    device: str = spec_field("cpu", description="Device for calibration and the report's latency: cpu, cuda or "
                                                "cuda:N.")
    backend_kwargs: Dict[str, Any] = spec_field({}, description="Extra keyword arguments of ModelOpt's ONNX "
                                                                "quantize call (backend modelopt.onnx), replacing "
                                                                "the settings chosen here of the same name.")
    results_dir: Optional[str] = spec_field(
        None, description="This action's results folder, as TAO's update_results_dir: used when set, else "
                          "<results_dir>/quantize (--results-dir and the operators name the job folder exactly).",
        nullable=True)


@dataclass
class TensorRTConfig:
    data_type: str = spec_field("FP32", description="Engine precision (INT8 is not supported for Mask2Former).",
                                enum=["FP32", "FP16", "INT8"])
    workspace_size: int = spec_field(1024, description="Builder workspace in MB.", minimum=1)
    min_batch_size: int = spec_field(1, description="Optimisation profile: smallest batch.", minimum=1)
    opt_batch_size: int = spec_field(1, description="Optimisation profile: batch tuned for.", minimum=1)
    max_batch_size: int = spec_field(1, description="Optimisation profile: largest batch.", minimum=1)
    layers_precision: List[str] = spec_field(
        [], description="Per-layer precision, 'layer_name_pattern:fp32|fp16' (FP16 engines).")


@dataclass
class GenTrtEngineConfig:
    onnx_file: Optional[str] = spec_field(None, description="ONNX model to build from.", nullable=True, popular=True)
    trt_engine: Optional[str] = spec_field(None, description="Output engine (default: results_dir/model.engine).",
                                           nullable=True)
    timing_cache: Optional[str] = spec_field(None, description="Timing cache file, read and updated.",
                                             nullable=True)
    batch_size: int = spec_field(-1, description="Batch size of the parity check inputs (-1: opt_batch_size).",
                                 minimum=-1)
    gpu_id: int = spec_field(0, description="The GPU (among the visible ones) that builds and checks the engine.",
                             minimum=0)
    verbose: bool = spec_field(False, description="Log TensorRT's builder at its verbose level (else warnings "
                                                  "and errors).")
    results_dir: Optional[str] = spec_field(
        None, description="This action's results folder, as TAO's update_results_dir: used when set, else "
                          "<results_dir>/gen_trt_engine (--results-dir and the operators name the job folder exactly).",
        nullable=True)
    tensorrt: TensorRTConfig = section(TensorRTConfig, "TensorRT builder settings.")
