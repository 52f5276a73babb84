"""Optimiser parameter groups and learning-rate schedules of training."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mask2former.config import load_spec
from mask2former.model import build_model
from mask2former.training.optim import (build_optimizer, build_param_groups, build_scheduler, classify_parameters,
                                        lr_multiplier_fn, milestone_steps)


class ToyNet(nn.Module):
    """Names like the real network: a backbone with a bias table and norms, a head with embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.proj = nn.Linear(4, 4)
        self.backbone.norm = nn.LayerNorm(4)
        self.backbone.attn = nn.Module()
        self.backbone.attn.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.backbone.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 2, 2))
        self.head = nn.Module()
        self.head.conv = nn.Conv2d(4, 4, 1)
        self.head.gn = nn.GroupNorm(2, 4)
        self.head.query_feat = nn.Embedding(3, 4)
        self.head.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.head.class_embed = nn.Linear(4, 5)


def _optim_cfg(**kw):
    base = dict(type="AdamW", lr=1e-3, backbone_multiplier=0.1, weight_decay=0.05, momentum=0.9,
                lr_scheduler="MultiStep", milestones=[2, 3], gamma=0.1, warmup_iters=0, warmup_factor=1e-3,
                poly_power=0.9)
    base.update(kw)
    return SimpleNamespace(**base)


def test_no_decay_on_norms_embeddings_and_bias_tables():
    groups = classify_parameters(ToyNet())
    no_decay = {name for name, info in groups.items() if not info.decay}
    assert no_decay == {
        "backbone.norm.weight", "backbone.norm.bias", "backbone.attn.relative_position_bias_table",
        "backbone.absolute_pos_embed", "head.gn.weight", "head.gn.bias", "head.query_feat.weight",
        "head.level_embed"}
    # linear/conv weights AND their biases decay (upstream: only norms and embeddings are exempt)
    assert groups["head.class_embed.bias"].decay and groups["backbone.proj.weight"].decay
    assert {name for name, info in groups.items() if info.backbone} == {
        name for name in groups if name.startswith("backbone.")}


def test_param_groups_lr_and_decay_values_and_frozen_left_out():
    net = ToyNet()
    net.head.conv.weight.requires_grad_(False)
    groups = {g["name"]: g for g in build_param_groups(net, lr=1e-3, weight_decay=0.05, backbone_multiplier=0.1)}
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone_no_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["head_decay"]["lr"] == pytest.approx(1e-3)
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["head_no_decay"]["weight_decay"] == 0.0
    assert groups["head_decay"]["weight_decay"] == 0.05
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert id(net.head.conv.weight) not in in_groups
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(in_groups) == len(trainable)  # each trainable parameter exactly once


def test_adamw_betas_from_momentum():
    optimizer = build_optimizer(ToyNet(), _optim_cfg(momentum=0.85))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["betas"] == (0.85, 0.999) for group in optimizer.param_groups)


def test_fused_adamw_where_asked_and_supported():
    net = ToyNet()
    assert build_optimizer(net, _optim_cfg(), fused=True).defaults["fused"] is True
    assert not build_optimizer(net, _optim_cfg()).defaults["fused"]
    # a parameter on a device without the fused kernel falls back to the plain implementation
    net.head.conv.weight = torch.nn.Parameter(torch.zeros(net.head.conv.weight.shape, device="meta"))
    assert not build_optimizer(net, _optim_cfg(), fused=True).defaults["fused"]


def test_fused_and_plain_adamw_take_the_same_steps():
    torch.manual_seed(0)
    nets = [ToyNet(), ToyNet()]
    nets[1].load_state_dict(nets[0].state_dict())
    optimizers = [build_optimizer(net, _optim_cfg(), fused=fused) for net, fused in zip(nets, (False, True))]
    for _ in range(3):
        for net, optimizer in zip(nets, optimizers):
            sum((p.sin() + 0.1).square().sum() for p in net.parameters()).backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, plain), fused in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6, msg=name)


def test_real_network_groups():
    overrides = {"model.backbone.swin.embed_dim": 32, "model.backbone.swin.depths": [1, 1, 1, 1],
                 "model.backbone.swin.num_heads": [1, 2, 4, 8], "model.sem_seg_head.convs_dim": 32,
                 "model.sem_seg_head.mask_dim": 32, "model.sem_seg_head.transformer_enc_layers": 1,
                 "model.mask_former.hidden_dim": 32, "model.mask_former.nheads": 4,
                 "model.mask_former.dim_feedforward": 64, "model.mask_former.dec_layers": 2,
                 "model.mask_former.num_object_queries": 5, "model.sem_seg_head.num_classes": 4}
    model = build_model(load_spec("export", overrides=dict(overrides, **{"export.checkpoint": "x.pth"})).model)
    groups = classify_parameters(model)
    no_decay = {name for name, info in groups.items() if not info.decay}
    for expected in ("backbone.layers.0.blocks.0.attn.relative_position_bias_table",
                     "transformer_decoder.query_feat.weight", "transformer_decoder.query_embed.weight",
                     "transformer_decoder.level_embed.weight", "pixel_decoder.level_embed",
                     "backbone.norm0.weight", "transformer_decoder.decoder_norm.bias",
                     "pixel_decoder.input_proj.0.1.weight"):
        assert expected in no_decay, expected
    for decays in ("backbone.layers.0.blocks.0.attn.qkv.weight", "transformer_decoder.class_embed.weight",
                   "pixel_decoder.mask_features.weight"):
        assert groups[decays].decay, decays
    assert all(info.backbone == name.startswith("backbone.") for name, info in groups.items())


