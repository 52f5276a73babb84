"""The export action through the CLI: model.onnx + export_report.json + SUCCESS after a passing parity
check; a failing parity check (or a simplifier failure) leaves no ONNX file and ends with FAILURE; GPU
export on a machine without CUDA fails at once."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from evaluation_support import NUM_CLASSES, save_random_checkpoint, tiny_model_overrides
from mask2former import results
from mask2former.cli import main
from mask2former.runtime.inference_model import output_names
from mask2former.runtime.onnx_runner import OnnxRunner

HEIGHT, WIDTH = 64, 96


def _model_words(mode: str):
    return [f"{key}={json.dumps(value) if isinstance(value, list) else value}"
            for key, value in tiny_model_overrides(mode).items()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", mode="panoptic",
                                  label_map=[{"id": 7, "name": "circle", "color": [1, 2, 3], "isthing": 1}])


def _export(results_dir, checkpoint, *extra):
    return main(["export", "--results-dir", str(results_dir), f"export.checkpoint={checkpoint}",
                 f"export.input_height={HEIGHT}", f"export.input_width={WIDTH}", *_model_words("panoptic"), *extra])


def _hidden_leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_export_writes_a_checked_model_and_its_report(tmp_path, checkpoint):
    out = tmp_path / "job"
    assert _export(out, checkpoint, "export.verbose=true") == 0  # TAO's verbose: torch prints the traced graph
    status = results.read_status(out)
    assert status[-1]["status"] == "SUCCESS" and "parity_max_abs_diff" in status[-1]["kpi"]
    model_path = out / "model.onnx"
    onnx.checker.check_model(str(model_path))
    assert not _hidden_leftovers(out)

    report = json.loads((out / "export_report.json").read_text())
    names = list(output_names("panoptic"))
    assert report["written"] is True and report["mode"] == "panoptic" and report["num_classes"] == NUM_CLASSES
    assert report["opset_version"] == 17 and report["dynamic_batch"] is True
    assert report["input"] == {"name": "inputs", "shape": ["batch", 3, HEIGHT, WIDTH]}
    assert report["output_names"] == names and set(report["outputs"]) == set(names)
    assert report["outputs"]["pan_mask_probs"] == ["batch", 6, HEIGHT // 4, WIDTH // 4]
    assert report["simplification"]["applied"] is True
    assert report["simplification"]["nodes_after"] < report["simplification"]["nodes_before"]
    parity = report["parity"]
    assert parity["passed"] and parity["tolerance"] == 1e-3 and parity["num_samples"] == 3  # 2 + one of batch 1
    assert set(parity["outputs"]) == set(names)
    assert 0 <= parity["max_abs_diff"] < 1e-4
    assert parity["outputs"]["inst_mask_logits"]["shape"][0] == 2  # batch 2 for a dynamic axis
    assert report["versions"]["onnxruntime"] and report["size_bytes"] == model_path.stat().st_size
    assert results.read_metrics(out)["parity_max_abs_diff"] == parity["max_abs_diff"]

    runner = OnnxRunner(model_path)
    assert runner.record.label_map[0]["name"] == "circle" and runner.record.topk == 10
    for batch in (1, 3):
        outputs = runner(torch.zeros(batch, 3, HEIGHT, WIDTH))
        assert outputs["sem_scores"].shape == (batch, NUM_CLASSES, HEIGHT // 4, WIDTH // 4)


def test_parity_failure_leaves_no_model_and_ends_with_failure(tmp_path, checkpoint, monkeypatch, capsys):
    def broken(model):
        raise RuntimeError("forced simplifier failure")

    monkeypatch.setattr("mask2former.export.simplify._onnxslim", broken)
    out = tmp_path / "job"
    target = tmp_path / "elsewhere" / "custom.onnx"
    # Differences are ~1e-7 here, so a tolerance of 1e-12 forces the parity check to fail.
    code = _export(out, checkpoint, "export.parity_tolerance=1e-12", f"export.onnx_file={target}",
                   "export.batch_size=1")
    assert code == 1
    last = results.read_status(out)[-1]
    assert last["status"] == "FAILURE" and "onnxruntime does not match PyTorch" in last["message"]
    assert "no ONNX file was written" in capsys.readouterr().err
    assert not target.exists() and not (out / "model.onnx").exists()
    assert not _hidden_leftovers(target.parent) and not _hidden_leftovers(out)
    report = json.loads((out / "export_report.json").read_text())
    assert report["written"] is False and report["parity"]["passed"] is False
    assert report["parity"]["failures"] and report["dynamic_batch"] is False
    assert report["input"]["shape"] == [1, 3, HEIGHT, WIDTH]
    assert report["simplification"]["applied"] is False
    assert "forced simplifier failure" in report["simplification"]["message"]


def test_a_graph_that_fails_on_another_batch_size_is_not_written(tmp_path, checkpoint, monkeypatch):
    class BatchOneFails(OnnxRunner):
        def __call__(self, images):
            if images.shape[0] == 1:
                raise RuntimeError("Reshape node: input tensor cannot be reshaped to the requested shape")
            return super().__call__(images)

    monkeypatch.setattr("mask2former.actions.export.OnnxRunner", BatchOneFails)
    monkeypatch.setattr("mask2former.export.simplify._onnxslim", lambda model: None)  # skip the slow part
    out = tmp_path / "job"
    assert _export(out, checkpoint) == 1
    message = results.read_status(out)[-1]["message"]
    assert message.startswith("onnxruntime cannot run the exported graph on a batch of 1 (Reshape node")
    assert message.endswith("no ONNX file was written.")
    assert not (out / "model.onnx").exists() and not _hidden_leftovers(out)
    report = json.loads((out / "export_report.json").read_text())
    assert report["written"] is False and "batch of 1" in report["parity"]["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal; this machine has CUDA")
def test_gpu_export_on_a_cpu_machine_fails_in_one_sentence(tmp_path, checkpoint):
    out = tmp_path / "job"
    assert _export(out, checkpoint, "export.on_cpu=false") == 1
    message = results.read_status(out)[-1]["message"]
    assert "export.on_cpu is false" in message and "no CUDA GPU" in message
    assert not (out / "export_report.json").exists()


def test_missing_checkpoint_is_named(tmp_path):
    out = tmp_path / "job"
    assert _export(out, tmp_path / "absent.pth") == 1
    assert "absent.pth' does not exist" in results.read_status(out)[-1]["message"]
