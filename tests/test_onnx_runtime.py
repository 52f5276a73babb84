"""The onnxruntime runner: same outputs as the PyTorch runner on identical inputs, and the evaluate action
scores an exported model within 0.1 point (mIoU, PQ) of its checkpoint on a synthetic val set."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from evaluation_support import NUM_CLASSES, save_random_checkpoint, tiny_model_overrides
from mask2former import results
from mask2former.actions.job import ActionError
from mask2former.checkpoint import build_model_from_checkpoint, read_checkpoint
from mask2former.cli import main
from mask2former.config import load_spec
from mask2former.data.synthetic import write_dataset
from mask2former.export.metadata import ModelRecord
from mask2former.export.onnx_export import export_onnx
from mask2former.export.parity import check_parity, sample_inputs
from mask2former.runtime import load_runner
from mask2former.runtime.inference_model import InferenceModel
from mask2former.runtime.onnx_runner import CPU_PROVIDER, CUDA_PROVIDER, mode_of_outputs, providers_for

SIZE = 96  # synthetic images are SIZE x SIZE; the model is exported for SIZE x SIZE too


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, onnx path) of one tiny panoptic model with random (sharpened) weights."""
    folder = tmp_path_factory.mktemp("model")
    checkpoint = save_random_checkpoint(folder / "tiny.pth", mode="panoptic", seed=2)
    payload = read_checkpoint(checkpoint)
    model, cfg = build_model_from_checkpoint(payload)
    wrapped = InferenceModel(model, mode=cfg.mode, topk=cfg.test_topk_per_image).eval()
    path = folder / "model.onnx"
    export_onnx(wrapped, path, output_names=wrapped.output_names, input_height=SIZE, input_width=SIZE,
                batch_size=-1, record=ModelRecord(mode=cfg.mode, num_classes=NUM_CLASSES,
                                                  topk=cfg.test_topk_per_image, model_config=payload["model_config"]))
    return checkpoint, path


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    """A synthetic COCO-panoptic val root (archives, as the data sources deliver them)."""
    return write_dataset(tmp_path_factory.mktemp("data") / "val", dataset_format="coco_panoptic", num_images=4,
                         size=SIZE, seed=0, stream=1)


def test_onnx_runner_matches_the_torch_runner_on_identical_inputs(exported):
    checkpoint, path = exported
    config = load_spec("export", overrides=tiny_model_overrides("panoptic", **{"export.checkpoint": str(checkpoint)}))
    onnx_runner = load_runner("onnx", path, config, "cpu")
    torch_runner = load_runner("checkpoint", checkpoint, config, "cpu")
    assert onnx_runner.fixed_input_size == (SIZE, SIZE) and onnx_runner.max_batch_size is None
    assert (onnx_runner.mode, onnx_runner.num_classes) == (torch_runner.mode, torch_runner.num_classes)
    inputs = sample_inputs(batch=2, channels=3, height=SIZE, width=SIZE, count=2, seed=11)
    parity = check_parity(torch_runner, onnx_runner, inputs, tolerance=1e-4)
    assert parity.passed, parity.describe_failure()
    outputs = onnx_runner(inputs[0])
    assert outputs["pan_classes"].dtype == torch.int64 and outputs["sem_scores"].dtype == torch.float32
    assert list(outputs) == list(torch_runner(inputs[0]))


def _evaluate(results_dir, val_root, model_key, model_path):
    words = [f"{key}={json.dumps(value) if isinstance(value, list) else value}"
             for key, value in tiny_model_overrides("panoptic").items()]
    words += [f"evaluate.{model_key}={model_path}", "dataset.val.type=coco_panoptic",
              f"dataset.val.img_dir={val_root / 'images.tar.gz'}",
              f"dataset.val.panoptic_json={val_root / 'annotations_panoptic.json'}",
              f"dataset.val.panoptic_dir={val_root / 'images_panoptic.tar.gz'}",
              f"dataset.label_map={val_root / 'label_map_panoptic.json'}", "dataset.val.num_workers=0",
              f"dataset.augmentation.test_min_size={SIZE}", f"dataset.augmentation.test_max_size={SIZE}",
              "evaluate.batch_size=2"]
    assert main(["evaluate", "--results-dir", str(results_dir), *words]) == 0, results.read_status(results_dir)
    return results.read_metrics(results_dir)


def test_evaluate_scores_the_onnx_model_within_a_tenth_of_a_point_of_pytorch(exported, val_set, tmp_path):
    checkpoint, path = exported
    # Square SIZE x SIZE images with test sizes of SIZE: both runs feed the network the same SIZE x SIZE input.
    reference = _evaluate(tmp_path / "torch", val_set, "checkpoint", checkpoint)
    onnx_metrics = _evaluate(tmp_path / "onnx", val_set, "onnx_file", path)
    assert onnx_metrics["model"]["kind"] == "onnx" and reference["model"]["kind"] == "checkpoint"
    assert reference["num_images"] == onnx_metrics["num_images"] == 4
    for key in ("mIoU", "pixel_accuracy", "PQ", "SQ", "RQ"):
        assert reference[key] is not None and onnx_metrics[key] is not None, key
        assert abs(reference[key] - onnx_metrics[key]) <= 0.1, (key, reference[key], onnx_metrics[key])
    assert reference["PQ"] > 0 or reference["mIoU"] > 0  # the comparison is not between two empty results


def test_an_unreadable_onnx_file_is_named(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    config = load_spec("export", overrides=tiny_model_overrides("panoptic", **{"export.checkpoint": "x.pth"}))
    with pytest.raises(ActionError, match="onnxruntime cannot load '.*broken.onnx'"):
        load_runner("onnx", bad, config, "cpu")


def test_mode_of_outputs_identifies_foreign_graphs_by_output_names():
    assert mode_of_outputs(["sem_scores"]) == "semantic"
    assert mode_of_outputs(["inst_mask_logits", "sem_scores", "inst_scores", "inst_classes"]) == "instance"
    with pytest.raises(ValueError, match="not those of any mode"):
        mode_of_outputs(["pred_logits", "pred_masks"])


def test_cuda_provider_only_when_installed(caplog):
    assert providers_for("cuda:0", [CUDA_PROVIDER, CPU_PROVIDER]) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert providers_for("cpu", [CUDA_PROVIDER, CPU_PROVIDER]) == [CPU_PROVIDER]
    with caplog.at_level(logging.WARNING):
        assert providers_for("cuda:0", [CPU_PROVIDER]) == [CPU_PROVIDER]
    assert "onnxruntime-gpu" in caplog.text
