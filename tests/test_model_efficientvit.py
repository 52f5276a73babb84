"""EfficientViT backbones: TAO's stage channels and strides, and the official checkpoints' names (MIT .pt and
timm) loading into the backbone through the training door and ``import-weights``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mask2former.checkpoint import build_model_from_checkpoint
from mask2former.config import load_spec
from mask2former.model import build_model
from mask2former.model.backbone.efficientvit import EFFICIENTVIT_VARIANTS, EfficientViT
from mask2former.training.initialization import load_backbone_weights

REPO = Path(__file__).resolve().parents[1]

# Stage channels of TAO's Mask2Former EfficientViT (stem, res2, res3, res4, res5).
TAO_CHANNELS = {
    "b0": [8, 16, 32, 64, 128], "b1": [16, 32, 64, 128, 256], "b2": [24, 48, 96, 192, 384],
    "b3": [32, 64, 128, 256, 512], "l0": [32, 64, 128, 256, 512], "l1": [32, 64, 128, 256, 512],
    "l2": [32, 64, 128, 256, 512], "l3": [64, 128, 256, 512, 1024],
}


def _model_config(name: str):
    spec = {"model": {"backbone": {"type": "efficientvit", "efficientvit": {"name": name}},
                      "sem_seg_head": {"num_classes": 5, "convs_dim": 32, "mask_dim": 32, "transformer_enc_layers": 1},
                      "mask_former": {"num_object_queries": 4, "hidden_dim": 32, "nheads": 4, "dim_feedforward": 32,
                                      "dec_layers": 2}},
            "export": {"checkpoint": "unused.pth"}}
    return load_spec("export", spec=spec).model


def _trained_like(name: str) -> EfficientViT:
    """A backbone whose every parameter and BatchNorm statistic differs from a fresh one's."""
    torch.manual_seed(3)
    backbone = EfficientViT(name=name).eval()
    with torch.no_grad():
        for key, tensor in backbone.state_dict().items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.05)
    return backbone


def _official_file(backbone: EfficientViT, path: Path) -> Path:
    state = {f"backbone.{key}": value for key, value in backbone.state_dict().items()}
    state["head.op_list.0.conv.weight"] = torch.zeros(4, 4, 1, 1)  # classification head: not loaded
    torch.save({"state_dict": state}, path)
    return path


def _timm_file(backbone: EfficientViT, path: Path) -> Path:
    """The same tensors under timm's names (stem.in_conv, stem.res{k}, stages.{i}.blocks.{j})."""
    large = backbone.variant.family == "l"
    stem = r"^stages\.0\.op_list\." if large else r"^input_stem\.op_list\."
    state = {}
    for key, value in backbone.state_dict().items():
        match = re.match(stem + r"(\d+)\.(.*)$", key)
        if match:
            index = int(match.group(1))
            key = f"stem.in_conv.{match.group(2)}" if index == 0 else f"stem.res{index - 1}.{match.group(2)}"
        else:
            match = re.match(r"^stages\.(\d+)\.op_list\.(\d+)\.(.*)$", key)
            key = f"stages.{int(match.group(1)) - int(large)}.blocks.{match.group(2)}.{match.group(3)}"
        state[key] = value
    state["head.classifier.4.weight"] = torch.zeros(10, 4)
    torch.save(state, path)
    return path


