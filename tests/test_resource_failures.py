"""Running out of memory or disk in evaluate, inference, export and quantize: the job ends with FAILURE (exit 1)
and one message that says what ran out, in which action, and which of that action's keys (with their current
values) help. The failures are simulated: a step of each action is replaced by one that raises what PyTorch,
the allocator or the file system raise (MemoryError, "CUDA out of memory", DefaultCPUAllocator, ENOSPC)."""

from __future__ import annotations

import errno
import json

import pytest

from evaluation_support import make_dataset, save_random_checkpoint, small_data_overrides, split_overrides, \
    tiny_model_overrides
from mask2former import results
from mask2former.actions import evaluate, export, inference, quantize
from mask2former.actions.job import ActionError
from mask2former.actions.resource_failures import reports_resource_failures, resource_failure_message
from mask2former.cli import main
from mask2former.config import load_spec

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity)"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_images=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("model") / "model.pth", mode="panoptic")


def _words(overrides):
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in overrides.items()]


def _run(action, folder, overrides):
    return main([action, "--results-dir", str(folder), *_words(overrides)])


def _raiser(error):
    def step(*args, **kwargs):  # noqa: ARG001 - stands in for any step of an action
        raise error
    return step


def _failure(folder):
    lines = results.read_status(folder)
    assert lines[-1]["status"] == "FAILURE", lines
    return lines[-1]["message"]


# ------------------------------------------------------------------------------------- through the CLI


