"""Training setup: device plans, starting weights (pretrained model, Swin backbone, s3:// and https://),
freezing, gradient clipping once per step, and data errors surfacing as one sentence."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import torch

from mask2former.actions.job import ActionError, Job
from mask2former.actions.train import localize_weight_files, run
from mask2former.checkpoint import read_checkpoint, save_checkpoint
from mask2former.config import load_spec
from mask2former.model import build_model
from mask2former.results import StatusWriter, read_status
from mask2former.training.datamodule import ERROR_KEY, ReportingDataset, check_batch, collate_or_report
from mask2former.training.distributed import plan_devices
from mask2former.training.errors import DatasetError, TrainingSetupError
from mask2former.training.initialization import freeze_parameters, load_backbone_weights, load_pretrained_model
from s3_server import moto_endpoint, moto_server, new_bucket, s3_env  # noqa: F401
from train_support import make_data, tiny_spec


def _train_cfg(**kw):
    base = dict(num_gpus=1, gpu_ids=[0], num_nodes=1, precision="fp32", distributed_strategy="ddp")
    base.update(kw)
    return SimpleNamespace(**base)


# ----------------------------------------------------------------------------- devices

def test_cpu_plans():
    plan = plan_devices(_train_cfg(), cuda_devices=0, env={})
    assert (plan.accelerator, plan.devices, plan.strategy, plan.precision) == ("cpu", 1, "auto", "32-true")
    plan = plan_devices(_train_cfg(num_gpus=2, gpu_ids=[0, 1], precision="bf16"), cuda_devices=0, env={})
    assert (plan.devices, plan.world_size, plan.strategy, plan.precision) == (2, 2, "ddp", "bf16-mixed")


def test_cpu_refuses_fp16_and_fsdp_in_one_sentence():
    with pytest.raises(TrainingSetupError, match=r"fp16 needs a CUDA GPU .*use bf16 or fp32"):
        plan_devices(_train_cfg(precision="fp16"), cuda_devices=0, env={})
    with pytest.raises(TrainingSetupError, match="fsdp needs CUDA GPUs"):
        plan_devices(_train_cfg(num_gpus=2, gpu_ids=[0, 1], distributed_strategy="fsdp", precision="bf16"),
                     cuda_devices=0, env={})


def test_gpu_plans_pick_gpu_ids_and_check_them():
    plan = plan_devices(_train_cfg(gpu_ids=[1], precision="fp16"), cuda_devices=2, env={})
    assert (plan.accelerator, plan.devices, plan.precision) == ("gpu", [1], "16-mixed")
    with pytest.raises(TrainingSetupError, match=r"names GPU\(s\) \[3\].*has 2 CUDA GPU"):
        plan_devices(_train_cfg(gpu_ids=[3]), cuda_devices=2, env={})


def test_multi_node_from_orchestrator_environment():
    env = {"NUM_GPU_PER_NODE": "2", "WORLD_SIZE": "6", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500"}
    plan = plan_devices(_train_cfg(), cuda_devices=2, env=env)
    assert (plan.devices, plan.processes_per_node, plan.num_nodes, plan.strategy) == ([0, 1], 2, 3, "ddp")
    with pytest.raises(TrainingSetupError, match="WORLD_SIZE=5 .* not a multiple of the 2 processes per node"):
        plan_devices(_train_cfg(), cuda_devices=2, env=dict(env, WORLD_SIZE="5"))
    with pytest.raises(TrainingSetupError, match="needs MASTER_ADDR"):
        plan_devices(_train_cfg(num_nodes=2), cuda_devices=1, env={})
    with pytest.raises(TrainingSetupError, match="NUM_GPU_PER_NODE='two' is not an integer"):
        plan_devices(_train_cfg(), cuda_devices=1, env={"NUM_GPU_PER_NODE": "two"})


# ----------------------------------------------------------------------------- starting weights

def _tiny_model_config(num_classes=13, hidden=32):
    overrides = {"model.backbone.swin.embed_dim": 32, "model.backbone.swin.depths": [1, 1, 1, 1],
                 "model.backbone.swin.num_heads": [1, 2, 4, 8], "model.backbone.swin.window_size": 4,
                 "model.sem_seg_head.convs_dim": 32, "model.sem_seg_head.mask_dim": 32,
                 "model.sem_seg_head.transformer_enc_layers": 1, "model.mask_former.hidden_dim": hidden,
                 "model.mask_former.nheads": 4, "model.mask_former.dim_feedforward": 64,
                 "model.mask_former.dec_layers": 2, "model.mask_former.num_object_queries": 5,
                 "model.sem_seg_head.num_classes": num_classes, "export.checkpoint": "x.pth"}
    return load_spec("export", overrides=overrides).model


def _save(model, model_cfg, path: Path) -> Path:
    import dataclasses

    save_checkpoint(path, {"state_dict": model.state_dict(), "model_config": dataclasses.asdict(model_cfg)})
    return path


def test_pretrained_model_drops_a_class_head_of_another_size(tmp_path, caplog):
    torch.manual_seed(0)
    source_cfg = _tiny_model_config(num_classes=13)
    source = build_model(source_cfg)
    path = _save(source, source_cfg, tmp_path / "pre.pth")
    torch.manual_seed(1)
    target = build_model(_tiny_model_config(num_classes=4))
    head_before = target.transformer_decoder.class_embed.weight.clone()
    with caplog.at_level(logging.INFO):
        report = load_pretrained_model(target, path)
    assert "class head dropped" in caplog.text
    assert torch.equal(target.transformer_decoder.class_embed.weight, head_before)
    for name, tensor in target.state_dict().items():
        if "class_embed" not in name:
            assert torch.equal(tensor, source.state_dict()[name]), name
    assert "transformer_decoder.class_embed.weight" in report.skipped


def test_pretrained_model_of_another_architecture_is_refused(tmp_path):
    source_cfg = _tiny_model_config(hidden=64)
    path = _save(build_model(source_cfg), source_cfg, tmp_path / "wide.pth")
    with pytest.raises(TrainingSetupError, match=r"wide.pth' does not match the model of the spec: .*differ in shape"):
        load_pretrained_model(build_model(_tiny_model_config(hidden=32)), path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingSetupError, match="train.pretrained_model_path: Checkpoint .*junk.pth"):
        load_pretrained_model(build_model(_tiny_model_config()), tmp_path / "junk.pth")


def test_official_swin_weights_load_into_the_backbone(tmp_path):
    torch.manual_seed(3)
    donor = build_model(_tiny_model_config())
    official = {key[len("backbone."):]: value for key, value in donor.state_dict().items()
                if key.startswith("backbone.") and not key.startswith("backbone.norm")
                and not key.endswith("relative_position_index")}
    torch.save({"model": official}, tmp_path / "swin.pth")
    torch.manual_seed(4)
    model = build_model(_tiny_model_config())
    report = load_backbone_weights(model, tmp_path / "swin.pth")
    assert len(report.loaded) == len(official)
    for key, value in official.items():
        assert torch.equal(model.state_dict()["backbone." + key], value), key
    torch.save({"model": {"something.else": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(TrainingSetupError, match="no tensor fits the Swin backbone"):
        load_backbone_weights(model, tmp_path / "other.pth")


def test_freeze_prefixes_and_typos():
    model = build_model(_tiny_model_config())
    frozen = freeze_parameters(model, ["backbone", "transformer_decoder.query_feat"])
    assert frozen and all(n.startswith(("backbone.", "transformer_decoder.query_feat")) for n in frozen)
    states = {name: p.requires_grad for name, p in model.named_parameters()}
    assert not states["backbone.patch_embed.proj.weight"] and not states["transformer_decoder.query_feat.weight"]
    assert states["transformer_decoder.query_embed.weight"] and states["pixel_decoder.mask_features.weight"]
    with pytest.raises(TrainingSetupError, match=r"train.freeze: the prefix 'backbon' matches no parameter"):
        freeze_parameters(build_model(_tiny_model_config()), ["backbon"])


def test_weight_uris_file_s3_and_https(tmp_path, s3_env):  # noqa: F811
    weights = tmp_path / "pre.pth"
    weights.write_bytes(b"weights")
    bucket = new_bucket(s3_env)
    boto3.client("s3").upload_file(str(weights), bucket, "models/pre.pth")
    cfg = SimpleNamespace(train=SimpleNamespace(pretrained_model_path=f"s3://{bucket}/models/pre.pth",
                                                pretrained_model_sha256=None,
                                                resume_training_checkpoint_path=None),
                          model=SimpleNamespace(backbone=SimpleNamespace(pretrained_weights=f"file://{weights}",
                                                                         pretrained_weights_sha256=None)))
    local = localize_weight_files(cfg, cache=tmp_path / "cache")
    assert Path(local.train.pretrained_model_path).read_bytes() == b"weights"
    assert str(tmp_path / "cache") in local.train.pretrained_model_path
    assert local.model.backbone.pretrained_weights == str(weights)
    assert cfg.train.pretrained_model_path.startswith("s3://")  # the caller's config is untouched
    cfg.train.pretrained_model_path = "http://127.0.0.1:9/pre.pth"  # the discard port: connection refused
    with pytest.raises(ActionError, match=r"train.pretrained_model_path 'http://127.0.0.1:9/pre.pth' cannot be "
                                          r"fetched: .*127.0.0.1:9/pre.pth"):
        localize_weight_files(cfg, cache=tmp_path / "cache")
    cfg.train.pretrained_model_path = f"file://{weights}"
    cfg.train.pretrained_model_sha256 = "0" * 64
    with pytest.raises(ActionError, match="cannot be fetched: .*" + "0" * 64):
        localize_weight_files(cfg, cache=tmp_path / "cache")
    cfg.train.pretrained_model_sha256 = None
    cfg.train.pretrained_model_path = f"s3://{bucket}/models/absent.pth"
    with pytest.raises(ActionError, match="absent.pth' cannot be fetched"):
        localize_weight_files(cfg, cache=tmp_path / "cache")


# ----------------------------------------------------------------------------- data errors

class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        if index == 1:
            raise ValueError("image /data/b.jpg could not be read: truncated")
        return {"image": torch.zeros(3, 8, 8)}


def test_a_bad_sample_becomes_one_sentence():
    wrapped = ReportingDataset(_Broken(), split="train")
    batch = collate_or_report([wrapped[0], wrapped[1]], size_divisibility=32)
    assert batch == {ERROR_KEY: "dataset.train: image /data/b.jpg could not be read: truncated"}
    with pytest.raises(DatasetError, match=r"^dataset.train: image /data/b.jpg could not be read: truncated$"):
        check_batch(batch)


# ----------------------------------------------------------------------------- clipping, in-process action

@pytest.fixture(scope="module")
def data_roots(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), images=4, val_images=None, size=64)


def _job(folder: Path) -> Job:
    folder.mkdir(parents=True, exist_ok=True)
    return Job(action="train", results_dir=folder, status=StatusWriter(folder), log=logging.getLogger("test"))


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_gradient_clipping_once_per_step(tmp_path, monkeypatch, data_roots, clip):
    calls = []
    original = torch.nn.utils.clip_grad_norm_

    def counting(parameters, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return original(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting)
    config = load_spec("train", spec=tiny_spec(data_roots), overrides={"train.clip_grad_norm": clip})
    outcome = run(config, _job(tmp_path / "run"))
    assert outcome.metrics["steps"] == 2  # 4 images, batch 2
    assert calls == ([clip] * 2 if clip else [])
    assert outcome.artifacts == {"checkpoint": str(tmp_path / "run" / "model_latest.pth")}  # no val: latest only
    assert "best_checkpoint" not in outcome.artifacts and outcome.kpi.keys() == {"loss"}
    lines = read_status(tmp_path / "run")
    assert [line["epoch"] for line in lines if line["message"].startswith("Epoch")] == [1]


def test_fp16_on_cpu_fails_before_training(tmp_path, data_roots):
    config = load_spec("train", spec=tiny_spec(data_roots), overrides={"train.precision": "fp16"})
    with pytest.raises(ActionError, match="fp16 needs a CUDA GPU"):
        run(config, _job(tmp_path / "run"))
    assert not list((tmp_path / "run").glob("*.pth"))


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, data_roots):
    config = load_spec("train", spec=tiny_spec(data_roots), overrides={"train.precision": "bf16"})
    outcome = run(config, _job(tmp_path / "run"))
    assert outcome.metrics["steps"] == 2 and math.isfinite(outcome.metrics["train_loss"])
    payload = read_checkpoint(tmp_path / "run" / "model_latest.pth")
    assert {value.dtype for value in payload["state_dict"].values() if value.is_floating_point()} == {torch.float32}
