"""Runtime: InferenceModel's fixed output names and shapes, TorchRunner from a checkpoint, load_runner
dispatch and its errors, ONNX traceability of the inference model."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from evaluation_support import NUM_CLASSES, save_random_checkpoint, tiny_model_overrides
from mask2former import runtime
from mask2former.actions.job import ActionError
from mask2former.config import load_spec
from mask2former.model import build_model
from mask2former.model.postprocess import instance_topk, panoptic_candidates, semantic_scores
from mask2former.runtime import load_runner, register_runner, runner_kind_for
from mask2former.runtime.inference_model import InferenceModel, output_names, tensor_stage
from mask2former.runtime.torch_runner import TorchRunner

QUERIES, TOPK = 6, 10


def _config(mode: str, checkpoint: str = "unused.pth"):
    return load_spec("export", overrides=tiny_model_overrides(mode, **{"export.checkpoint": checkpoint}))


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_model(_config("panoptic").model).eval()


@pytest.mark.parametrize("mode", ["semantic", "instance", "panoptic"])
def test_inference_model_returns_the_fixed_names_and_shapes_of_each_mode(network, mode):
    model = InferenceModel(network, mode=mode, topk=TOPK)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outputs = model(images)
    assert tuple(outputs) == output_names(mode)
    assert outputs["sem_scores"].shape == (2, NUM_CLASSES, 16, 24)  # 1/4 of the padded input
    if mode in ("instance", "panoptic"):
        assert outputs["inst_scores"].shape == (2, TOPK)
        assert outputs["inst_classes"].dtype == torch.int64
        assert outputs["inst_mask_logits"].shape == (2, TOPK, 16, 24)
    if mode == "panoptic":
        assert outputs["pan_scores"].shape == (2, QUERIES)
        assert outputs["pan_classes"].dtype == torch.int64
        assert outputs["pan_mask_probs"].shape == (2, QUERIES, 16, 24)
        assert "inst_scores" in outputs  # mask AP from the instance head, as upstream
    else:
        assert "pan_scores" not in outputs


def test_inference_model_is_the_tensor_stage_of_the_raw_outputs(network):
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw = network(images)
        outputs = InferenceModel(network, mode="panoptic", topk=TOPK)(images)
    logits, masks = raw["pred_logits"], raw["pred_masks"]
    torch.testing.assert_close(outputs["sem_scores"], semantic_scores(logits, masks))
    scores, classes, probs = panoptic_candidates(logits, masks)
    torch.testing.assert_close(outputs["pan_scores"], scores)
    assert torch.equal(outputs["pan_classes"], classes)
    scores, classes, mask_logits = instance_topk(logits, masks, topk=TOPK)
    torch.testing.assert_close(outputs["inst_mask_logits"], mask_logits)
    assert torch.equal(outputs["inst_classes"], classes)


def test_tensor_stage_and_output_names_reject_an_unknown_mode():
    with pytest.raises(ValueError, match="model.mode='depth'"):
        output_names("depth")
    with pytest.raises(ValueError, match="test_topk_per_image"):
        InferenceModel(torch.nn.Identity(), mode="instance", topk=0)


def test_torch_runner_takes_the_architecture_from_the_checkpoint_and_the_mode_from_the_spec(tmp_path):
    checkpoint = save_random_checkpoint(tmp_path / "model.pth", mode="panoptic")
    config = _config("semantic")
    config.model.sem_seg_head.num_classes = 200  # the spec's default; the checkpoint's 13 wins
    runner = load_runner("checkpoint", checkpoint, config, "cpu")
    assert isinstance(runner, TorchRunner)
    assert (runner.fixed_input_size, runner.max_batch_size) == (None, None)
    assert (runner.num_classes, runner.mode) == (NUM_CLASSES, "semantic")
    outputs = runner(torch.randn(1, 3, 64, 32))
    assert list(outputs) == ["sem_scores"]
    assert outputs["sem_scores"].shape == (1, NUM_CLASSES, 16, 8)


def test_torch_runner_rejects_images_that_are_not_batched_rgb(tmp_path):
    runner = load_runner("checkpoint", save_random_checkpoint(tmp_path / "m.pth"), _config("panoptic"), "cpu")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        runner(torch.zeros(3, 64, 64))


def test_load_runner_errors_name_what_is_missing(tmp_path, monkeypatch):
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(b"not really onnx")
    with pytest.raises(ActionError, match="does not exist"):
        load_runner("checkpoint", tmp_path / "absent.pth", _config("panoptic"), "cpu")
    with pytest.raises(ActionError, match="not one of checkpoint, onnx, engine, quantized"):
        load_runner("tflite", model_file, _config("panoptic"), "cpu")
    monkeypatch.setitem(runtime.RUNNER_MODULES, "onnx", "mask2former.runtime.no_such_runner")
    with pytest.raises(ActionError, match=r"mask2former/runtime/no_such_runner\.py.*onnxruntime"):
        load_runner("onnx", model_file, _config("panoptic"), "cpu")


def test_registered_loaders_replace_the_module_of_a_kind(tmp_path, monkeypatch):
    model_file = tmp_path / "model.engine"
    model_file.write_bytes(b"engine")
    seen = {}
    fake = types.SimpleNamespace(fixed_input_size=(64, 96), max_batch_size=2, num_classes=3, mode="semantic")

    def loader(path, config, device):
        seen.update(path=path, device=device)
        return fake

    monkeypatch.setattr(runtime, "_REGISTERED", {})
    register_runner("engine", loader)
    assert load_runner("engine", model_file, _config("semantic"), "cpu") is fake
    assert seen == {"path": model_file, "device": torch.device("cpu")}
    with pytest.raises(ValueError, match="runner kind 'tflite'"):
        register_runner("tflite", loader)


@pytest.mark.parametrize("name, kind", [("model.onnx", "onnx"), ("model.engine", "engine"), ("x.PLAN", "engine"),
                                        ("quantized_model_torchao.pth", "quantized"),
                                        ("model_epoch_001_step_000010.pth", "checkpoint")])
def test_runner_kind_follows_the_file_name(name, kind):
    assert runner_kind_for(name) == kind


def test_inference_model_exports_to_onnx_with_the_fixed_names(network, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = InferenceModel(network, mode="panoptic", topk=TOPK).eval()
    images = torch.randn(1, 3, 64, 96)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (images,), str(path), input_names=["images"], output_names=list(model.output_names),
                      opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(output_names("panoptic"))
    results = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        reference = model(images)
    for name, value in zip(output_names("panoptic"), results):
        np.testing.assert_allclose(value, reference[name].numpy(), atol=1e-4)


def test_tensor_stage_of_semantic_mode_returns_only_the_scores():
    logits = torch.randn(2, 4, NUM_CLASSES + 1)
    masks = torch.randn(2, 4, 8, 8)
    outputs = tensor_stage(logits, masks, mode="semantic", topk=5)
    assert list(outputs) == ["sem_scores"]
    torch.testing.assert_close(outputs["sem_scores"], semantic_scores(logits, masks))
