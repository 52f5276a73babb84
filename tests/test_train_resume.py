"""Automatic resume: an interrupted run continues at the right step with the same optimizer state; a run in
a new folder never touches the first one's."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from mask2former import results
from mask2former.actions.job import ActionError, Job
from mask2former.actions.train import run
from mask2former.checkpoint import read_checkpoint, save_checkpoint
from mask2former.config import load_spec
from mask2former.training.callbacks import link_latest
from mask2former.training.lightning_module import Mask2FormerModule
from mask2former.training.session import find_resume_checkpoint
from train_support import make_data, tiny_spec


def _job(folder: Path) -> Job:
    folder.mkdir(parents=True, exist_ok=True)
    return Job(action="train", results_dir=folder, status=results.StatusWriter(folder),
               log=logging.getLogger("test"))


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.suffix == ".json" else None)
            for p in sorted(folder.iterdir()) if p.is_file()}


def _steps(folder: Path):
    return [(c.epoch, c.step) for c in results.list_checkpoints(folder)]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    roots = make_data(tmp_path_factory.mktemp("data"), images=8, val_images=None, size=64)
    return tiny_spec(roots, batch_size=2)


def test_interrupted_run_resumes_at_the_same_step_with_the_same_optimizer_state(tmp_path, spec, monkeypatch):
    first = tmp_path / "job"
    step_overrides = {"train.checkpoint_interval": 1, "train.checkpoint_interval_unit": "step",
                      "train.optim.warmup_iters": 3}
    run(load_spec("train", spec=spec, overrides=dict(step_overrides, **{"train.num_epochs": 1})), _job(first))
    assert _steps(first) == [(1, 1), (1, 2), (1, 3), (1, 4)]

    # The job is "killed" after step 2: its later files never got written.
    for name in (results.checkpoint_name(1, 3), results.checkpoint_name(1, 4)):
        (first / name).unlink()
    link_latest(first, first / results.checkpoint_name(1, 2))
    saved = read_checkpoint(first / results.checkpoint_name(1, 2))
    assert saved["global_step"] == 2 and saved["epoch"] == 1

    # A run in a NEW folder that starts from the first job's checkpoint leaves that folder alone.
    before = _snapshot(first)
    other = tmp_path / "other"
    outcome = run(load_spec("train", spec=spec, overrides=dict(
        step_overrides, **{"train.num_epochs": 1,
                           "train.resume_training_checkpoint_path": str(first / results.checkpoint_name(1, 2))})),
        _job(other))
    assert outcome.metrics["steps"] == 4
    assert _steps(other) == [(1, 3), (1, 4)]
    assert _snapshot(first) == before
    assert find_resume_checkpoint(tmp_path / "fresh", None) is None

    # The retried job (same folder) resumes by itself from its newest checkpoint, here with more epochs.
    seen = {}

    def probe(module: Mask2FormerModule) -> None:
        trainer = module.trainer
        seen["global_step"] = trainer.global_step
        seen["scheduler_step"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch
        seen["optimizer"] = copy.deepcopy(trainer.optimizers[0].state_dict())  # state tensors change in place
        seen["weights"] = {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    monkeypatch.setattr(Mask2FormerModule, "on_train_start", probe)
    outcome = run(load_spec("train", spec=spec, overrides=dict(step_overrides, **{"train.num_epochs": 2})),
                  _job(first))

    assert seen["global_step"] == 2 and seen["scheduler_step"] == 2
    restored, expected = seen["optimizer"]["state"], saved["optimizer_states"][0]["state"]
    assert restored.keys() == expected.keys() and len(expected) > 100
    for index, state in expected.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored[index][key], state[key]), (index, key)
    assert [g["lr"] for g in seen["optimizer"]["param_groups"]] == \
        [g["lr"] for g in saved["optimizer_states"][0]["param_groups"]]
    for key, value in saved["state_dict"].items():
        assert torch.equal(seen["weights"][key], value), key

    assert outcome.metrics["steps"] == 8 and outcome.metrics["epochs"] == 2
    assert _steps(first) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 5), (2, 6), (2, 7), (2, 8)]
    assert read_checkpoint(first / results.LATEST_CHECKPOINT)["global_step"] == 8
    messages = [line["message"] for line in results.read_status(first)]
    assert "Training resumed at epoch 1, step 2" in messages
    assert f"Resuming from {results.checkpoint_name(1, 2)}, saved at epoch 1, step 2" in messages
    assert "Resuming epoch 1 at batch 3 of 4, in the interrupted run's data order" in messages
    # one line per finished epoch: the first attempt's epoch 1 of 1, then the resumed epochs
    assert [m.split(":")[0] for m in messages if m.startswith("Epoch ")] == \
        ["Epoch 1/1 done", "Epoch 1/2 done", "Epoch 2/2 done"]


def test_resume_from_weights_only_checkpoint_is_refused(tmp_path, spec):
    weights_only = tmp_path / "weights.pth"
    save_checkpoint(weights_only, {"state_dict": {}, "model_config": None})
    config = load_spec("train", spec=spec, overrides={"train.resume_training_checkpoint_path": str(weights_only)})
    with pytest.raises(ActionError, match=r"Cannot resume from '.*weights.pth': it holds no training state .*"
                                          r"train.pretrained_model_path instead"):
        run(config, _job(tmp_path / "job"))
