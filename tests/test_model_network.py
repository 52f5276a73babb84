"""The assembled network: output contract, training outputs, gradients, deformable attention against a
naive reference, masked-attention mask, mixed precision and the config builder."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mask2former.model import build_model
from mask2former.model.pixel_decoder.msdeform_attn import MSDeformAttn
from mask2former.model.transformer_decoder.masked_decoder import masked_attention_bias
from model_support import perturb_, tiny_model


def test_eval_outputs_for_an_odd_input_size():
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 100, 130))
    assert set(out) == {"pred_logits", "pred_masks"}
    assert out["pred_logits"].shape == (2, 8, 6)  # K + 1 logits, no-object last
    assert out["pred_masks"].shape == (2, 8, 25, 33)


def test_training_outputs_carry_one_auxiliary_prediction_per_earlier_layer():
    model = tiny_model(dec_layers=5).train()
    out = model(torch.randn(1, 3, 64, 96))
    assert len(out["aux_outputs"]) == 4
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_masks"}
        assert aux["pred_logits"].shape == (1, 8, 6) and aux["pred_masks"].shape == (1, 8, 16, 24)
    assert not torch.equal(out["aux_outputs"][-1]["pred_masks"], out["pred_masks"])


def test_eval_shortcuts_leave_the_final_prediction_unchanged():
    """Eval mode skips intermediate heads; without dropout it must equal the training-mode result."""
    model = tiny_model(dec_layers=6)
    perturb_(model, seed=2)
    images = torch.randn(2, 3, 72, 104)
    with torch.no_grad():
        train_out = model.train()(images)
        eval_out = model.eval()(images)
    torch.testing.assert_close(eval_out["pred_logits"], train_out["pred_logits"])
    torch.testing.assert_close(eval_out["pred_masks"], train_out["pred_masks"])


def test_batch_items_are_independent():
    model = tiny_model(swin={"depths": [2, 2, 2, 2]}).eval()
    perturb_(model, seed=3)
    images = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        batched = model(images)["pred_masks"]
        single = torch.cat([model(images[i:i + 1])["pred_masks"] for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_every_parameter():
    model = tiny_model(swin={"depths": [2, 1, 2, 1]}, dec_layers=5).train()
    # Deformable attention starts with zero offset/weight projections, which hides the position
    # embedding's gradient at initialisation only.
    perturb_(model, seed=1)
    out = model(torch.randn(2, 3, 64, 96))
    total = out["pred_logits"].sum() + out["pred_masks"].sum()
    for aux in out["aux_outputs"]:
        total = total + aux["pred_logits"].sum() + aux["pred_masks"].sum()
    total.backward()
    without = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_masked_attention_bias_blocks_background_and_frees_empty_rows():
    logits = torch.tensor([[[1.0, -2.0, 0.5, -0.1], [-1.0, -3.0, -0.2, -4.0]]])
    original = logits.clone()
    bias = masked_attention_bias(logits)
    assert bias.shape == (1, 1, 2, 4)
    assert torch.equal(bias[0, 0, 0], torch.tensor([0.0, -math.inf, 0.0, -math.inf]))
    assert torch.equal(bias[0, 0, 1], torch.zeros(4))  # blocked everywhere -> attends everywhere
    assert torch.equal(logits, original) and not bias.requires_grad


def _naive_deformable_attention(value_levels, shapes, locations, weights):
    """Loop-by-loop bilinear sampling (zero outside the map, pixel centres at +0.5), weighted sum.

    value_levels: per level [heads, D, h, w]; locations [Q, heads, L, P, 2] in [0, 1] (x, y);
    weights [Q, heads, L, P]. Returns [Q, heads, D]."""
    num_queries, heads, levels, points, _ = locations.shape
    out = torch.zeros(num_queries, heads, value_levels[0].shape[1], dtype=torch.float64)
    for q in range(num_queries):
        for h in range(heads):
            for level, (height, width) in enumerate(shapes):
                value = value_levels[level][h].double()
                for p in range(points):
                    x = locations[q, h, level, p, 0].item() * width - 0.5
                    y = locations[q, h, level, p, 1].item() * height - 0.5
                    x0, y0 = math.floor(x), math.floor(y)
                    sample = torch.zeros(value.shape[0], dtype=torch.float64)
                    for dy in (0, 1):
                        for dx in (0, 1):
                            xi, yi = x0 + dx, y0 + dy
                            if 0 <= xi < width and 0 <= yi < height:
                                corner = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                sample += corner * value[:, yi, xi]
                    out[q, h] += weights[q, h, level, p].item() * sample
    return out


def test_deformable_attention_matches_a_naive_bilinear_reference():
    torch.manual_seed(0)
    heads, levels, points, channels = 2, 3, 3, 8
    shapes = [(3, 5), (4, 2), (6, 7)]
    attn = MSDeformAttn(embed_dim=channels, num_heads=heads, num_levels=levels, num_points=points)
    perturb_(attn, scale=0.3, seed=5)
    num_queries = 6
    query = torch.randn(1, num_queries, channels)
    value_in = torch.randn(1, sum(h * w for h, w in shapes), channels)
    reference = torch.rand(num_queries, 2)
    with torch.no_grad():
        got = attn(query, value_in, reference, shapes)[0]
        # The same computation, spelled out.
        value = attn.value_proj(value_in)[0]  # [S, C]
        value_levels, start = [], 0
        for height, width in shapes:
            level = value[start:start + height * width].reshape(height, width, heads, channels // heads)
            value_levels.append(level.permute(2, 3, 0, 1))
            start += height * width
        offsets = attn.sampling_offsets(query)[0].view(num_queries, heads, levels, points, 2)
        normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
        locations = reference[:, None, None, None, :] + offsets / normaliser[None, None, :, None, :]
        weights = attn.attention_weights(query)[0].view(num_queries, heads, levels * points).softmax(-1)
        expected = _naive_deformable_attention(value_levels, shapes, locations,
                                               weights.view(num_queries, heads, levels, points))
        expected = attn.output_proj(expected.reshape(num_queries, channels).float())
    assert (locations < 0).any() or (locations > 1).any(), "some samples should fall outside the maps"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pixel_decoder_stays_float32_under_autocast():
    model = tiny_model().train()
    images = torch.randn(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.backbone(images)
        mask_features, multi_scale = model.pixel_decoder(features)
        out = model(images)
    assert features["res2"].dtype == torch.bfloat16
    assert mask_features.dtype == torch.float32 and all(x.dtype == torch.float32 for x in multi_scale)
    assert torch.isfinite(out["pred_masks"].float()).all()


def _namespace_config(**mask_former):
    swin = SimpleNamespace(type="tiny", embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7,
                           patch_size=4, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1, ape=False,
                           patch_norm=True, out_features=["res2", "res3", "res4", "res5"], pretrain_img_size=224,
                           use_checkpoint=False)
    head = SimpleNamespace(num_classes=7, common_stride=4, transformer_enc_layers=3, convs_dim=64, mask_dim=48,
                           deformable_transformer_encoder_in_features=["res3", "res4", "res5"], norm="GN")
    mf = dict(num_object_queries=12, hidden_dim=64, nheads=4, dim_feedforward=80, dec_layers=10, pre_norm=True,
              dropout=0.0)
    mf.update(mask_former)
    return SimpleNamespace(backbone=SimpleNamespace(type="swin", pretrained_weights=None, swin=swin),
                           sem_seg_head=head, mask_former=SimpleNamespace(**mf))


def test_build_model_maps_every_architecture_key():
    model = build_model(_namespace_config())
    assert [len(stage.blocks) for stage in model.backbone.layers] == [1, 1, 2, 1]
    assert model.backbone.layers[0].blocks[0].drop_path.drop_prob == 0.0
    assert model.backbone.layers[3].blocks[0].drop_path.drop_prob == pytest.approx(0.1)
    assert len(model.pixel_decoder.encoder.layers) == 3
    assert model.pixel_decoder.encoder.layers[0].self_attn.num_heads == 4
    decoder = model.transformer_decoder
    assert len(decoder.layers) == 9 and decoder.layers[0].pre_norm
    assert decoder.num_queries == 12 and decoder.class_embed.out_features == 8
    assert decoder.mask_embed.layers[-1].out_features == 48
    assert decoder.layers[0].linear1.out_features == 80
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64))["pred_masks"].shape == (1, 12, 16, 16)


def test_build_model_accepts_the_typed_spec_and_names_bad_values():
    config = pytest.importorskip("mask2former.config")
    spec = config.load_spec("export", spec={"export": {"checkpoint": "x.pth"}}, overrides={
        "model.backbone.swin.embed_dim": 32, "model.backbone.swin.depths": [1, 1, 1, 1],
        "model.backbone.swin.num_heads": [1, 2, 4, 8], "model.sem_seg_head.num_classes": 3,
        "model.sem_seg_head.convs_dim": 64, "model.sem_seg_head.mask_dim": 64,
        "model.mask_former.hidden_dim": 64, "model.mask_former.num_object_queries": 5,
        "model.mask_former.dec_layers": 2,
    })
    model = build_model(spec.model)
    assert len(model.transformer_decoder.layers) == 1 and model.num_classes == 3
    bad = _namespace_config()
    bad.backbone.type = "resnet"
    with pytest.raises(ValueError, match="model.backbone.type 'resnet'"):
        build_model(bad)
    with pytest.raises(ValueError, match="dec_layers must be >= 1"):
        build_model(_namespace_config(dec_layers=0))


def test_size_constants_cached_under_inference_mode_serve_training():
    """Position embeddings, window maps and masks are cached per size; entries first built under
    torch.inference_mode must still be usable by autograd."""
    from mask2former.model.backbone.swin import window_token_order

    window_token_order.cache_clear()
    model = tiny_model(swin={"depths": [2, 2, 2, 2]})
    perturb_(model, seed=7)
    images = torch.randn(1, 3, 72, 88)
    with torch.inference_mode():
        expected = model.eval()(images)["pred_masks"]
    out = model.train()(images)
    out["pred_masks"].sum().backward()
    assert model.backbone.layers[0].blocks[1].attn.qkv.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images)["pred_masks"], expected)


def test_recomputing_the_pixel_decoder_encoder_gives_the_same_gradients():
    """train.recompute_pixel_decoder trades memory for time only: the gradients are the same."""
    model = tiny_model()
    model.train()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        model.pixel_decoder.encoder.recompute_layers = recompute
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out = model(images)
        (out["pred_logits"].sum() + out["pred_masks"].sum()).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)
