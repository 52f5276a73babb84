"""Swin backbone: presets, any input size, shifted-window mask, checkpointing, official checkpoints."""

from __future__ import annotations

import pytest
import torch

from mask2former.model import build_backbone
from mask2former.model.backbone.swin import SWIN_PRESETS, SHIFT_MASK_VALUE, shifted_window_mask
from mask2former.model.builder import build_mask2former
from mask2former.model.weights import import_weights, resize_relative_position_bias_table
from model_support import TINY_HEAD, perturb_

SMALL = {"type": None, "embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "drop_path_rate": 0.0}


def _backbone(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_backbone(**{**SMALL, **overrides})


@pytest.mark.parametrize("size, expected", [
    ((100, 130), [(25, 33), (13, 17), (7, 9), (4, 5)]),
    ((64, 224), [(16, 56), (8, 28), (4, 14), (2, 7)]),
    ((33, 29), [(9, 8), (5, 4), (3, 2), (2, 1)]),
])
def test_outputs_cover_any_input_size(size, expected):
    backbone = _backbone().eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, *size))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for (name, feature), hw, channels in zip(out.items(), expected, [32, 64, 128, 256]):
        assert feature.shape == (2, channels, *hw), name
        assert torch.isfinite(feature).all()
    assert backbone.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def test_presets_fill_the_architecture_and_explicit_values_win():
    tiny = build_backbone(type="tiny")
    assert [len(stage.blocks) for stage in tiny.layers] == [2, 2, 6, 2]
    assert tiny.out_channels == {"res2": 96, "res3": 192, "res4": 384, "res5": 768}
    assert [stage.blocks[0].attn.num_heads for stage in tiny.layers] == [3, 6, 12, 24]
    assert sum(p.numel() for p in tiny.parameters()) == pytest.approx(27.5e6, rel=0.01)
    assert SWIN_PRESETS["large"] == {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)}
    custom = build_backbone(type="base", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
    assert custom.out_channels["res5"] == 128
    with pytest.raises(ValueError, match="not a preset"):
        build_backbone(type=None, embed_dim=32)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        build_backbone(type=None, embed_dim=30, depths=[1, 1, 1, 1], num_heads=[4, 4, 4, 4])


def test_shifted_window_mask_separates_the_wrapped_regions():
    mask = shifted_window_mask(14, 14, 7, 3, device=torch.device("cpu"), dtype=torch.float32)
    assert mask.shape == (4, 49, 49)
    assert torch.equal(mask, mask.transpose(1, 2))
    assert (mask[0] == 0).all()  # the top-left window holds one region only
    # Bottom-right window: rows/cols split 4 + 3 -> four regions of 16, 12, 12, 9 tokens.
    region_sizes = sorted((mask[3] == 0).sum(1).unique().tolist())
    assert region_sizes == [9, 12, 16]
    assert set(mask.unique().tolist()) == {0.0, SHIFT_MASK_VALUE}


def test_activation_checkpointing_gives_the_same_outputs_and_gradients():
    plain = _backbone(seed=3)
    checkpointed = _backbone(seed=3, use_checkpoint=True)
    images = torch.randn(1, 3, 70, 90)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        out = model(images)
        sum(f.square().mean() for f in out.values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_drop_path_is_random_in_training_only():
    backbone = _backbone(drop_path_rate=0.5)
    images = torch.randn(4, 3, 64, 64)
    backbone.eval()
    with torch.no_grad():
        assert torch.equal(backbone(images)["res5"], backbone(images)["res5"])
        backbone.train()
        assert not torch.equal(backbone(images)["res5"], backbone(images)["res5"])


def test_absolute_position_embedding_follows_the_input_size():
    backbone = _backbone(ape=True, pretrain_img_size=64)
    assert backbone.absolute_pos_embed.shape == (1, 32, 16, 16)
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 96, 40))["res2"].shape == (1, 32, 24, 10)


def _official_checkpoint(backbone) -> dict:
    """The official Swin classification layout of ``backbone``'s weights (plus head and final norm)."""
    state = {k: v.clone() for k, v in backbone.state_dict().items() if not k.startswith("norm")}
    for i, stage in enumerate(backbone.layers):
        for j, block in enumerate(stage.blocks):
            state[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = block.attn.relative_position_index.view(
                block.window_size ** 2, -1)
            if block.shift_size:
                state[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, block.window_size ** 2,
                                                                        block.window_size ** 2)
    state["norm.weight"] = torch.ones(256)
    state["norm.bias"] = torch.zeros(256)
    state["head.weight"] = torch.randn(1000, 256)
    state["head.bias"] = torch.zeros(1000)
    return {"model": state}


def test_official_checkpoint_loads_into_the_backbone(tmp_path):
    source = _backbone(seed=5)
    perturb_(source, seed=6)
    with torch.no_grad():  # official checkpoints have no per-output norms: keep them at their init
        for i in range(4):
            getattr(source, f"norm{i}").weight.fill_(1.0)
            getattr(source, f"norm{i}").bias.zero_()
    path = tmp_path / "swin.pth"
    torch.save(_official_checkpoint(source), path)

    model = build_mask2former(backbone=_backbone(seed=9), **TINY_HEAD)
    report = import_weights(model, path, "swin")
    assert report.unexpected == []
    assert report.missing == [f"backbone.norm{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    assert all(k.startswith("backbone.") for k in report.loaded)
    assert {k for k in report.skipped if not k.startswith("layers.")} == {"norm.weight", "norm.bias", "head.weight",
                                                                          "head.bias"}
    assert all(k.endswith(("relative_position_index", "attn_mask")) for k in report.skipped if k.startswith("layers."))
    images = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        for name, feature in source.eval()(images).items():
            torch.testing.assert_close(model.backbone.eval()(images)[name], feature)


def test_window_7_checkpoint_loads_into_window_12_with_resized_bias_tables(tmp_path):
    source = _backbone(seed=5)
    perturb_(source, seed=7)
    path = tmp_path / "swin_w7.pth"
    torch.save(_official_checkpoint(source), path)
    target = _backbone(seed=1, window_size=12)
    report = import_weights(target, path, "swin")
    assert report.unexpected == []
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in report.loaded
    table = target.layers[2].blocks[1].attn.relative_position_bias_table
    assert table.shape == (23 * 23, 4)
    expected = resize_relative_position_bias_table(source.layers[2].blocks[1].attn.relative_position_bias_table, 12)
    torch.testing.assert_close(table.detach(), expected.detach())
    with torch.no_grad():
        assert torch.isfinite(target(torch.randn(1, 3, 96, 96))["res5"]).all()


def test_bias_table_resize_keeps_orientation_and_is_identity_at_the_same_size():
    dy = torch.arange(13, dtype=torch.float32).repeat_interleave(13)  # table row = dy * 13 + dx
    table = torch.stack([dy, -dy], dim=1)
    resized = resize_relative_position_bias_table(table, 12).reshape(23, 23, 2)
    # Values depend on the row offset only: constant along dx, increasing along dy.
    torch.testing.assert_close(resized, resized[:, :1].expand_as(resized))
    assert (resized[1:, 0, 0] >= resized[:-1, 0, 0] - 1e-5).all() and resized[-1, 0, 0] > resized[0, 0, 0] + 10
    random_table = torch.randn(169, 3)
    torch.testing.assert_close(resize_relative_position_bias_table(random_table, 7), random_table)
