"""Actionable resource failures (GPU memory, host memory, disk) and the training-memory estimate, checked
against real peak-RSS measurements of tiny training steps on this CPU."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mask2former import resources
from mask2former.config import load_spec
from mask2former.model import build_model
from mask2former.resources import (MemoryEstimate, check_fits, classify_resource_error, count_parameters,
                                   estimate_training_memory)
from mask2former.results import StatusWriter, read_status

ROOT = Path(__file__).resolve().parents[1]
DATA = {"dataset.train.img_dir": "/d/img", "dataset.train.instance_json": "/d/a.json",
        "dataset.label_map": "/d/l.json", "model.mode": "instance"}
TINY = {"model.backbone.swin.embed_dim": 32, "model.backbone.swin.depths": [1, 1, 1, 1],
        "model.backbone.swin.num_heads": [1, 2, 4, 8], "model.sem_seg_head.convs_dim": 64,
        "model.sem_seg_head.mask_dim": 64, "model.sem_seg_head.transformer_enc_layers": 2,
        "model.mask_former.hidden_dim": 64, "model.mask_former.num_object_queries": 20,
        "model.mask_former.dec_layers": 4, "model.mask_former.dim_feedforward": 128,
        "model.sem_seg_head.num_classes": 10}
SMALL = {"model.backbone.swin.embed_dim": 48, "model.backbone.swin.depths": [2, 2, 2, 2],
         "model.backbone.swin.num_heads": [2, 4, 8, 16], "model.sem_seg_head.convs_dim": 96,
         "model.sem_seg_head.mask_dim": 96, "model.sem_seg_head.transformer_enc_layers": 3,
         "model.mask_former.hidden_dim": 96, "model.mask_former.num_object_queries": 40,
         "model.mask_former.dec_layers": 6, "model.mask_former.dim_feedforward": 256,
         "model.sem_seg_head.num_classes": 20}


def _config(model=TINY, **overrides):
    return load_spec("train", overrides={**DATA, **model, **overrides})


# --------------------------------------------------------------------------------------- classification

def _raise(error: BaseException) -> None:
    raise error


REAL_ERRORS = {
    "cpu_allocator": lambda: torch.empty(10 ** 13),  # 40 TB: the real DefaultCPUAllocator refusal
    "torch_save_full_disk": lambda: torch.save({"w": torch.zeros(100_000)}, "/dev/full"),
    "write_full_disk": lambda: open("/dev/full", "wb").write(b"x" * 10_000_000),
}


@pytest.mark.parametrize("make,kind", [
    (lambda: _raise(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB "
                                                "total capacity)")), "gpu_memory"),
    (lambda: _raise(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously "
                                 "reported")), "gpu_memory"),
    (lambda: _raise(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`")),
     "gpu_memory"),
    (lambda: _raise(MemoryError()), "host_memory"),
    (REAL_ERRORS["cpu_allocator"], "host_memory"),
    (lambda: _raise(RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed.")), "host_memory"),
    (lambda: _raise(OSError(errno.ENOSPC, "No space left on device", "/results/model_epoch_001.pth")), "disk"),
    (REAL_ERRORS["write_full_disk"], "disk"),
    (REAL_ERRORS["torch_save_full_disk"], "disk"),
])
def test_each_resource_error_is_recognised(make, kind):
    with pytest.raises(BaseException) as info:
        make()
    failure = classify_resource_error(info.value)
    assert failure is not None and failure.kind == kind


def test_other_errors_are_not_resource_failures():
    assert classify_resource_error(ValueError("model.mode must be panoptic")) is None
    assert classify_resource_error(OSError(errno.ENOENT, "No such file or directory")) is None
    assert classify_resource_error(RuntimeError("shape mismatch")) is None


def test_a_wrapped_error_is_found_through_its_cause():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        except RuntimeError as inner:
            raise RuntimeError("training step failed") from inner
    except RuntimeError as outer:
        failure = classify_resource_error(outer)
    assert failure is not None and failure.kind == "gpu_memory" and "Tried to allocate 20.00 MiB" in failure.message


def test_gpu_message_names_what_ran_out_and_the_keys_with_their_values():
    config = _config(**{"dataset.train.batch_size": 4, "dataset.augmentation.train_crop_size": [1024, 1024],
                        "model.backbone.swin.type": "base"})
    failure = classify_resource_error(torch.cuda.OutOfMemoryError("CUDA out of memory."), config)
    message = failure.message
    assert message.startswith("The GPU ran out of memory during training: ")
    for phrase in ("dataset.train.batch_size (now 4)", "dataset.augmentation.train_crop_size (now [1024, 1024])",
                   "model.backbone.swin.type (now base", "model.backbone.swin.use_checkpoint to true",
                   "train.precision to bf16 or fp16 (now fp32)", "model.mask_former.train_num_points (now 12544)"):
        assert phrase in message, phrase


def test_keys_already_at_their_saving_setting_are_not_suggested():
    config = _config(**{"dataset.train.batch_size": 1, "model.backbone.swin.use_checkpoint": True,
                        "train.precision": "bf16"})
    message = classify_resource_error(MemoryError(), config).message
    assert message.startswith("The machine ran out of host memory (RAM) during training: ")
    assert "batch_size" not in message and "use_checkpoint" not in message and "train.precision" not in message
    assert "dataset.augmentation.train_crop_size" in message
    assert "dataset.train.num_workers (now 2" in message


def test_disk_message_names_the_file_and_where_to_make_room():
    error = OSError(errno.ENOSPC, "No space left on device", "/results/job/model_epoch_003_step_000300.pth")
    message = classify_resource_error(error, _config(results_dir="/results/job")).message
    assert message.startswith("The disk is full (writing /results/job/model_epoch_003_step_000300.pth)")
    assert "results_dir" in message and "train.checkpoint_interval" in message


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"),
                                   MemoryError(), OSError(errno.ENOSPC, "No space left on device")])
def test_a_failing_training_step_ends_the_job_with_the_actionable_message(tmp_path, error):
    """The call site the train action uses: classify, write FAILURE with the message (no traceback needed)."""
    config = _config(**{"dataset.train.batch_size": 8})

    def fake_step() -> None:
        raise error

    status = StatusWriter(tmp_path)
    status.started("train started")
    try:
        fake_step()
    except BaseException as exc:  # noqa: BLE001 - what the action does with any failure
        failure = classify_resource_error(exc, config)
        status.failure(failure.message if failure else f"{type(exc).__name__}: {exc}")
    last = read_status(tmp_path)[-1]
    assert last["status"] == "FAILURE"
    assert ("dataset.train.batch_size (now 8)" in last["message"]) or last["message"].startswith("The disk is full")


# ------------------------------------------------------------------------------------------- estimate

@pytest.mark.parametrize("model", [TINY, SMALL, {**TINY, "model.backbone.swin.ape": True,
                                                 "model.backbone.swin.window_size": 12,
                                                 "model.backbone.swin.qkv_bias": False,
                                                 "model.mask_former.hidden_dim": 48,
                                                 "model.mask_former.nheads": 4}])
def test_parameter_count_matches_the_built_model(model):
    config = _config(model)
    assert count_parameters(config.model) == sum(p.numel() for p in build_model(config.model).parameters())


def test_swin_t_parameter_count_matches_the_paper():
    config = _config({"model.sem_seg_head.num_classes": 133})
    assert count_parameters(config.model) == pytest.approx(47.4e6, rel=0.01)


def test_estimate_grows_with_batch_crop_queries_and_points():
    def total(**overrides):
        return estimate_training_memory(_config(**overrides)).bytes

    base = total()
    assert total(**{"dataset.train.batch_size": 4}) > total(**{"dataset.train.batch_size": 2}) > base
    assert total(**{"dataset.augmentation.train_crop_size": [1024, 1024]}) > base
    assert total(**{"model.mask_former.num_object_queries": 100}) > base
    assert total(**{"model.mask_former.train_num_points": 20000}) > base
    assert total(**{"model.backbone.swin.use_checkpoint": True}) < base
    swin_t = estimate_training_memory(_config({"model.sem_seg_head.num_classes": 133}))
    assert swin_t.bytes > base
    assert estimate_training_memory(_config({"model.sem_seg_head.num_classes": 133}, **{
        "model.backbone.swin.type": "large"})).bytes > swin_t.bytes


def test_estimate_breakdown_adds_up_and_counts_adamw_state():
    estimate = estimate_training_memory(_config())
    params = count_parameters(_config().model)
    assert estimate.bytes == sum(estimate.breakdown.values())
    assert estimate.breakdown["parameters"] == 4 * params and estimate.breakdown["optimizer_state"] == 8 * params
    assert estimate.breakdown["half_precision_weights"] == 0
    half = estimate_training_memory(_config(**{"train.precision": "bf16"}))
    assert half.breakdown["half_precision_weights"] == 2 * params
    assert "activations" in estimate.describe() and estimate.describe().startswith("about ")


MEASURE = r"""
import json, os, sys
import torch
from mask2former.config import load_spec
from mask2former.model import build_model
from mask2former.model.criterion import build_criterion
from mask2former.training.optim import build_optimizer

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

