"""Real TensorRT: gen_trt_engine builds FP32 and FP16 engines from an exported tiny model, the engines
match onnxruntime, and the TensorRT runner serves evaluate like the ONNX model does.

Needs a CUDA GPU and the tensorrt package (requirements-gpu.txt); skipped otherwise, with the reason.
"""

from __future__ import annotations

import json

import pytest
import torch

from mask2former import results
from mask2former.cli import main
from mask2former.data.synthetic import write_dataset
from mask2former.export.parity import check_parity, sample_inputs
from mask2former.runtime.onnx_runner import OnnxRunner
from tests.evaluation_support import save_random_checkpoint, tiny_model_overrides

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("TensorRT engines are built and run on a CUDA GPU, and this machine has none.",
                allow_module_level=True)
trt = pytest.importorskip("tensorrt", reason="TensorRT tests need the tensorrt package (requirements-gpu.txt), "
                                             "which is not installed here.")

from mask2former.runtime.tensorrt_runner import TensorRTRunner  # noqa: E402

SIZE = 96


def _words(overrides):
    return [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    checkpoint = save_random_checkpoint(folder / "tiny.pth", mode="panoptic", seed=3)
    out = folder / "job"
    code = main(["export", "--results-dir", str(out), f"export.checkpoint={checkpoint}",
                 f"export.input_height={SIZE}", f"export.input_width={SIZE}", *_words(tiny_model_overrides())])
    assert code == 0, results.read_status(out)
    return checkpoint, out / "model.onnx"


@pytest.mark.parametrize("precision", ["FP32", "FP16"])
def test_engine_builds_and_matches_onnxruntime(exported, tmp_path, precision):
    _, onnx_file = exported
    out = tmp_path / precision
    cache = tmp_path / "timing.cache"
    code = main(["gen_trt_engine", "--results-dir", str(out), f"gen_trt_engine.onnx_file={onnx_file}",
                 f"gen_trt_engine.tensorrt.data_type={precision}", "gen_trt_engine.tensorrt.max_batch_size=4",
                 "gen_trt_engine.tensorrt.opt_batch_size=2", f"gen_trt_engine.timing_cache={cache}"])
    assert code == 0, results.read_status(out)
    report = json.loads((out / "engine_report.json").read_text())
    assert report["parity"]["passed"] and report["written"]
    assert cache.stat().st_size > 0 and report["build"]["timing_cache"]["written_bytes"] > 0
    if precision == "FP16":
        assert report["build"]["constrained_by_precision"]["fp32"] > 0

    engine = TensorRTRunner(out / "model.engine", device="cuda:0")
    assert engine.fixed_input_size == (SIZE, SIZE) and engine.max_batch_size == 4 and engine.mode == "panoptic"
    reference = OnnxRunner(onnx_file, device="cpu")
    for batch in (1, 3):
        inputs = sample_inputs(batch=batch, channels=3, height=SIZE, width=SIZE, count=1, seed=batch)
        tolerance = 1e-3 if precision == "FP32" else 2e-2
        gated = None if precision == "FP32" else ["sem_scores", "pan_scores", "pan_mask_probs", "inst_scores"]
        parity = check_parity(reference, engine, inputs, tolerance=tolerance, gated=gated)
        assert parity.passed, parity.describe_failure()


def test_evaluate_with_the_engine_matches_the_onnx_model(exported, tmp_path):
    _, onnx_file = exported
    engine_dir = tmp_path / "engine"
    assert main(["gen_trt_engine", "--results-dir", str(engine_dir), f"gen_trt_engine.onnx_file={onnx_file}"]) == 0
    val = write_dataset(tmp_path / "val", dataset_format="coco_panoptic", num_images=4, size=SIZE, seed=0, stream=1)
    data = [f"dataset.val.img_dir={val / 'images.tar.gz'}", f"dataset.val.panoptic_json={val / 'annotations_panoptic.json'}",
            f"dataset.val.panoptic_dir={val / 'images_panoptic.tar.gz'}",
            f"dataset.label_map={val / 'label_map_panoptic.json'}", "dataset.val.num_workers=0"]
    metrics = {}
    for key, path in (("onnx_file", onnx_file), ("trt_engine", engine_dir / "model.engine")):
        out = tmp_path / key
        assert main(["evaluate", "--results-dir", str(out), f"evaluate.{key}={path}", *data,
                     *_words(tiny_model_overrides())]) == 0, results.read_status(out)
        metrics[key] = results.read_metrics(out)
    for name in ("mIoU", "PQ"):
        assert abs(metrics["onnx_file"][name] - metrics["trt_engine"][name]) <= 0.1, name