def test_evaluate_out_of_host_memory_names_the_evaluate_keys(tmp_path, data, checkpoint, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_runner", _raiser(MemoryError()))
    folder = tmp_path / "job"
    overrides = {**tiny_model_overrides(), **small_data_overrides(), **split_overrides("val", data),
                 "evaluate.checkpoint": str(checkpoint), "evaluate.batch_size": 4, "dataset.val.num_workers": 2}
    assert _run("evaluate", folder, overrides) == 1
    assert _failure(folder) == (
        "The machine ran out of host memory (RAM) during evaluate: lower evaluate.batch_size (now 4), lower "
        "dataset.augmentation.test_min_size (now 64) and test_max_size (now 96), the size images are resized to or "
        "lower dataset.val.num_workers (now 2; each loader process holds its own images). (MemoryError)")
    assert not (folder / "metrics.json").exists()


def test_inference_out_of_gpu_memory_names_the_inference_keys_and_writes_no_outputs(tmp_path, data, checkpoint,
                                                                                   monkeypatch):
    monkeypatch.setattr(inference, "run_batch", _raiser(RuntimeError(CUDA_OOM)))
    folder = tmp_path / "job"
    overrides = {**tiny_model_overrides(), **small_data_overrides(), "dataset.test.img_dir": str(data["img_dir"]),
                 "dataset.label_map": str(data["label_map"]), "inference.checkpoint": str(checkpoint),
                 "inference.batch_size": 2}
    assert _run("inference", folder, overrides) == 1
    message = _failure(folder)
    assert message == ("The GPU ran out of memory during inference: lower inference.batch_size (now 2) or lower "
                       "dataset.augmentation.test_min_size (now 64) and test_max_size (now 96), the size images are "
                       f"resized to. ({CUDA_OOM})")  # no num_workers: loader processes hold host memory, not GPU
    assert not (folder / "panoptic.json").exists() and not (folder / "instances.json").exists()


def test_export_on_a_full_disk_names_the_file_and_leaves_no_model(tmp_path, checkpoint, monkeypatch):
    target = tmp_path / "job" / "model.onnx"
    monkeypatch.setattr(export, "export_onnx", _raiser(OSError(errno.ENOSPC, "No space left on device", str(target))))
    folder = tmp_path / "job"
    overrides = {**tiny_model_overrides(), "export.checkpoint": str(checkpoint), "export.input_height": 64,
                 "export.input_width": 64}
    assert _run("export", folder, overrides) == 1
    assert _failure(folder) == (
        f"The disk is full during export (writing {target}): free space there or set results_dir to a larger disk; "
        "export writes the ONNX model and a work copy of it beside the target there, and downloaded and extracted "
        "data are cached under $MASK2FORMER_CACHE (~/.cache/mask2former). ([Errno 28] No space left on device: "
        f"'{target}')")
    assert sorted(p.name for p in folder.iterdir()) == ["experiment.yaml", "status.json"]


def test_export_out_of_memory_names_the_export_keys(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(export, "export_onnx", _raiser(RuntimeError(CPU_OOM)))
    folder = tmp_path / "job"
    overrides = {**tiny_model_overrides(), "export.checkpoint": str(checkpoint), "export.input_height": 64,
                 "export.input_width": 96}
    assert _run("export", folder, overrides) == 1
    assert _failure(folder).startswith(
        "The machine ran out of host memory (RAM) during export: lower export.input_height and export.input_width "
        "(now 64x96) or set export.batch_size to 1 (now -1: a dynamic batch is traced and checked with 2 images). "
        "([enforce fail at alloc_cpu.cpp:117]")


def test_quantize_out_of_memory_names_the_quantize_keys(tmp_path, data, checkpoint, monkeypatch):
    monkeypatch.setattr(quantize, "compare_latency", _raiser(RuntimeError(CPU_OOM)))
    folder = tmp_path / "job"
    overrides = {**tiny_model_overrides(), **small_data_overrides(), **split_overrides("val", data),
                 "quantize.model_path": str(checkpoint), "dataset.val.batch_size": 2}
    assert _run("quantize", folder, overrides) == 1
    assert _failure(folder) == (
        "The machine ran out of host memory (RAM) during quantize: lower dataset.augmentation.test_min_size (now 64) "
        "and test_max_size (now 96), the size images are resized to for latency or lower dataset.val.batch_size "
        f"(now 2). ({CPU_OOM})")
    assert not list(folder.glob("quantize_report.json"))


def test_other_failures_pass_through_unchanged(tmp_path, data, checkpoint, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_runner", _raiser(ValueError("a bug, not a resource")))
    folder = tmp_path / "job"
    overrides = {**tiny_model_overrides(), **small_data_overrides(), **split_overrides("val", data),
                 "evaluate.checkpoint": str(checkpoint)}
    assert _run("evaluate", folder, overrides) == 1
    assert _failure(folder) == "ValueError: a bug, not a resource"


# ---------------------------------------------------------------------------------------- the messages


@pytest.fixture(scope="module")
def config(data):
    return load_spec("evaluate", overrides={**split_overrides("val", data), "evaluate.checkpoint": "model.pth",
                                            "evaluate.batch_size": 1, "dataset.val.num_workers": 0,
                                            "results_dir": "/results/job"})


def test_a_resource_failure_wrapped_in_an_action_error_is_still_recognised(config):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise ActionError("dataset.val: cannot extract images.tar.gz") from cause
    except ActionError as error:
        message = resource_failure_message(error, config=config, action="evaluate")
    assert message.startswith("The disk is full during evaluate (results in /results/job): free space there")
    assert message.endswith("(dataset.val: cannot extract images.tar.gz)")


def test_keys_already_at_their_smallest_are_not_suggested(config):
    message = resource_failure_message(MemoryError(), config=config, action="evaluate")
    assert "evaluate.batch_size" not in message and "num_workers" not in message
    assert message == ("The machine ran out of host memory (RAM) during evaluate: lower "
                       "dataset.augmentation.test_min_size (now 640) and test_max_size (now 640), the size images are "
                       "resized to. (MemoryError)")


def test_gpu_levers_of_export_quantize_and_gen_trt_engine():
    export_cfg = load_spec("export", overrides={"export.checkpoint": "model.pth", "export.on_cpu": False,
                                                "export.batch_size": 4})
    message = resource_failure_message(RuntimeError(CUDA_OOM), config=export_cfg, action="export")
    assert "lower export.batch_size (now 4)" in message and "set export.on_cpu to true" in message
    quantize_cfg = load_spec("quantize", overrides={
        "quantize.model_path": "model.pth", "quantize.device": "cuda", "quantize.backend": "modelopt.pytorch",
        "quantize.mode": "static_ptq", "dataset.quant_calibration_dataset.images_dir": "calibration"})
    message = resource_failure_message(RuntimeError(CUDA_OOM), config=quantize_cfg, action="quantize")
    assert message.startswith("The GPU ran out of memory during quantize: set quantize.device to cpu, lower "
                              "dataset.augmentation.test_min_size")
    assert "for calibration and latency" in message
    assert "lower dataset.quant_calibration_dataset.num_images (now 32)" in message
    trt_cfg = load_spec("gen_trt_engine", overrides={"gen_trt_engine.onnx_file": "model.onnx",
                                                     "gen_trt_engine.tensorrt.max_batch_size": 8})
    assert resource_failure_message(RuntimeError(CUDA_OOM), config=trt_cfg, action="gen_trt_engine") == (
        "The GPU ran out of memory during gen_trt_engine: lower gen_trt_engine.tensorrt.workspace_size (now 1024 MB) "
        f"or lower gen_trt_engine.tensorrt.max_batch_size (now 8). ({CUDA_OOM})")


def test_non_resource_errors_give_no_message_and_unknown_actions_are_refused(config):
    assert resource_failure_message(ValueError("bad value"), config=config, action="evaluate") is None
    assert resource_failure_message(OSError(errno.ENOENT, "No such file"), config=config, action="evaluate") is None
    with pytest.raises(ValueError, match="action must be one of"):
        reports_resource_failures("train")
