"""Checkpoints of NVIDIA TAO's trainer: TAO's parameter names and class layout (no-object logit first, class j =
raw id j) load through `import-weights --format tao` and by detection wherever a checkpoint is read, and the
network's outputs equal the TAO network's, computed TAO's way from the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from mask2former.checkpoint import build_model_from_checkpoint, read_checkpoint
from mask2former.cli import main
from mask2former.model.tao_weights import NEVER_LOGIT
from model_support import perturb_, tiny_model
from test_model_weights import _detectron2_state

K = 5  # TAO's model.sem_seg_head.num_classes


@pytest.fixture(scope="module")
def reference():
    """The network TAO would run: weights of a tiny model, its class head laid out as TAO lays it out."""
    model = tiny_model(seed=2, num_classes=K)
    perturb_(model, seed=21)
    return model.eval()


def tao_checkpoint(model, path):
    """TAO's Lightning checkpoint of ``model``: names under `model.`, no-object logit first."""
    state = {f"model.{key}": torch.from_numpy(value) for key, value in _detectron2_state(model).items()
             if not key.startswith(("pixel_", "criterion."))}
    for name in ("weight", "bias"):
        ours = state[f"model.sem_seg_head.predictor.class_embed.{name}"]
        state[f"model.sem_seg_head.predictor.class_embed.{name}"] = torch.cat([ours[-1:], ours[:-1]])
    state["criterion.empty_weight"] = torch.ones(K + 1)
    torch.save({"epoch": 9, "global_step": 1000, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [], "tao_model": "mask2former"},
               path)
    return path


def tao_outputs(reference, images):
    """(TAO's logits, TAO's semantic scores [B, K, h, w] computed as TAO's post-processor does)."""
    with torch.no_grad():
        out = reference(images)
    logits = torch.cat([out["pred_logits"][..., -1:], out["pred_logits"][..., :-1]], dim=-1)
    semantic = torch.einsum("bqc,bqhw->bchw", F.softmax(logits, dim=-1)[..., 1:], out["pred_masks"].sigmoid())
    return logits, out["pred_masks"], semantic


def our_semantic(out):
    return torch.einsum("bqc,bqhw->bchw", F.softmax(out["pred_logits"], dim=-1)[..., :-1],
                        out["pred_masks"].sigmoid())


