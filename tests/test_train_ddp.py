"""Data-parallel training over two CPU processes (gloo), started through the real command."""

from __future__ import annotations

import math

import torch
import yaml
from torch.utils.data import DataLoader

from mask2former import results
from mask2former.checkpoint import build_model_from_checkpoint, read_checkpoint
from mask2former.config import load_spec
from mask2former.data.build import build_datasets
from mask2former.data.dataset import collate_batch
from mask2former.evaluation.pipeline import build_evaluator
from train_support import make_data, run_train_cli, tiny_spec, write_spec


def _evaluate_in_one_process(config, checkpoint):
    """The validation numbers of ``checkpoint`` computed without DDP, for comparison."""
    model, _ = build_model_from_checkpoint(checkpoint, config.model)
    dataset = build_datasets(config, "val")
    evaluator = build_evaluator(config, dataset)
    loader = DataLoader(dataset, batch_size=2, collate_fn=lambda items: collate_batch(items, size_divisibility=32))
    with torch.no_grad():
        for batch in loader:
            evaluator.process(model(batch["images"]), batch["metas"])
    return evaluator.compute()


def test_two_cpu_processes_train_in_sync_and_validate_every_image_once(tmp_path):
    roots = make_data(tmp_path / "data", images=8, val_images=3, size=64)
    spec = tiny_spec(roots, batch_size=1)
    spec_path = write_spec(tmp_path / "spec.yaml", spec)
    folder = tmp_path / "run"
    result = run_train_cli(spec_path, folder, ["train.num_gpus=2", "train.gpu_ids=[0,1]"], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    # the gradients were all-reduced: both ranks end with identical weights (checked by the run itself)
    assert "Model parameters identical on all 2 ranks" in result.stderr
    # the data was sharded: 8 images, 1 per process and step, 2 processes -> 4 steps
    assert [(c.epoch, c.step) for c in results.list_checkpoints(folder)] == [(1, 4)]
    assert read_checkpoint(folder / results.LATEST_CHECKPOINT)["global_step"] == 4

    # only rank 0 reported: one STARTED and one SUCCESS line, one line per epoch and validation
    statuses = [line["status"] for line in results.read_status(folder)]
    assert statuses.count("STARTED") == 1 and statuses.count("SUCCESS") == 1 and statuses[-1] == "SUCCESS"
    assert len([line for line in results.read_status(folder) if line.get("max_epoch") == 1]) == 3

    # 3 validation images over 2 ranks: the sampler repeats one, the evaluation counts each image once and
    # gives the same numbers as a single process on the saved weights
    metrics = results.read_metrics(folder)
    assert metrics["num_images"] == 3
    config = load_spec("train", spec=yaml.safe_load(spec_path.read_text()))
    single = _evaluate_in_one_process(config, folder / results.LATEST_CHECKPOINT)
    for key in ("mIoU", "pixel_accuracy", "PQ", "SQ", "RQ"):
        assert math.isclose(metrics[key], single[key], rel_tol=1e-6, abs_tol=1e-9), (key, metrics[key], single[key])
    assert not list(tmp_path.glob("run*/**/.*.tmp"))


def test_an_efficientvit_model_trains_in_sync_on_two_cpu_processes(tmp_path):
    """The second backbone family under DDP: its BatchNorm buffers and weights stay identical on both ranks."""
    roots = make_data(tmp_path / "data", images=4, val_images=2, size=64)
    spec_path = write_spec(tmp_path / "spec.yaml", tiny_spec(roots, batch_size=1))
    folder = tmp_path / "run"
    result = run_train_cli(spec_path, folder, ["train.num_gpus=2", "train.gpu_ids=[0,1]",
                                               "model.backbone.type=efficientvit",
                                               "model.backbone.efficientvit.name=b0"], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Model parameters identical on all 2 ranks" in result.stderr
    assert [(c.epoch, c.step) for c in results.list_checkpoints(folder)] == [(1, 2)]
    config = read_checkpoint(folder / results.LATEST_CHECKPOINT)["model_config"]
    assert config["backbone"]["type"] == "efficientvit" and config["backbone"]["efficientvit"]["name"] == "b0"