torch.set_num_threads(1)
overrides, masks = json.loads(sys.argv[1]), int(sys.argv[2])
cfg = load_spec("train", overrides=overrides)
batch, (height, width) = cfg.dataset.train.batch_size, cfg.dataset.augmentation.train_crop_size
torch.manual_seed(0)
images = torch.randn(batch, 3, height, width)
targets = [{"labels": torch.randint(0, cfg.model.sem_seg_head.num_classes, (masks,)),
            "masks": torch.rand(masks, height, width) > 0.5} for _ in range(batch)]
before = rss()
model = build_model(cfg.model).train()
criterion = build_criterion(cfg.model)
optimizer = build_optimizer(model, cfg.train.optim)
for _ in range(2):
    loss = criterion.total_loss(criterion(model(images), targets))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (a large pytest process)
# across exec, while the high-water mark belongs to this process's own address space.
with open("/proc/self/status") as handle:
    peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
print(json.dumps({"peak_bytes": peak - before}))
"""


def _clean_env():
    """A measurement must not inherit what earlier tests left in os.environ (allocator, thread settings)."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("model,overrides,masks", [
    (TINY, {"dataset.train.batch_size": 2, "dataset.augmentation.train_crop_size": [128, 128]}, 6),
    (SMALL, {"dataset.train.batch_size": 1, "dataset.augmentation.train_crop_size": [256, 192]}, 10),
], ids=["tiny", "small"])
def test_estimate_is_within_its_documented_error_of_a_real_measurement(model, overrides, masks):
    every = {**DATA, **model, **overrides}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(every), str(masks)], capture_output=True,
                         text=True, timeout=120, env=_clean_env())
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    estimate = estimate_training_memory(load_spec("train", overrides=every), masks_per_image=masks)
    assert abs(estimate.bytes - measured) / measured <= 0.15, (estimate.describe(), measured)