def test_a_tao_checkpoint_is_read_by_detection_with_equal_outputs(reference, tmp_path):
    path = tao_checkpoint(reference, tmp_path / "model_epoch_009_step_01000.pth")
    model, config = build_model_from_checkpoint(path)
    assert config.sem_seg_head.num_classes == K + 1  # raw ids 1..K are class indices 1..K; 0 never predicted
    images = torch.randn(2, 3, 64, 96)
    logits, masks, semantic = tao_outputs(reference, images)
    with torch.no_grad():
        out = model(images)
    torch.testing.assert_close(out["pred_masks"], masks, rtol=0, atol=0)
    torch.testing.assert_close(out["pred_logits"][..., 1:K + 1], logits[..., 1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["pred_logits"][..., K + 1], logits[..., 0], rtol=1e-5, atol=1e-6)
    assert torch.all(out["pred_logits"][..., 0] == NEVER_LOGIT)
    ours = our_semantic(out)
    assert torch.all(ours[:, 0] == 0)
    torch.testing.assert_close(ours[:, 1:], semantic, rtol=1e-6, atol=1e-7)  # channel r is raw id r in both
    assert read_checkpoint(path)["epoch"] == 9


def test_import_weights_format_tao_writes_a_checkpoint_of_this_tool(reference, tmp_path, capsys):
    source = tao_checkpoint(reference, tmp_path / "tao.pth")
    images = torch.randn(1, 3, 64, 64)
    logits, masks, semantic = tao_outputs(reference, images)

    output = tmp_path / "imported.pth"
    assert main(["import-weights", "--format", "tao", str(source), str(output)]) == 0
    assert "0 missing, 0 unexpected" in capsys.readouterr().out
    model, config = build_model_from_checkpoint(output)
    assert config.sem_seg_head.num_classes == K + 1
    with torch.no_grad():
        out = model(images)
    torch.testing.assert_close(our_semantic(out)[:, 1:], semantic, rtol=1e-6, atol=1e-7)

    # trained with dataset.contiguous_id true: TAO class j is label-map entry j - 1, here class j - 1
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"dataset": {"contiguous_id": True}, "model": {"sem_seg_head": {
        "num_classes": K, "convs_dim": 64, "mask_dim": 64, "transformer_enc_layers": 2},
        "mask_former": {"num_object_queries": 8, "hidden_dim": 64, "nheads": 8, "dim_feedforward": 96,
                        "dec_layers": 4},
        "backbone": {"swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}}}}))
    contiguous = tmp_path / "contiguous.pth"
    assert main(["import-weights", "--format", "tao", str(source), str(contiguous), "-e", str(spec)]) == 0
    model, config = build_model_from_checkpoint(contiguous)
    assert config.sem_seg_head.num_classes == K
    with torch.no_grad():
        out = model(images)
        expected = reference(images)
    torch.testing.assert_close(out["pred_logits"], expected["pred_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_semantic(out), semantic, rtol=1e-6, atol=1e-7)


def test_the_reading_actions_contiguous_id_lays_out_the_class_head(reference, tmp_path):
    """evaluate/inference read a TAO file with their spec's dataset.contiguous_id: true -> K classes, TAO class
    j + 1 is class j, logits as the reference's."""
    from mask2former import runtime
    from mask2former.config import load_spec

    path = tao_checkpoint(reference, tmp_path / "tao.pth")
    words = {"evaluate.checkpoint": str(path), "dataset.val.type": "ade", "dataset.val.annot_file": "v.jsonl",
             "dataset.label_map": "l.json", "model.mode": "semantic"}
    for contiguous, classes in ((True, K), (False, K + 1)):
        config = load_spec("evaluate", overrides={**words, "dataset.contiguous_id": contiguous})
        runner = runtime.load_runner("checkpoint", path, config, "cpu")
        assert runner.num_classes == classes
    model, _ = build_model_from_checkpoint(path, tao_contiguous_id=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images)["pred_logits"], reference(images)["pred_logits"], rtol=1e-5,
                                   atol=1e-6)


def test_a_tao_checkpoint_with_unknown_weights_is_refused_naming_them(reference, tmp_path):
    path = tao_checkpoint(reference, tmp_path / "tao.pth")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["model.sem_seg_head.extra_head.weight"] = torch.zeros(3)
    torch.save(payload, path)
    with pytest.raises(ValueError, match="model.sem_seg_head.extra_head.weight"):
        read_checkpoint(path)


def test_the_never_logit_vanishes_in_half_precision():
    logits = torch.tensor([NEVER_LOGIT, 0.0, 3.0], dtype=torch.float16)
    assert F.softmax(logits.float(), dim=-1)[0].item() == 0.0
    assert np.isfinite(logits.numpy()).all()


@pytest.mark.slow
def test_export_and_quantize_take_a_tao_result_folder(reference, tmp_path):
    """The actions' door: a TAO result folder (its latest link) as export.checkpoint and quantize.model_path."""
    from mask2former import results

    folder = tmp_path / "tao_train"
    folder.mkdir()
    tao_checkpoint(reference, folder / "model_epoch_009_step_01000.pth")
    (folder / "mask2former_model_latest.pth").symlink_to(folder / "model_epoch_009_step_01000.pth")
    out = tmp_path / "export"
    assert main(["export", "--results-dir", str(out), f"export.checkpoint={folder}", "export.input_height=64",
                 "export.input_width=64", "model.mode=semantic"]) == 0, results.read_status(out)[-1:]
    assert results.read_status(out)[-1]["kpi"]["parity_max_abs_diff"] < 1e-3
    out = tmp_path / "quantize"
    assert main(["quantize", "--results-dir", str(out), f"quantize.model_path={folder}", "model.mode=semantic",
                 "dataset.augmentation.test_min_size=64", "dataset.augmentation.test_max_size=64"]) == 0, \
        results.read_status(out)[-1:]
    assert (out / "quantized_model_torchao.pth").is_file()


def test_tao_swin_sizes_are_named_by_their_preset():
    from mask2former.model.tao_weights import swin_preset

    assert swin_preset({"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48]}) == "large"
    assert swin_preset({"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}) is None
