"""quantize with ModelOpt's ONNX backend (where nvidia-modelopt and its ONNX extras are installed): a Q/DQ
ONNX artifact with int8 weights that onnxruntime runs, carries the model record, and is scored against
the fp32 export on dataset.val; weight-only mode is refused in one sentence."""

from __future__ import annotations

import json

import onnx
import pytest

from evaluation_support import save_random_checkpoint, tiny_model_overrides
from mask2former import results
from mask2former.cli import main
from mask2former.data.synthetic import write_dataset
from mask2former.runtime import load_runner, runner_kind_for

SIZE = 64
pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt with its ONNX extras is not installed "
                                                         "(a GPU-side requirement in requirements-gpu.txt)")


def _words(overrides):
    return [f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"
            for key, value in overrides.items()]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnxq")
    parent = save_random_checkpoint(root / "tiny.pth", mode="panoptic", seed=6)
    val = write_dataset(root / "val", dataset_format="coco_panoptic", num_images=2, size=SIZE, seed=0, stream=1)
    data = {"dataset.val.type": "coco_panoptic", "dataset.val.img_dir": str(val / "images.tar.gz"),
            "dataset.val.panoptic_json": str(val / "annotations_panoptic.json"),
            "dataset.val.panoptic_dir": str(val / "images_panoptic.tar.gz"),
            "dataset.label_map": str(val / "label_map_panoptic.json"), "dataset.val.num_workers": 0,
            "dataset.quant_calibration_dataset.images_dir": str(val / "images.tar.gz"),
            "dataset.quant_calibration_dataset.num_images": 2,
            "dataset.augmentation.test_min_size": SIZE, "dataset.augmentation.test_max_size": SIZE}
    out = root / "job"
    words = ["quantize", "--results-dir", str(out), f"quantize.model_path={parent}", "quantize.backend=modelopt.onnx",
             "quantize.mode=static_ptq", *_words(tiny_model_overrides("panoptic")), *_words(data)]
    assert main(words) == 0, results.read_status(out)
    return out, parent, data


def test_qdq_artifact_runs_in_onnxruntime_and_is_reported(job):
    out, _, _ = job
    artifact = out / "quantized_model_modelopt_onnx.onnx"
    graph = onnx.load(str(artifact))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["mask2former.mode"] == "panoptic" and json.loads(props["mask2former.quantization"])["backend"] == \
        "modelopt.onnx"
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["details"]["quantize_mode"] == "int8" and report["details"]["nodes_to_quantize"] > 0
    assert report["size"]["ratio"] < 0.6  # int8 weights (DequantizeLinear only)
    assert set(report["accuracy"]) >= {"fp32", "quantized", "drop"} and report["calibration_images"] == 2
    assert results.resolve_parent_model(out, kind="quantized") == artifact
    assert runner_kind_for(artifact) == "onnx"
    runner = load_runner("quantized", artifact, None, "cpu")
    assert runner.fixed_input_size == (SIZE, SIZE) and runner.mode == "panoptic"


def test_weight_only_mode_is_refused_for_the_onnx_backend(job, tmp_path, capsys):
    """A spec rule: refused before the job starts (exit 2, no results folder)."""
    _, parent, data = job
    out = tmp_path / "refused"
    code = main(["quantize", "--results-dir", str(out), f"quantize.model_path={parent}",
                 "quantize.backend=modelopt.onnx", *_words(tiny_model_overrides("panoptic")), *_words(data)])
    assert code == 2
    assert "modelopt.onnx supports quantize.mode static_ptq only" in capsys.readouterr().err
    assert not out.exists()