def _curve(cfg, *, total_steps, steps_per_epoch, steps):
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [param], "lr": cfg.lr}, {"params": [nn.Parameter(torch.zeros(1))],
                                                                       "lr": cfg.lr * 0.1}], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def test_multistep_milestones_are_epochs_with_linear_warmup():
    cfg = _optim_cfg(lr=1.0, milestones=[2, 3], gamma=0.1, warmup_iters=4, warmup_factor=0.1)
    lrs = _curve(cfg, total_steps=40, steps_per_epoch=10, steps=40)
    head = [lr[0] for lr in lrs]
    assert head[0] == pytest.approx(0.1)                       # warmup_factor at step 0
    assert head[2] == pytest.approx(0.1 + 0.9 * 2 / 4)         # linear ramp
    assert head[4:20] == pytest.approx([1.0] * 16)             # epochs 1-2 at the base lr
    assert head[20:30] == pytest.approx([0.1] * 10)            # milestone epoch 2 -> step 20
    assert head[30:] == pytest.approx([0.01] * 10)             # milestone epoch 3 -> step 30
    assert [lr[1] for lr in lrs][25] == pytest.approx(0.01)     # the backbone group scales the same way


def test_warmup_poly_reaches_zero_at_the_last_step():
    cfg = _optim_cfg(lr=2.0, lr_scheduler="WarmupPoly", poly_power=0.9, warmup_iters=2, warmup_factor=0.5)
    lrs = [lr[0] for lr in _curve(cfg, total_steps=10, steps_per_epoch=5, steps=11)]
    assert lrs[0] == pytest.approx(2.0 * 0.5 * 1.0)
    assert lrs[1] == pytest.approx(2.0 * 0.75 * (1 - 1 / 10) ** 0.9)
    for step in range(2, 11):
        assert lrs[step] == pytest.approx(2.0 * (1 - step / 10) ** 0.9)
    assert lrs[10] == 0.0
    assert all(a > b for a, b in zip(lrs[2:10], lrs[3:11]))  # decreasing after the warm-up


def test_schedule_is_rebuilt_from_the_spec_on_resume():
    """The step position comes from the scheduler state; the curve (e.g. a longer run) from the spec."""
    cfg = _optim_cfg(lr=1.0, lr_scheduler="WarmupPoly", poly_power=1.0)
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    short = build_scheduler(optimizer, cfg, total_steps=10, steps_per_epoch=5)
    for _ in range(4):
        optimizer.step()
        short.step()
    state = short.state_dict()
    assert "lr_lambdas" not in state or state["lr_lambdas"] == [None]
    optimizer2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    longer = build_scheduler(optimizer2, cfg, total_steps=20, steps_per_epoch=5)
    longer.load_state_dict(state)
    optimizer2.step()
    longer.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(1 - 5 / 20)


def test_multiplier_rejects_unknown_scheduler():
    with pytest.raises(ValueError, match="lr_scheduler 'Cosine'"):
        lr_multiplier_fn(scheduler="Cosine", total_steps=1, steps_per_epoch=1, milestones=[], gamma=0.1,
                         warmup_iters=0, warmup_factor=1.0, poly_power=0.9)
    assert math.isclose(lr_multiplier_fn(scheduler="MultiStep", total_steps=5, steps_per_epoch=1, milestones=[1],
                                         gamma=0.5, warmup_iters=0, warmup_factor=1.0, poly_power=0.9)(1), 0.5)


def test_tao_default_milestones_decay_a_short_run_at_the_same_fractions():
    # TAO's [88, 96] are epochs of a 100-epoch schedule: a 10-epoch run would never decay and end noisy
    assert milestone_steps([88, 96], steps_per_epoch=10, total_steps=100) == [88, 96]
    assert milestone_steps([88, 96], steps_per_epoch=3, total_steps=30) == [26, 29]
    lrs = _curve(_optim_cfg(lr=1.0, milestones=[88, 96]), total_steps=100, steps_per_epoch=10, steps=100)
    assert [round(lr[0], 6) for lr in (lrs[87], lrs[88], lrs[95], lrs[96], lrs[99])] == [1.0, 0.1, 0.1, 0.01, 0.01]


def test_milestones_reached_or_chosen_act_as_written():
    assert milestone_steps([88, 96], steps_per_epoch=2, total_steps=200) == [176, 192]  # a 100-epoch run: TAO's
    assert milestone_steps([20, 30], steps_per_epoch=2, total_steps=20) == [40, 60]  # the user's choice: never
    assert milestone_steps([2, 3], steps_per_epoch=5, total_steps=20) == [10, 15]
