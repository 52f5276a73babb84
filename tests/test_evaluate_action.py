"""The evaluate action through the CLI: exit codes, status lines with kpi, metrics.json, per-class tables
and chart; predictions on disk; results folders and fixed-size runners as model sources."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from evaluation_support import (make_dataset, save_random_checkpoint, small_data_overrides, split_overrides,
                                tiny_model_overrides)
from mask2former import results, runtime
from mask2former.cli import main
from mask2former.runtime.torch_runner import TorchRunner


def cli_words(overrides):
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in overrides.items()]


def run_evaluate(folder, overrides):
    return main(["evaluate", "--results-dir", str(folder), *cli_words(overrides)])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_images=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("model") / "model.pth", mode="panoptic")


def _overrides(data, mode="panoptic", **extra):
    return {**tiny_model_overrides(mode), **small_data_overrides(), **split_overrides("val", data),
            "model.object_mask_threshold": 0.05, "evaluate.batch_size": 3, **extra}


def test_evaluate_writes_metrics_tables_chart_and_a_kpi_line(tmp_path, data, checkpoint):
    folder = tmp_path / "job"
    assert run_evaluate(folder, _overrides(data, **{"evaluate.checkpoint": str(checkpoint)})) == 0
    lines = results.read_status(folder)
    assert [line["status"] for line in lines][0] == "STARTED" and lines[-1]["status"] == "SUCCESS"
    assert any(line["status"] == "RUNNING" and "4/4 images" in line["message"] for line in lines)
    assert set(lines[-1]["kpi"]) == {"mIoU", "PQ", "AP"}
    text = (folder / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))
    assert metrics["num_images"] == 4
    assert metrics["mIoU"] == pytest.approx(lines[-1]["kpi"]["mIoU"])
    assert metrics["model"]["kind"] == "checkpoint"
    for table, header in (("per_class_iou.csv", ["class", "IoU", "accuracy"]),
                          ("per_class_pq.csv", ["class", "isthing", "PQ", "SQ", "RQ", "TP", "FP", "FN"]),
                          ("per_class_ap.csv", ["class", "AP"])):
        rows = list(csv.reader((folder / table).open()))
        assert rows[0] == header
        assert {row[0] for row in rows[1:]} >= {"circle", "rectangle", "triangle"}
    iou_rows = {row[0]: row for row in csv.reader((folder / "per_class_iou.csv").open())}
    for name, values in metrics["per_class"]["semantic"].items():
        if values["iou"] is None:
            assert iou_rows[name][1] == ""
        else:
            assert float(iou_rows[name][1]) == pytest.approx(values["iou"], abs=1e-4)
    assert (folder / "per_class_iou.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_semantic_mode_on_coco_instances_reports_miou_only(tmp_path, checkpoint):
    data = make_dataset(tmp_path / "coco", dataset_format="coco", num_images=3)
    folder = tmp_path / "job"
    overrides = {**tiny_model_overrides("semantic"), **small_data_overrides(),
                 **split_overrides("val", data, dataset_format="coco"), "evaluate.checkpoint": str(checkpoint)}
    assert run_evaluate(folder, overrides) == 0
    status = results.read_status(folder)[-1]
    assert list(status["kpi"]) == ["mIoU"]
    assert not (folder / "per_class_pq.csv").exists() and not (folder / "per_class_ap.csv").exists()
    assert (folder / "per_class_iou.csv").is_file()


def test_bad_spec_exits_2_and_a_failing_job_exits_1_with_failure(tmp_path, data, checkpoint, capsys):
    assert run_evaluate(tmp_path / "a", _overrides(data, **{"evaluate.chekpoint": str(checkpoint)})) == 2
    assert "evaluate.checkpoint" in capsys.readouterr().err  # the nearest valid key is suggested
    assert not (tmp_path / "a").exists()
    folder = tmp_path / "b"
    assert run_evaluate(folder, _overrides(data, **{"evaluate.checkpoint": str(tmp_path / "absent.pth")})) == 1
    last = results.read_status(folder)[-1]
    assert last["status"] == "FAILURE" and "absent.pth" in last["message"]


def test_a_parent_results_folder_resolves_to_its_best_checkpoint(tmp_path, data, checkpoint):
    parent = tmp_path / "train_job"
    parent.mkdir()
    (parent / results.checkpoint_name(3, 30)).write_bytes(checkpoint.read_bytes())
    results.record_best(parent, epoch=3, step=30, metric="mIoU", value=1.0, checkpoint=results.checkpoint_name(3, 30))
    folder = tmp_path / "job"
    assert run_evaluate(folder, _overrides(data, **{"evaluate.checkpoint": str(parent)})) == 0
    assert results.read_metrics(folder)["model"]["path"].endswith("model_epoch_003_step_000030.pth")


def test_a_fixed_size_runner_is_evaluated_on_aspect_preserving_inputs(tmp_path, data, checkpoint, monkeypatch):
    """A stand-in for an ONNX runner exported at 64 x 128 (the real one lives in onnx_runner.py)."""
    seen_shapes = []

    class FixedRunner:
        fixed_input_size, max_batch_size = (64, 128), 2

        def __init__(self, path, config, device):
            self.inner = TorchRunner.from_checkpoint(checkpoint, model_cfg=config.model, device=device)
            self.num_classes, self.mode = self.inner.num_classes, self.inner.mode

        def __call__(self, images):
            seen_shapes.append(tuple(images.shape))
            return self.inner(images)

    monkeypatch.setattr(runtime, "_REGISTERED", {"onnx": FixedRunner})
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"stand-in")
    folder = tmp_path / "job"
    assert run_evaluate(folder, _overrides(data, **{"evaluate.onnx_file": str(onnx_file)})) == 0
    assert seen_shapes and all(shape[1:] == (3, 64, 128) and shape[0] <= 2 for shape in seen_shapes)
    assert sum(shape[0] for shape in seen_shapes) == 4  # batch 3 split into 2 + 1, then 1
    metrics = results.read_metrics(folder)
    assert metrics["num_images"] == 4 and metrics["model"]["kind"] == "onnx"
    assert math.isfinite(metrics["mIoU"])


def test_a_model_built_for_another_mode_is_refused(tmp_path, data, checkpoint, monkeypatch):
    class SemanticOnly:
        fixed_input_size, max_batch_size, num_classes, mode = None, None, 13, "semantic"

        def __init__(self, *args):
            pass

        def __call__(self, images):
            return {"sem_scores": torch.zeros(images.shape[0], 13, 1, 1)}

    monkeypatch.setattr(runtime, "_REGISTERED", {"onnx": SemanticOnly})
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"stand-in")
    folder = tmp_path / "job"
    assert run_evaluate(folder, _overrides(data, **{"evaluate.onnx_file": str(onnx_file)})) == 1
    assert "set model.mode=semantic" in results.read_status(folder)[-1]["message"]


def test_an_exported_onnx_model_evaluates_like_its_checkpoint_on_the_same_inputs(tmp_path, data, checkpoint,
                                                                                monkeypatch):
    pytest.importorskip("onnxruntime")
    from mask2former.config import load_spec
    from mask2former.runtime.inference_model import InferenceModel

    config = load_spec("export", overrides=tiny_model_overrides("panoptic", **{"export.checkpoint": "x"}))
    torch_runner = TorchRunner.from_checkpoint(checkpoint, model_cfg=config.model, device="cpu")
    onnx_file = tmp_path / "model.onnx"
    model = InferenceModel(torch_runner.model.model, mode="panoptic", topk=config.model.test_topk_per_image).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 64, 128),), str(onnx_file), input_names=["images"],
                      output_names=list(model.output_names), opset_version=17, dynamo=False)
    with_onnx = tmp_path / "onnx"
    assert run_evaluate(with_onnx, _overrides(data, **{"evaluate.onnx_file": str(onnx_file)})) == 0
    onnx_metrics = results.read_metrics(with_onnx)
    assert onnx_metrics["model"]["kind"] == "onnx" and onnx_metrics["num_images"] == 4

    class SameInputsInPyTorch:  # the checkpoint, fed the ONNX model's fixed-size inputs
        fixed_input_size, max_batch_size = (64, 128), 1

        def __init__(self, path, config, device):
            self.num_classes, self.mode = torch_runner.num_classes, torch_runner.mode

        def __call__(self, images):
            return torch_runner(images)

    monkeypatch.setattr(runtime, "_REGISTERED", {"engine": SameInputsInPyTorch})
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"stand-in")
    with_torch = tmp_path / "torch"
    assert run_evaluate(with_torch, _overrides(data, **{"evaluate.trt_engine": str(engine)})) == 0
    torch_metrics = results.read_metrics(with_torch)
    for key in ("mIoU", "pixel_accuracy", "PQ", "AP"):
        assert onnx_metrics[key] == pytest.approx(torch_metrics[key], abs=0.5), key


def test_bf16_on_a_cpu_without_bf16_units_runs_fp32_and_says_why(tmp_path, data, checkpoint, monkeypatch, caplog):
    monkeypatch.setattr("mask2former.runtime.precision.cpu_flags", lambda: frozenset({"avx2", "fma"}))
    folder = tmp_path / "job"
    with caplog.at_level("INFO", logger="mask2former"):
        assert run_evaluate(folder, _overrides(data, **{"evaluate.checkpoint": str(checkpoint),
                                                         "evaluate.precision": "bf16"})) == 0
    precision = json.loads((folder / "metrics.json").read_text())["precision"]
    assert precision["requested"] == "bf16" and precision["used"] == "fp32"
    assert "neither AMX nor AVX-512-bf16" in precision["reason"] and "fp32" not in set(precision) - {"used"}
    assert any("runs in fp32" in record.getMessage() and "neither AMX" in record.getMessage()
               for record in caplog.records)


@pytest.mark.slow
def test_bf16_on_a_cpu_with_amx_records_its_accuracy_against_fp32(tmp_path, data, checkpoint, monkeypatch):
    monkeypatch.setattr("mask2former.runtime.precision.cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    folder = tmp_path / "job"
    assert run_evaluate(folder, _overrides(data, **{"evaluate.checkpoint": str(checkpoint),
                                                     "evaluate.precision": "bf16"})) == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    precision = metrics["precision"]
    assert precision["used"] == "bf16" and "AMX" in precision["reason"]
    for key in ("mIoU", "PQ"):
        assert precision["bf16_minus_fp32"][key] == pytest.approx(metrics[key] - precision["fp32"][key])
        assert abs(precision["bf16_minus_fp32"][key]) < 50  # the same model, scored twice
