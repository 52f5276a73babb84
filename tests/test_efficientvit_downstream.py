"""A Mask2Former on an EfficientViT backbone through the doors after training: export with the parity proof,
ONNX Runtime evaluation against the checkpoint, the TensorRT build plan (linear attention kept in FP32) and
torchao quantization."""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest
import torch

from evaluation_support import NUM_CLASSES, tiny_model_overrides
from mask2former import results
from mask2former.checkpoint import save_checkpoint
from mask2former.cli import main
from mask2former.config import load_spec
from mask2former.data.synthetic import write_dataset
from mask2former.model import build_model
from mask2former.tensorrt.plan import make_build_plan

SIZE = 64
EFFICIENTVIT = {"model.backbone.type": "efficientvit", "model.backbone.efficientvit.name": "b0"}


def _words(overrides):
    return [f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"
            for key, value in overrides.items()]


def _model_overrides():
    return tiny_model_overrides("panoptic", **EFFICIENTVIT)


def _save_checkpoint(path):
    """A checkpoint of the tiny model with random weights, its class head scaled so some queries pass the
    panoptic threshold."""
    config = load_spec("export", overrides={**_model_overrides(), "export.checkpoint": str(path)})
    torch.manual_seed(5)
    model = build_model(config.model)
    state = {key: value * 30.0 if "class_embed" in key else value for key, value in model.state_dict().items()}
    save_checkpoint(path, {"state_dict": state, "model_config": dataclasses.asdict(config.model),
                           "label_map": None, "contiguous_id": False, "epoch": 0, "global_step": 0})
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """(checkpoint, export folder, val root) of a tiny EfficientViT-b0 Mask2Former with random weights."""
    root = tmp_path_factory.mktemp("evit")
    checkpoint = _save_checkpoint(root / "tiny.pth")
    val = write_dataset(root / "val", dataset_format="coco_panoptic", num_images=4, size=SIZE, seed=0, stream=1)
    out = root / "export"
    code = main(["export", "--results-dir", str(out), f"export.checkpoint={checkpoint}",
                 f"export.input_height={SIZE}", f"export.input_width={SIZE}", *_words(_model_overrides())])
    assert code == 0, results.read_status(out)
    return checkpoint, out, val


def _data(val):
    return {"dataset.val.type": "coco_panoptic", "dataset.val.img_dir": str(val / "images.tar.gz"),
            "dataset.val.panoptic_json": str(val / "annotations_panoptic.json"),
            "dataset.val.panoptic_dir": str(val / "images_panoptic.tar.gz"),
            "dataset.label_map": str(val / "label_map_panoptic.json"), "dataset.val.num_workers": 0,
            "dataset.augmentation.test_min_size": SIZE, "dataset.augmentation.test_max_size": SIZE}


def _evaluate(results_dir, val, model_key, model_path):
    words = [*_words(_model_overrides()), f"evaluate.{model_key}={model_path}", *_words(_data(val)),
             "evaluate.batch_size=2"]
    assert main(["evaluate", "--results-dir", str(results_dir), *words]) == 0, results.read_status(results_dir)
    return results.read_metrics(results_dir)


@pytest.mark.slow
def test_export_passes_parity_and_onnx_runtime_scores_like_the_checkpoint(job, tmp_path):
    checkpoint, out, val = job
    report = json.loads((out / "export_report.json").read_text())
    assert report["written"] and report["parity"]["passed"] and report["parity"]["tolerance"] == 1e-3
    assert report["parity"]["max_abs_diff"] <= 1e-3 and report["num_classes"] == NUM_CLASSES
    reference = _evaluate(tmp_path / "torch", val, "checkpoint", checkpoint)
    onnx_metrics = _evaluate(tmp_path / "onnx", val, "onnx_file", out / "model.onnx")
    assert onnx_metrics["model"]["kind"] == "onnx" and onnx_metrics["num_images"] == 4
    for key in ("mIoU", "PQ"):
        assert abs(reference[key] - onnx_metrics[key]) <= 0.1, (key, reference[key], onnx_metrics[key])


@pytest.mark.slow
def test_fp16_plan_keeps_the_linear_attention_in_fp32(job, tmp_path):
    _, out, _ = job
    section = load_spec("gen_trt_engine", overrides={"gen_trt_engine.onnx_file": str(out / "model.onnx"),
                                                     "gen_trt_engine.tensorrt.data_type": "FP16"}).gen_trt_engine
    plan = make_build_plan(section, onnx_file=out / "model.onnx", engine_file=tmp_path / "model.engine")
    attention = [layer for layer in plan.layer_precisions if layer.reason.startswith("linear attention")]
    ops = {layer.op_type for layer in attention}
    assert {"MatMul", "Div"} <= ops and all(layer.precision == "fp32" for layer in attention)
    graph = onnx.load(str(out / "model.onnx"))
    context_matmuls = [n for n in graph.graph.node if n.op_type == "MatMul" and "/context_module/" in n.name]
    assert len(context_matmuls) == len([a for a in attention if a.op_type == "MatMul"])


@pytest.mark.slow
def test_torchao_quantization_of_an_efficientvit_model(job, tmp_path):
    checkpoint, _, val = job
    out = tmp_path / "quantize"
    words = ["quantize", "--results-dir", str(out), f"quantize.model_path={checkpoint}",
             *_words(_model_overrides()), *_words(_data(val))]
    assert main(words) == 0, results.read_status(out)
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["size"]["ratio"] < 1.0 and {"fp32", "quantized"} <= set(report["accuracy"])