def test_every_variant_has_taos_stage_channels_and_strides():
    for name, channels in TAO_CHANNELS.items():
        assert list(EFFICIENTVIT_VARIANTS[name].widths) == channels, name
    for name in ("b0", "l0"):
        backbone = EfficientViT(name=name).eval()
        assert backbone.out_channels == dict(zip(("res2", "res3", "res4", "res5"), TAO_CHANNELS[name][1:]))
        with torch.no_grad():
            features = backbone(torch.randn(1, 3, 64, 96))
        assert {k: tuple(v.shape) for k, v in features.items()} == {
            f"res{i + 2}": (1, TAO_CHANNELS[name][i + 1], 64 // 4 // 2 ** i, 96 // 4 // 2 ** i) for i in range(4)}


def test_activation_checkpointing_gives_the_same_outputs_and_gradients():
    plain = EfficientViT(name="b0")
    checkpointed = EfficientViT(name="b0", use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 64)
    outs = [sum(v.square().mean() for v in model(images).values()) for model in (plain, checkpointed)]
    assert torch.allclose(outs[0], outs[1])
    for out in outs:
        out.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("name, naming", [("b0", "official"), ("l0", "timm")])
def test_official_checkpoint_loads_every_backbone_tensor(tmp_path, name, naming):
    reference = _trained_like(name)
    write = _official_file if naming == "official" else _timm_file
    path = write(reference, tmp_path / f"efficientvit_{name}.pt")

    model = build_model(_model_config(name))
    initial = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    report = load_backbone_weights(model, path, format="efficientvit")

    assert report.missing == [] and report.unexpected == []
    assert all(key.startswith("head.") for key in report.skipped)
    assert len(report.loaded) == len(initial)
    for key, value in model.backbone.state_dict().items():
        if value.is_floating_point():
            assert not torch.equal(value, initial[key]), f"{key} left at its initial value"
    images = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        got, want = model.backbone(images), reference(images)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_import_weights_infers_the_variant_and_writes_a_loadable_checkpoint(tmp_path):
    source = _official_file(_trained_like("b1"), tmp_path / "efficientvit_b1_r224.pt")
    output = tmp_path / "imported.pth"
    result = subprocess.run([sys.executable, "-m", "mask2former", "import-weights", "--format", "efficientvit",
                             str(source), str(output), "model.sem_seg_head.num_classes=7"],
                            cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 missing, 0 unexpected" in result.stdout
    model, config = build_model_from_checkpoint(output)
    assert config.backbone.type == "efficientvit" and config.backbone.efficientvit.name == "b1"
    assert model.backbone.out_channels["res5"] == 256


def test_parameter_count_and_memory_estimate_follow_the_variant():
    from mask2former.resources import count_parameters, estimate_training_memory

    for name in ("b0", "l0"):
        config = _model_config(name)
        with torch.device("meta"):
            built = sum(p.numel() for p in build_model(config).parameters())
        assert count_parameters(config) == built, name
    spec = {"model": {"backbone": {"type": "efficientvit", "efficientvit": {"name": "b2"}}},
            "dataset": {"train": {"img_dir": "/d/images.tar.gz", "panoptic_json": "/d/a.json",
                                  "panoptic_dir": "/d/p.tar.gz", "batch_size": 2}, "label_map": "/d/l.json"}}
    small, large = (estimate_training_memory(load_spec("train", spec=spec, overrides={
        "model.backbone.efficientvit.name": name})) for name in ("b0", "l2"))
    assert 0 < small.breakdown["activations_backbone"] < large.breakdown["activations_backbone"]
    assert any("efficientvit.name" in lever for lever in large.levers)


def test_taos_spec_with_efficientvit_l2_builds_taos_network():
    """TAO's experiment spec (semantic, 200 queries, GN) switched to ``backbone.type: efficientvit`` with its
    ``efficientvit.name: l2`` block: TAO's stage channels 64/128/256/512 at strides 4-32."""
    spec = {"model": {"mode": "semantic",
                      "backbone": {"type": "efficientvit", "swin": {"type": "large", "window_size": 12, "ape": False,
                                                                    "pretrain_img_size": 384},
                                   "efficientvit": {"name": "l2"}},
                      "mask_former": {"num_object_queries": 200}, "sem_seg_head": {"norm": "GN"}},
            "export": {"checkpoint": "unused.pth"}}
    config = load_spec("export", spec=spec).model
    with torch.device("meta"):
        model = build_model(config)
    assert model.backbone.name == "l2"
    assert model.backbone.out_channels == {"res2": 64, "res3": 128, "res4": 256, "res5": 512}
    assert model.backbone.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    assert backbone_params == 49_090_208  # the MIT release's l2 (63.7 M) without its 14.6 M classifier
    print(f"TAO spec, efficientvit l2: backbone {backbone_params:,} parameters, "
          f"Mask2Former {sum(p.numel() for p in model.parameters()):,}")
