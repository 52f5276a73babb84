"""Training learns: on the synthetic set the loss falls and validation mIoU rises far above chance (CPU, about a
minute per backbone family)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from mask2former import results
from mask2former.actions.job import Job
from mask2former.actions.train import run
from mask2former.config import load_spec
from train_support import make_data, run_train_cli, tiny_spec, write_spec

EPOCHS = 10
MIN_EFFICIENTVIT_MIOU = 30


@pytest.mark.slow
def test_loss_falls_and_miou_rises(tmp_path):
    roots = make_data(tmp_path / "data", images=24, val_images=8, size=96)
    spec = tiny_spec(roots, size=96, batch_size=2, num_epochs=EPOCHS, lr=2e-3)
    spec["train"]["optim"].update({"lr_scheduler": "WarmupPoly", "warmup_iters": 5})
    folder = tmp_path / "run"
    folder.mkdir()
    outcome = run(load_spec("train", spec=spec),
                  Job(action="train", results_dir=folder, status=results.StatusWriter(folder),
                      log=logging.getLogger("test")))

    lines = results.read_status(folder)
    losses = [line["kpi"]["loss"] for line in lines if line["message"].startswith("Epoch ")]
    mious = [line["kpi"]["mIoU"] for line in lines if line["message"].startswith("Validation")]
    assert len(losses) == EPOCHS and len(mious) == EPOCHS
    assert losses[-1] < 0.5 * losses[0], losses
    # 6 classes (3 stuff, 3 things): an untrained model scores ~15 mIoU here
    assert mious[0] < 35 and max(mious) > 55, mious
    best = results.read_best(folder)
    assert best["value"] == pytest.approx(max(mious)) and best["epoch"] == mious.index(max(mious)) + 1
    assert (folder / best["checkpoint"]).is_file()
    assert outcome.artifacts["best_checkpoint"] == str(folder / best["checkpoint"])
    assert outcome.kpi["mIoU"] == pytest.approx(mious[-1]) and outcome.metrics["best_epoch"] == best["epoch"]
    assert outcome.kpi["PQ"] > 30, outcome.kpi


@pytest.mark.slow
def test_efficientvit_backbone_learns(tmp_path):
    """EfficientViT-b0 (the smallest released variant, from scratch, BatchNorm at batch 2) under the same tiny
    head: the loss halves and validation mIoU rises well above the untrained model's."""
    roots = make_data(tmp_path / "data", images=24, val_images=8, size=96)
    spec = tiny_spec(roots, size=96, batch_size=2, num_epochs=EPOCHS, lr=2e-3)
    spec["model"]["backbone"] = {"type": "efficientvit", "efficientvit": {"name": "b0"}}
    spec["train"]["optim"].update({"lr_scheduler": "WarmupPoly", "warmup_iters": 5})
    folder = tmp_path / "run"
    folder.mkdir()
    run(load_spec("train", spec=spec),
        Job(action="train", results_dir=folder, status=results.StatusWriter(folder), log=logging.getLogger("test")))
    lines = results.read_status(folder)
    losses = [line["kpi"]["loss"] for line in lines if line["message"].startswith("Epoch ")]
    mious = [line["kpi"]["mIoU"] for line in lines if line["message"].startswith("Validation")]
    assert losses[-1] < 0.5 * losses[0], losses
    # Measured: mIoU 8.4 after epoch 1, best 38.6 (epoch 10); the loss 33.5 -> below 16. From scratch with the
    # backbone at 0.1 x lr it learns more slowly than the tiny Swin, so the bar is lower than Swin's 55.
    assert mious[0] < 15 and max(mious) > 2.5 * mious[0] and max(mious) > MIN_EFFICIENTVIT_MIOU, mious


def test_efficientvit_trains_under_bf16_autocast(tmp_path):
    """One bf16-autocast epoch of EfficientViT-b0 through the train CLI: finite loss, backbone weights moved."""
    roots = make_data(tmp_path / "data", images=4, val_images=None, size=64)
    spec = tiny_spec(roots, size=64, batch_size=2, num_epochs=1)
    spec["model"]["backbone"] = {"type": "efficientvit", "efficientvit": {"name": "b0"}}
    spec["train"]["precision"] = "bf16"
    result = run_train_cli(write_spec(tmp_path / "spec.yaml", spec), tmp_path / "run")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    losses = [line["kpi"]["loss"] for line in results.read_status(tmp_path / "run")
              if line["message"].startswith("Epoch ")]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    state = torch.load(tmp_path / "run" / "model_latest.pth", map_location="cpu", weights_only=True)["state_dict"]
    stem_norm = "backbone.input_stem.op_list.0.norm."
    assert state[stem_norm + "running_mean"].abs().sum() > 0  # initialised at 0: the batches went through
    assert state[stem_norm + "bias"].abs().sum() > 0  # initialised at 0: the optimizer moved it
