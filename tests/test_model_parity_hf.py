"""Numerical parity with the Hugging Face port after importing its weights (format "hf").

Random HF models (every parameter perturbed so zero-initialised tensors matter) are saved with
save_pretrained, imported, and compared on non-square images: final class and mask logits in eval
mode, and every auxiliary prediction in training mode.
"""

from __future__ import annotations

import pytest
import torch

from mask2former.model import build_backbone, build_mask2former
from mask2former.model.weights import import_weights
from model_support import perturb_

transformers = pytest.importorskip("transformers")

CASES = {
    # Shifted windows in every stage, post-norm, 4 decoder layers cycling all three levels.
    "post_norm": dict(swin=dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7),
                      feature_size=64, mask_feature_size=64, hidden_dim=64, num_queries=10, decoder_layers=5,
                      encoder_layers=2, num_labels=5, dim_feedforward=128, num_attention_heads=8,
                      image=(96, 160)),
    # Pre-norm, decoder wider than the pixel decoder (input projections), 4 heads, window 5.
    "pre_norm_projected": dict(swin=dict(embed_dim=32, depths=[1, 2, 1, 2], num_heads=[2, 2, 4, 4], window_size=5),
                               feature_size=64, mask_feature_size=32, hidden_dim=96, num_queries=7,
                               decoder_layers=4, encoder_layers=1, num_labels=3, dim_feedforward=64,
                               num_attention_heads=4, pre_norm=True, image=(64, 224)),
    # Only the query prediction (no decoder layer), odd image size, no shifted blocks.
    "query_only_odd": dict(swin=dict(embed_dim=48, depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 4], window_size=7),
                           feature_size=32, mask_feature_size=32, hidden_dim=32, num_queries=12, decoder_layers=1,
                           encoder_layers=3, num_labels=9, dim_feedforward=32, num_attention_heads=8,
                           image=(100, 130)),
}


def _hf_and_ours(case: dict, tmp_path):
    swin = case["swin"]
    hf_swin = transformers.SwinConfig(**swin, drop_path_rate=0.0,
                                      out_features=["stage1", "stage2", "stage3", "stage4"])
    kwargs = {k: v for k, v in case.items() if k not in ("swin", "image")}
    hf_config = transformers.Mask2FormerConfig(backbone_config=hf_swin, **kwargs)
    torch.manual_seed(0)
    hf = transformers.Mask2FormerForUniversalSegmentation(hf_config)
    perturb_(hf, seed=1)
    hf.save_pretrained(tmp_path)

    backbone = build_backbone(type=None, drop_path_rate=0.0, **swin)
    ours = build_mask2former(
        backbone=backbone, num_classes=case["num_labels"], convs_dim=case["feature_size"],
        mask_dim=case["mask_feature_size"], transformer_enc_layers=case["encoder_layers"],
        num_queries=case["num_queries"], hidden_dim=case["hidden_dim"], nheads=case["num_attention_heads"],
        dim_feedforward=case["dim_feedforward"], dec_layers=case["decoder_layers"],
        pre_norm=case.get("pre_norm", False),
    )
    report = import_weights(ours, tmp_path, "hf")
    assert report.missing == [] and report.unexpected == [], report.summary()
    assert set(report.skipped) == {"criterion.empty_weight", "model.pixel_level_module.encoder.swin.layernorm.weight",
                                   "model.pixel_level_module.encoder.swin.layernorm.bias"}
    return hf, ours


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_outputs_match_hugging_face(name, tmp_path):
    case = CASES[name]
    hf, ours = _hf_and_ours(case, tmp_path)
    hf.eval()
    ours.eval()
    images = torch.randn(2, 3, *case["image"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(pixel_values=images)
        got = ours(images)
    assert set(got) == {"pred_logits", "pred_masks"}
    assert got["pred_logits"].shape == expected.class_queries_logits.shape
    assert got["pred_masks"].shape == expected.masks_queries_logits.shape
    torch.testing.assert_close(got["pred_logits"], expected.class_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["pred_masks"], expected.masks_queries_logits, atol=1e-4, rtol=0)
    # The masked attention must actually block something, or the test would not exercise it.
    assert (expected.masks_queries_logits < 0).any() and (expected.masks_queries_logits > 0).any()


def test_training_outputs_and_deep_supervision_match_hugging_face(tmp_path):
    case = CASES["post_norm"]
    hf, ours = _hf_and_ours(case, tmp_path)
    hf.train()
    ours.train()
    images = torch.randn(1, 3, *case["image"], generator=torch.Generator().manual_seed(3))
    expected = hf(pixel_values=images, output_auxiliary_logits=True)
    got = ours(images)
    assert len(got["aux_outputs"]) == case["decoder_layers"] - 1 == len(expected.auxiliary_logits)
    for aux, hf_aux in zip(got["aux_outputs"], expected.auxiliary_logits):
        torch.testing.assert_close(aux["pred_logits"], hf_aux["class_queries_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(aux["pred_masks"], hf_aux["masks_queries_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["pred_masks"], expected.masks_queries_logits, atol=1e-4, rtol=0)
