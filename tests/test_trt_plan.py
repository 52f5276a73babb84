"""TensorRT build plan and builder, checked on the CPU against a STAND-IN for the ``tensorrt`` module.

TensorRT cannot be installed on these machines (see REFERENCE.md), so the builder is exercised with
:class:`StandInTensorRT`, a small fake of the TensorRT 10 Python API that records every call the builder
makes (flags, memory pool, optimisation profile, timing cache, per-layer precisions). It is a stand-in:
it builds nothing and proves only that the builder drives the documented API as planned. The real
build and parity tests are in tests/gpu/ and skip without a CUDA GPU and TensorRT.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List

import onnx
import pytest
import torch

from evaluation_support import tiny_model_overrides
from mask2former import results
from mask2former.actions.job import ActionError
from mask2former.cli import main
from mask2former.config import load_spec
from mask2former.export.onnx_export import export_onnx
from mask2former.model import build_model
from mask2former.runtime.inference_model import InferenceModel, output_names
from mask2former.runtime.tensorrt_runner import TensorRTRunner, describe_engine, torch_dtype
from mask2former.tensorrt.builder import EngineBuildError, build_engine, network_flags
from mask2former.tensorrt.plan import MB, PlanError, make_build_plan
from mask2former.tensorrt.precision import graph_nodes, match_layer, resolve_layer_precisions

SIZE = 64
INTEGER_OPS = {"Shape", "ArgMax", "TopK", "NonZero", "Range", "Equal", "Less", "Not", "And"}


# ------------------------------------------------------------------ the stand-in tensorrt module
class _Tensor:
    def __init__(self, name: str, dtype: Any, shape=()) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape


class _Layer:
    def __init__(self, name: str, op_type: str, dtype: Any) -> None:
        self.name, self.op_type = name, op_type
        self.outputs = [_Tensor(f"{name}_out", dtype)]
        self.precision = None
        self.output_types = {}

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_output(self, index: int) -> _Tensor:
        return self.outputs[index]

    def set_output_type(self, index: int, dtype: Any) -> None:
        self.output_types[index] = dtype


class StandInTensorRT:
    """Stand-in for ``import tensorrt`` (TensorRT 10 API surface used by the builder); records calls."""

    float32, float16, int32, int64 = "float32", "float16", "int32", "int64"
    Logger = type("Logger", (), {"WARNING": "WARNING", "VERBOSE": "VERBOSE",
                                 "__init__": lambda self, level=None: setattr(self, "level", level)})
    NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0)
    MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    BuilderFlag = SimpleNamespace(FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY_PRECISION_CONSTRAINTS", TF32="TF32")
    DataType = SimpleNamespace(FLOAT="float32", HALF="float16", INT32="int32", INT64="int64", BOOL="bool")
    TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    def __init__(self, version: str = "10.3.0", parse_errors: List[str] = (), build_fails: bool = False) -> None:
        self.__version__ = version
        self.calls: List[tuple] = []
        self.parse_errors = list(parse_errors)
        self.build_fails = build_fails
        self.networks: List[Any] = []
        self.parsed: List[bytes] = []  # the serialized models handed to OnnxParser.parse
        standin = self

        class Builder:
            def __init__(self, logger) -> None:
                standin.calls.append(("Builder", logger.level))

            def create_network(self, flags):
                standin.calls.append(("create_network", flags))
                network = SimpleNamespace(inputs=[], layers=[])
                network.get_input = lambda i: network.inputs[i]
                network.get_layer = lambda i: network.layers[i]
                standin.networks.append(network)
                return network

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                standin.calls.append(("build_serialized_network", len(network.layers)))
                return None if standin.build_fails else b"stand-in engine"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                standin.calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag):
                standin.calls.append(("set_flag", flag))

            def clear_flag(self, flag):
                standin.calls.append(("clear_flag", flag))

            def add_optimization_profile(self, profile):
                standin.calls.append(("add_optimization_profile", profile.shapes))

            def create_timing_cache(self, blob):
                standin.calls.append(("create_timing_cache", bytes(blob)))
                self.cache = SimpleNamespace(serialize=lambda: bytes(blob) + b"+new timings")
                return self.cache

            def set_timing_cache(self, cache, ignore_mismatch):
                standin.calls.append(("set_timing_cache", ignore_mismatch))

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def set_shape(self, name, low, opt, high):
                self.shapes = (name, tuple(low), tuple(opt), tuple(high))

        class OnnxParser:
            def __init__(self, network, logger) -> None:
                self.network = network
                self.num_errors = 0

            def parse(self, model, path=None):
                standin.calls.append(("parse", path))
                standin.parsed.append(bytes(model))
                if standin.parse_errors:
                    self.num_errors = len(standin.parse_errors)
                    return False
                model = onnx.load_model_from_string(bytes(model))
                initializers = {i.name for i in model.graph.initializer}
                self.network.inputs = [_Tensor(v.name, "float32") for v in model.graph.input
                                       if v.name not in initializers]
                for node in model.graph.node:
                    dtype = "int64" if node.op_type in INTEGER_OPS else "float32"
                    self.network.layers.append(_Layer(node.name, node.op_type, dtype))
                    if node.op_type == "LayerNormalization":  # a node expanding into two layers
                        self.network.layers.append(_Layer(f"{node.name}_scale", node.op_type, dtype))
                self.network.num_inputs = len(self.network.inputs)
                self.network.num_layers = len(self.network.layers)
                return True

            def get_error(self, index):
                return standin.parse_errors[index]

        self.Builder, self.OnnxParser = Builder, OnnxParser


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """A tiny panoptic model exported with a dynamic batch (no simplification: node names as exported)."""
    config = load_spec("export", overrides=tiny_model_overrides("panoptic", **{"export.checkpoint": "x.pth"}))
    torch.manual_seed(0)
    model = InferenceModel(build_model(config.model).eval(), mode="panoptic", topk=10)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path, output_names=model.output_names, input_height=SIZE, input_width=SIZE, batch_size=-1)
    return path


def _section(**overrides):
    words = {"gen_trt_engine.onnx_file": "model.onnx", **overrides}
    return load_spec("gen_trt_engine", overrides=words).gen_trt_engine


def _plan(onnx_file, tmp_path, **overrides):
    return make_build_plan(_section(**overrides), onnx_file=onnx_file, engine_file=tmp_path / "model.engine")


# ------------------------------------------------------------------ plan
def test_fp32_plan_turns_tf32_off_and_constrains_nothing(onnx_file, tmp_path):
    plan = _plan(onnx_file, tmp_path, **{"gen_trt_engine.tensorrt.max_batch_size": 4,
                                         "gen_trt_engine.tensorrt.opt_batch_size": 2})
    assert plan.precision == "FP32" and plan.builder_flags == [] and plan.cleared_flags == ["TF32"]
    assert plan.workspace_bytes == 1024 * MB == 1073741824
    assert plan.input_name == "inputs" and plan.dynamic_batch
    assert (plan.profile.min, plan.profile.opt, plan.profile.max) == ((1, 3, SIZE, SIZE), (2, 3, SIZE, SIZE),
                                                                     (4, 3, SIZE, SIZE))
    assert plan.layer_precisions == [] and plan.parity_batch == 2 and plan.parity_tolerance == 1e-3
    assert plan.output_names == list(output_names("panoptic")) and plan.timing_cache is None


def test_fp16_plan_keeps_sensitive_layers_in_fp32(onnx_file, tmp_path):
    plan = _plan(onnx_file, tmp_path, **{"gen_trt_engine.tensorrt.data_type": "FP16",
                                         "gen_trt_engine.tensorrt.workspace_size": 256})
    assert plan.builder_flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and plan.cleared_flags == []
    assert plan.workspace_bytes == 256 * MB
    fp32 = {item.node: item for item in plan.layer_precisions if item.precision == "fp32"}
    nodes = graph_nodes(onnx.load(str(onnx_file)))
    by_op = {}
    for node in nodes:
        by_op.setdefault(node.op_type, []).append(node.name)
    for op in ("Softmax", "LayerNormalization", "InstanceNormalization", "GridSample", "Sigmoid"):
        assert by_op.get(op), f"the tiny graph has no {op} node"
        assert all(name in fp32 for name in by_op[op]), op
    network_matmuls = [n for n in by_op["MatMul"] if n.startswith("/model/")]
    mask_heads = [n for n in network_matmuls if fp32.get(n) and fp32[n].reason.startswith("mask head")]
    assert mask_heads and all("/mask_embed/" not in n for n in mask_heads)
    assert any(n not in fp32 for n in network_matmuls)  # ordinary projections run in FP16
    assert all(fp32[n].reason == "post-processing tensor stage" for n in fp32 if not n.startswith("/model/"))
    assert plan.parity_tolerance == 2e-2 and "sem_scores" in plan.parity_gated
    assert "inst_mask_logits" not in plan.parity_gated


def test_user_patterns_override_the_rules_and_must_match(onnx_file, tmp_path):
    plan = _plan(onnx_file, tmp_path, **{"gen_trt_engine.tensorrt.data_type": "FP16",
                                         "gen_trt_engine.tensorrt.layers_precision":
                                             ["/model/backbone/*qkv*:fp32", "/model/pixel_decoder/*/Softmax:fp16"]})
    by_node = {item.node: item for item in plan.layer_precisions}
    qkv = [n for n in by_node if fnmatch.fnmatchcase(n, "/model/backbone/*qkv*")]
    assert qkv and all(by_node[n].precision == "fp32" and "layers_precision" in by_node[n].reason for n in qkv)
    softmax = [n for n in by_node if fnmatch.fnmatchcase(n, "/model/pixel_decoder/*/Softmax")]
    assert softmax and all(by_node[n].precision == "fp16" for n in softmax)
    with pytest.raises(PlanError, match="'/nowhere/\\*' matches no node"):
        _plan(onnx_file, tmp_path, **{"gen_trt_engine.tensorrt.data_type": "FP16",
                                      "gen_trt_engine.tensorrt.layers_precision": ["/nowhere/*:fp32"]})
    with pytest.raises(PlanError, match="FP16 engines only"):
        _plan(onnx_file, tmp_path, **{"gen_trt_engine.tensorrt.layers_precision": ["*:fp32"]})


def test_normalisation_divisions_and_mask_head_are_found_structurally():
    node = lambda name, op, inputs, outputs: SimpleNamespace(name=name, op_type=op, inputs=inputs, outputs=outputs)
    nodes = [node("/model/a/ReduceMean", "ReduceMean", ("x",), ("m",)), node("/model/a/Add", "Add", ("m", "eps"), ("s",)),
             node("/model/a/Div", "Div", ("x", "s"), ("y",)), node("/model/b/Div", "Div", ("x", "two"), ("z",)),
             node("/model/d/mask_embed/layers.2/Add", "Add", ("e", "b"), ("emb",)),
             node("/model/d/MatMul", "MatMul", ("emb", "feat"), ("masks",)),
             node("/model/d/MatMul_1", "MatMul", ("q", "k"), ("att",))]
    chosen = {item.node: item.reason for item in resolve_layer_precisions(nodes, fp16=True)}
    assert chosen == {"/model/a/ReduceMean": "op type ReduceMean",
                      "/model/a/Div": "division by normalisation statistics",
                      "/model/d/MatMul": "mask head (mask embeddings x pixel features)"}


def test_fixed_batch_graph_fixes_the_profile(tmp_path, onnx_file):
    model = onnx.load(str(onnx_file))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    plan = make_build_plan(_section(**{"gen_trt_engine.tensorrt.max_batch_size": 8}), onnx_file="fixed.onnx",
                           engine_file=tmp_path / "e", onnx_model=model)
    assert plan.profile.min[0] == plan.profile.opt[0] == plan.profile.max[0] == 2 and not plan.dynamic_batch
    assert plan.parity_batch == 2
    assert "fixed at 2" in plan.notes[0]


def test_parity_batch_outside_the_profile_is_refused(onnx_file, tmp_path):
    with pytest.raises(PlanError, match="batch_size 3 is outside the engine's batch range 1..2"):
        _plan(onnx_file, tmp_path, **{"gen_trt_engine.tensorrt.max_batch_size": 2, "gen_trt_engine.batch_size": 3})


def test_layer_names_map_back_to_their_nodes():
    nodes = {"/Div", "/Div_1", "/model/ln/LayerNormalization"}
    assert match_layer("/Div", nodes) == "/Div"
    assert match_layer("/Div_1", nodes) == "/Div_1"
    assert match_layer("/Div_2", nodes) is None  # a numeric suffix is another node
    assert match_layer("/Div_1_output_cast", nodes) == "/Div_1"
    assert match_layer("/model/ln/LayerNormalization_scale", nodes) == "/model/ln/LayerNormalization"
    assert match_layer("(Unnamed Layer* 3) [Shuffle]", nodes) is None


# ------------------------------------------------------------------ builder against the stand-in
def test_stand_in_tensorrt_records_an_fp16_build_as_planned(onnx_file, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old timings")
    plan = _plan(onnx_file, tmp_path, **{"gen_trt_engine.tensorrt.data_type": "FP16",
                                         "gen_trt_engine.tensorrt.max_batch_size": 4,
                                         "gen_trt_engine.timing_cache": str(cache)})
    trt = StandInTensorRT()
    outcome = build_engine(plan, trt=trt)
    calls = trt.calls
    assert calls[0] == ("Builder", "WARNING") and ("create_network", 0) in calls
    assert ("parse", str(onnx_file)) in calls and trt.parsed == [Path(onnx_file).read_bytes()]
    assert ("set_memory_pool_limit", "WORKSPACE", 1024 * MB) in calls
    assert [c[1] for c in calls if c[0] == "set_flag"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert not [c for c in calls if c[0] == "clear_flag"]
    assert ("add_optimization_profile", ("inputs", (1, 3, SIZE, SIZE), (1, 3, SIZE, SIZE), (4, 3, SIZE, SIZE))) in calls
    assert ("create_timing_cache", b"old timings") in calls and ("set_timing_cache", False) in calls
    assert calls[-1][0] == "build_serialized_network"
    assert Path(plan.engine_file).read_bytes() == b"stand-in engine"
    assert cache.read_bytes() == b"old timings+new timings"
    assert outcome.timing_cache == {"path": str(cache), "read_bytes": 11, "written_bytes": 23}

    layers = {layer.name: layer for layer in trt.networks[0].layers}
    wanted = plan.precision_by_node
    softmax = next(n for n in wanted if n.endswith("/Softmax") and n.startswith("/model/"))
    assert layers[softmax].precision == "float32" and layers[softmax].output_types == {0: "float32"}
    norm = next(n for n in wanted if n.endswith("LayerNormalization"))
    assert layers[f"{norm}_scale"].precision == "float32"  # the extra layer of an expanded node
    plain = next(n for n in layers if n.startswith("/model/backbone") and n.endswith("qkv/MatMul"))
    assert layers[plain].precision is None  # left to the builder (FP16 allowed)
    topk = next(n for n in layers if layers[n].op_type == "TopK")
    assert topk in wanted and layers[topk].precision is None  # integer outputs are never constrained
    assert topk in outcome.unconstrained_nodes
    assert outcome.constrained_layers[softmax] == "fp32" and outcome.engine_bytes == len(b"stand-in engine")


def test_stand_in_tensorrt_fp32_build_clears_tf32(onnx_file, tmp_path):
    trt = StandInTensorRT()
    outcome = build_engine(_plan(onnx_file, tmp_path), trt=trt)
    assert ("clear_flag", "TF32") in trt.calls and not [c for c in trt.calls if c[0] == "set_flag"]
    assert not [c for c in trt.calls if c[0] == "create_timing_cache"]
    assert outcome.constrained_layers == {} and outcome.timing_cache is None


def test_stand_in_tensorrt_8_gets_the_explicit_batch_flag():
    assert network_flags(StandInTensorRT(version="8.6.1")) == 1 << 0
    assert network_flags(StandInTensorRT(version="10.3.0")) == 0


def test_stand_in_parser_errors_are_listed_and_nothing_is_written(onnx_file, tmp_path):
    plan = _plan(onnx_file, tmp_path)
    trt = StandInTensorRT(parse_errors=["node /x: unsupported op Foo", "node /y: bad shape"])
    with pytest.raises(EngineBuildError, match="unsupported op Foo; node /y: bad shape"):
        build_engine(plan, trt=trt)
    assert not Path(plan.engine_file).exists()
    with pytest.raises(EngineBuildError, match="could not build an engine"):
        build_engine(plan, trt=StandInTensorRT(build_fails=True))
    assert not Path(plan.engine_file).exists()


# ------------------------------------------------------------------ runner pieces against the stand-in
def test_stand_in_engine_description_gives_size_batch_and_mode():
    trt = StandInTensorRT()
    names = ["inputs"] + list(output_names("instance"))
    engine = SimpleNamespace(num_io_tensors=len(names), get_tensor_name=lambda i: names[i],
                             get_tensor_mode=lambda n: "INPUT" if n == "inputs" else "OUTPUT",
                             get_tensor_profile_shape=lambda n, p: [(1, 3, 96, 128), (2, 3, 96, 128), (4, 3, 96, 128)])
    io = describe_engine(engine, trt)
    assert io.fixed_input_size == (96, 128) and io.max_shape[0] == 4 and io.min_shape[0] == 1
    assert io.mode == "instance" and io.input_name == "inputs"
    assert torch_dtype(trt, "int64") == torch.int64 and torch_dtype(trt, "float16") == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal; this machine has CUDA")
def test_tensorrt_runner_on_a_cpu_machine_says_what_it_needs(tmp_path):
    with pytest.raises(ActionError, match="needs a CUDA GPU and the tensorrt package"):
        TensorRTRunner(tmp_path / "model.engine", device="cpu", trt=StandInTensorRT())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal; this machine has CUDA")
def test_gen_trt_engine_on_a_cpu_machine_fails_at_once_in_one_sentence(tmp_path, capsys):
    out = tmp_path / "job"
    # The ONNX file does not even exist: the GPU check must come before anything is read.
    code = main(["gen_trt_engine", "--results-dir", str(out), f"gen_trt_engine.onnx_file={tmp_path / 'absent.onnx'}"])
    assert code == 1
    message = results.read_status(out)[-1]["message"]
    assert results.read_status(out)[-1]["status"] == "FAILURE"
    assert message == ("gen_trt_engine needs a CUDA GPU with TensorRT installed (requirements-gpu.txt), and this "
                       "machine has no CUDA GPU.")
    assert message.count(". ") == 0 and "Traceback" not in capsys.readouterr().err
    assert not (out / "model.engine").exists() and not (out / "engine_report.json").exists()


def test_verbose_logs_the_builder_at_tensorrts_verbose_level(onnx_file, tmp_path):
    trt = StandInTensorRT()
    build_engine(_plan(onnx_file, tmp_path), trt=trt, verbose=True)
    assert trt.calls[0] == ("Builder", "VERBOSE")


def test_gpu_id_picks_the_build_device_among_the_visible_gpus(monkeypatch):
    """CUDA cannot run here: the visible-GPU count is a stand-in value."""
    import torch

    from mask2former.errors import ActionError
    from mask2former.tensorrt.builder import build_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert build_device(1) == "cuda:1"
    with pytest.raises(ActionError, match=r"gen_trt_engine.gpu_id 2 names no GPU: 2 visible \(0..1; "):
        build_device(2)
