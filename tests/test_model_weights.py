"""Weight import: detectron2 .pkl/.pth layouts, class-head fine-tuning, safe unpickling, the
import-weights command and the checkpoint it writes."""

from __future__ import annotations

import pickle
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mask2former.model import build_model
from mask2former.model.weights import CHECKPOINT_FORMAT_VERSION, import_weights, read_checkpoint_file
from model_support import perturb_, tiny_model

# Our names -> the original repository's names, written out independently of the importer.
_TO_DETECTRON2 = [
    (r"^pixel_decoder\.level_embed$", "sem_seg_head.pixel_decoder.transformer.level_embed"),
    (r"^pixel_decoder\.encoder\.", "sem_seg_head.pixel_decoder.transformer.encoder."),
    (r"^pixel_decoder\.fpn_lateral\.0\.0\.", "sem_seg_head.pixel_decoder.adapter_1."),
    (r"^pixel_decoder\.fpn_lateral\.0\.1\.", "sem_seg_head.pixel_decoder.adapter_1.norm."),
    (r"^pixel_decoder\.fpn_output\.0\.0\.", "sem_seg_head.pixel_decoder.layer_1."),
    (r"^pixel_decoder\.fpn_output\.0\.1\.", "sem_seg_head.pixel_decoder.layer_1.norm."),
    (r"^pixel_decoder\.", "sem_seg_head.pixel_decoder."),
    (r"^transformer_decoder\.layers\.(\d+)\.cross_attn\.",
     r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.multihead_attn."),
    (r"^transformer_decoder\.layers\.(\d+)\.cross_norm\.", r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.norm."),
    (r"^transformer_decoder\.layers\.(\d+)\.self_attn\.", r"sem_seg_head.predictor.transformer_self_attention_layers.\1.self_attn."),
    (r"^transformer_decoder\.layers\.(\d+)\.self_norm\.", r"sem_seg_head.predictor.transformer_self_attention_layers.\1.norm."),
    (r"^transformer_decoder\.layers\.(\d+)\.(linear1|linear2)\.", r"sem_seg_head.predictor.transformer_ffn_layers.\1.\2."),
    (r"^transformer_decoder\.layers\.(\d+)\.ffn_norm\.", r"sem_seg_head.predictor.transformer_ffn_layers.\1.norm."),
    (r"^transformer_decoder\.", "sem_seg_head.predictor."),
]


def _detectron2_state(model, query_name: str = "query_feat") -> dict:
    state = {}
    for key, value in model.state_dict().items():
        for pattern, replacement in _TO_DETECTRON2:
            if re.search(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        state[key.replace("predictor.query_feat.", f"predictor.{query_name}.")] = value.numpy().copy()
    state["pixel_mean"] = np.array([123.675, 116.28, 103.53], dtype=np.float32).reshape(3, 1, 1)
    state["pixel_std"] = np.array([58.395, 57.12, 57.375], dtype=np.float32).reshape(3, 1, 1)
    state["criterion.empty_weight"] = np.ones(6, dtype=np.float32)
    state["backbone.layers.0.blocks.0.attn.relative_position_index"] = np.zeros((49, 49), dtype=np.int64)
    return state


def _outputs(model, images):
    with torch.no_grad():
        return model.eval()(images)


@pytest.fixture(scope="module")
def source_model():
    model = tiny_model(seed=1)
    perturb_(model, seed=11)
    return model


@pytest.mark.parametrize("query_name", ["query_feat", "static_query"])
def test_detectron2_pkl_loads_every_tensor(source_model, tmp_path, query_name):
    path = tmp_path / "model_final.pkl"
    with path.open("wb") as handle:
        pickle.dump({"model": _detectron2_state(source_model, query_name), "__author__": "test"}, handle)
    target = tiny_model(seed=2)
    report = import_weights(target, path, "detectron2")
    assert report.missing == [] and report.unexpected == [], report.summary()
    assert set(report.skipped) == {"pixel_mean", "pixel_std", "criterion.empty_weight",
                                   "backbone.layers.0.blocks.0.attn.relative_position_index"}
    assert len(report.loaded) == len(target.state_dict())
    images = torch.randn(1, 3, 64, 96)
    torch.testing.assert_close(_outputs(target, images)["pred_masks"], _outputs(source_model, images)["pred_masks"])


def test_detectron2_pth_and_a_different_class_count(source_model, tmp_path):
    path = tmp_path / "model_final.pth"
    state = {k: torch.from_numpy(v) for k, v in _detectron2_state(source_model).items()}
    torch.save({"model": state, "iteration": 10}, path)
    target = tiny_model(seed=2, num_classes=3)
    report = import_weights(target, path, "detectron2")
    assert report.class_head_skipped and report.unexpected == []
    assert "num_classes 5 vs 3" in report.skipped["transformer_decoder.class_embed.weight"]
    assert report.missing == []  # the skipped head is reported as skipped, not missing
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_outputs(target, images)["pred_masks"], _outputs(source_model, images)["pred_masks"])
    assert _outputs(target, images)["pred_logits"].shape[-1] == 4


class _NotAnArray:
    pass


def test_pkl_reader_refuses_anything_but_arrays(tmp_path):
    path = tmp_path / "evil.pkl"
    with path.open("wb") as handle:
        pickle.dump({"model": {"w": _NotAnArray()}}, handle)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*_NotAnArray"):
        read_checkpoint_file(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_checkpoint_file(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown weight format 'timm'"):
        import_weights(tiny_model(), path, "timm")


def _namespace(tree):
    return SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in tree.items()})


def test_import_weights_command_writes_a_rebuildable_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mask2former.cli import main

    swin = transformers.SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], drop_path_rate=0.0,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(backbone_config=swin, feature_size=64, mask_feature_size=64,
                                            hidden_dim=64, num_queries=6, decoder_layers=3, encoder_layers=1,
                                            num_labels=4, dim_feedforward=64)
    torch.manual_seed(0)
    hf = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    perturb_(hf, seed=3)
    hf.save_pretrained(tmp_path / "hf")

    output = tmp_path / "imported.pth"
    assert main(["import-weights", "--format", "hf", str(tmp_path / "hf"), str(output)]) == 0
    checkpoint = torch.load(output, weights_only=True)
    assert checkpoint["format_version"] == CHECKPOINT_FORMAT_VERSION
    model_config = checkpoint["model_config"]
    assert model_config["sem_seg_head"]["num_classes"] == 4
    assert model_config["mask_former"]["num_object_queries"] == 6 and model_config["mask_former"]["dec_layers"] == 3
    assert model_config["backbone"]["swin"]["embed_dim"] == 32
    model = build_model(_namespace(model_config))
    model.load_state_dict(checkpoint["state_dict"])
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = hf(pixel_values=images).masks_queries_logits
    torch.testing.assert_close(_outputs(model, images)["pred_masks"], expected, atol=1e-4, rtol=0)


def test_import_weights_command_infers_a_detectron2_architecture_and_takes_overrides(source_model, tmp_path):
    from mask2former.cli import main

    source = tmp_path / "model_final.pkl"
    with source.open("wb") as handle:
        pickle.dump({"model": _detectron2_state(source_model)}, handle)
    output = tmp_path / "out" / "imported.pth"
    code = main(["import-weights", "--format", "detectron2", str(source), str(output),
                 "model.sem_seg_head.num_classes=2"])
    assert code == 0
    checkpoint = torch.load(output, weights_only=True)
    head = checkpoint["model_config"]["mask_former"]
    assert (head["hidden_dim"], head["num_object_queries"], head["nheads"], head["dec_layers"]) == (64, 8, 8, 4)
    assert checkpoint["model_config"]["sem_seg_head"]["num_classes"] == 2  # override wins; head re-initialised
    assert checkpoint["model_config"]["backbone"]["swin"]["depths"] == [1, 1, 1, 1]
    model = build_model(_namespace(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["state_dict"])
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_outputs(model, images)["pred_masks"], _outputs(source_model, images)["pred_masks"])


def test_import_weights_command_reports_unreadable_sources(tmp_path, capsys):
    from mask2former.cli import main

    assert main(["import-weights", "--format", "swin", str(tmp_path / "none.pth"), str(tmp_path / "o.pth")]) == 2
    assert "none.pth does not exist" in capsys.readouterr().out
    (tmp_path / "hf").mkdir()
    assert main(["import-weights", "--format", "hf", str(tmp_path / "hf"), str(tmp_path / "o.pth")]) == 2
    assert "config.json is missing" in capsys.readouterr().out
    assert not (tmp_path / "o.pth").exists()