# --------------------------------------------------------------------------------------------- fitting

def test_check_fits_warns_with_the_numbers_and_the_keys():
    estimate = estimate_training_memory(_config(**{"dataset.train.batch_size": 16}))
    warning = check_fits(estimate, "cuda:0", available=estimate.bytes // 2)
    assert warning is not None
    assert warning.startswith("Training needs an estimated ") and "on cuda:0" in warning
    assert "dataset.train.batch_size (now 16)" in warning and "model.backbone.swin.use_checkpoint" in warning
    assert check_fits(estimate, "cuda:0", available=estimate.bytes * 2) is None


def test_check_fits_counts_every_local_process():
    estimate = MemoryEstimate(bytes=3 * 2 ** 30, breakdown={"activations_backbone": 3 * 2 ** 30})
    assert check_fits(estimate, "cpu", available=8 * 2 ** 30) is None
    warning = check_fits(estimate, "cpu", processes=4, available=8 * 2 ** 30)
    assert warning.startswith("4 training processes need an estimated 12.00 GiB")


def test_host_memory_is_read_from_the_machine():
    free, text = resources.available_memory("cpu")
    assert free > 0 and "host memory" in text
    tiny = estimate_training_memory(_config())
    assert check_fits(tiny, "cpu") is None, "a tiny model fits this machine"
