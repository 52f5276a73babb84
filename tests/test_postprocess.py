"""Post-processing: original-size mapping, semantic/instance/panoptic inference, export-friendly tensor stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mask2former.model.postprocess as postprocess
from mask2former.model.postprocess import (PostProcessor, build_postprocessor, instance_inference, instance_topk,
                                           masks_to_boxes, masks_to_original, panoptic_candidates,
                                           panoptic_inference, semantic_inference, semantic_scores)

H, W = 8, 12


def _halves(left: float = 0.9, right: float = 0.1) -> torch.Tensor:
    """[H, W] map: `left` on columns 0..5, `right` on columns 6..11."""
    probs = torch.full((H, W), right)
    probs[:, : W // 2] = left
    return probs


def _class_logits(classes: list[int], num_classes: int, confidence: float = 8.0) -> torch.Tensor:
    """[Q, K+1] logits whose softmax peaks at the given class (num_classes = no-object)."""
    logits = torch.zeros(len(classes), num_classes + 1)
    for q, c in enumerate(classes):
        logits[q, c] = confidence
    return logits


# ---------------------------------------------------------------- original-size mapping

def test_masks_to_original_crops_the_padding_of_a_non_square_input():
    padded, image, orig = (64, 96), (48, 80), (96, 120)  # pad 16 rows and 16 columns; orig is 2x / 1.5x
    logits = torch.full((2, 16, 24), -10.0)  # 1/4 of the padded input
    logits[0, 4:8, 5:15] = 10.0  # a box at padded pixels rows 16..31, cols 20..59
    logits[1, 13:, :] = 50.0  # garbage in the padding rows (cells 12+ are padding; 13+ cannot bleed in)
    logits[1, :, 21:] = 50.0  # garbage in the padding columns (cells 20+)
    result = masks_to_original(logits, image_size=image, padded_size=padded, orig_size=orig)
    assert result.shape == (2, 96, 120)
    rows = torch.nonzero((result[0] > 0).any(1)).flatten()
    cols = torch.nonzero((result[0] > 0).any(0)).flatten()
    # box in original pixels: rows 16*2 .. 32*2, cols 20*1.5 .. 60*1.5 (within the interpolation edge)
    assert abs(int(rows.min()) - 32) <= 2 and abs(int(rows.max()) + 1 - 64) <= 2
    assert abs(int(cols.min()) - 30) <= 2 and abs(int(cols.max()) + 1 - 90) <= 2
    assert not (result[1] > 0).any()
    # Same as the explicit chain: upsample to the padded size, crop, resize.
    chain = F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=False)[:, :, :48, :80]
    chain = F.interpolate(chain, size=orig, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(result, chain)


def test_masks_to_original_rejects_an_image_larger_than_the_padded_input():
    with pytest.raises(ValueError, match="image_size"):
        masks_to_original(torch.zeros(1, 4, 4), image_size=(20, 10), padded_size=(16, 16), orig_size=(5, 5))


# ---------------------------------------------------------------- semantic

def test_semantic_scores_and_argmax():
    logits = _class_logits([0, 2, 3], num_classes=3)[None]  # third query is no-object
    masks = torch.stack([_halves(), _halves(left=0.1, right=0.9), torch.full((H, W), 0.99)])
    mask_logits = torch.logit(masks)[None]
    scores = semantic_scores(logits, mask_logits)
    assert scores.shape == (1, 3, H, W)
    expected = torch.einsum("qk,qhw->khw", logits[0].softmax(-1)[:, :-1], masks)
    torch.testing.assert_close(scores[0], expected)
    sem = semantic_inference(scores[0])
    assert sem.dtype == torch.int64
    assert (sem[:, : W // 2] == 0).all() and (sem[:, W // 2:] == 2).all()


# ---------------------------------------------------------------- instance

def test_instance_topk_scores_and_order():
    logits = torch.tensor([[[4.0, 1.0, 0.0], [0.0, 3.0, 1.0]]])  # Q=2, K=2
    masks = torch.full((1, 2, H, W), -3.0)
    masks[0, 0, :4, :6] = 2.0
    masks[0, 1, 2:, 3:] = 1.0
    scores, classes, selected = instance_topk(logits, masks, topk=3)
    probs = logits[0].softmax(-1)[:, :-1]
    expected_pairs = sorted(((float(probs[q, k]), q, k) for q in range(2) for k in range(2)), reverse=True)[:3]
    assert classes[0].tolist() == [k for _, _, k in expected_pairs]
    for i, (class_prob, q, _) in enumerate(expected_pairs):
        inside = masks[0, q] > 0
        mask_score = float(masks[0, q][inside].sigmoid().mean())
        assert float(scores[0, i]) == pytest.approx(class_prob * mask_score, rel=1e-5)
        torch.testing.assert_close(selected[0, i], masks[0, q])
    assert instance_topk(logits, masks, topk=100)[0].shape == (1, 4)  # clamped to Q*K


def test_instance_boxes_equal_mask_extents():
    mask_logits = torch.full((3, H, W), -1.0)
    mask_logits[0, 2:5, 3:9] = 1.0
    mask_logits[1, 0, 11] = 1.0
    mask_logits[1, 7, 0] = 1.0  # two pixels: box spans the whole image
    result = instance_inference(torch.tensor([0.9, 0.5, 0.1]), torch.tensor([1, 0, 2]), mask_logits)
    assert result["masks"].dtype == torch.bool and result["masks"].shape == (3, H, W)
    assert result["labels"].tolist() == [1, 0, 2]
    assert result["boxes"].tolist() == [[3, 2, 9, 5], [0, 0, 12, 8], [0, 0, 0, 0]]
    assert masks_to_boxes(torch.zeros(0, H, W, dtype=torch.bool)).shape == (0, 4)


# ---------------------------------------------------------------- panoptic

def test_panoptic_candidates_mark_no_object():
    logits = _class_logits([1, 3, 0], num_classes=3)[None]
    logits[0, 2, 0] = 1.0  # weak winner
    masks = torch.zeros(1, 3, 2, 2)
    scores, classes, probs = panoptic_candidates(logits, masks)
    assert classes.tolist() == [[1, -1, 0]]
    assert float(scores[0, 1]) == 0.0
    assert float(scores[0, 0]) == pytest.approx(float(logits[0, 0].softmax(-1).max()))
    torch.testing.assert_close(probs, torch.full((1, 3, 2, 2), 0.5))


def test_panoptic_two_halves_thing_and_stuff():
    scores = torch.tensor([0.9, 0.8, 0.3, 0.0])
    classes = torch.tensor([1, 2, 0, -1])  # q2 below the threshold, q3 no-object
    masks = torch.stack([_halves(), _halves(left=0.1, right=0.9), torch.full((H, W), 0.99),
                         torch.full((H, W), 0.99)])
    seg, info = panoptic_inference(scores, classes, masks, object_mask_threshold=0.4, overlap_threshold=0.5,
                                   thing_classes={1})
    assert seg.dtype == torch.int32
    assert (seg[:, : W // 2] == 1).all() and (seg[:, W // 2:] == 2).all()
    assert info == [{"id": 1, "category_id": 1, "isthing": True, "score": pytest.approx(0.9), "area": H * W // 2},
                    {"id": 2, "category_id": 2, "isthing": False, "score": pytest.approx(0.8), "area": H * W // 2}]


def test_panoptic_overlap_threshold_drops_a_mostly_covered_segment():
    scores = torch.tensor([0.9, 0.95])
    classes = torch.tensor([1, 2])
    whole = torch.full((H, W), 0.9)
    left_three_quarters = torch.full((H, W), 0.05)
    left_three_quarters[:, :9] = 0.9
    masks = torch.stack([whole, left_three_quarters])
    seg, info = panoptic_inference(scores, classes, masks, object_mask_threshold=0.4, overlap_threshold=0.5,
                                   thing_classes={1, 2})
    # q0 wins only 1/4 of its mask: dropped, its pixels stay void
    assert [s["category_id"] for s in info] == [2]
    assert (seg[:, :9] == 1).all() and (seg[:, 9:] == 0).all()
    seg, info = panoptic_inference(scores, classes, masks, object_mask_threshold=0.4, overlap_threshold=0.2,
                                   thing_classes={1, 2})
    assert [s["category_id"] for s in info] == [1, 2]
    assert (seg[:, 9:] == 1).all() and (seg[:, :9] == 2).all()


def test_panoptic_merges_stuff_of_one_class_but_not_things():
    masks = torch.stack([_halves(), _halves(left=0.1, right=0.9)])
    seg, info = panoptic_inference(torch.tensor([0.7, 0.9]), torch.tensor([3, 3]), masks, object_mask_threshold=0.4,
                                   overlap_threshold=0.5, thing_classes={1})
    assert (seg == 1).all()
    assert info == [{"id": 1, "category_id": 3, "isthing": False, "score": pytest.approx(0.9), "area": H * W}]
    seg, info = panoptic_inference(torch.tensor([0.7, 0.9]), torch.tensor([1, 1]), masks, object_mask_threshold=0.4,
                                   overlap_threshold=0.5, thing_classes={1})
    assert [s["id"] for s in info] == [1, 2] and set(seg.unique().tolist()) == {1, 2}


def test_panoptic_low_mask_probability_stays_void_and_nothing_kept_is_all_void():
    probs = _halves(left=0.9, right=0.3)  # right half: winner but prob < 0.5
    seg, info = panoptic_inference(torch.tensor([0.9]), torch.tensor([0]), probs[None], object_mask_threshold=0.4,
                                   overlap_threshold=0.5, thing_classes={0})
    assert (seg[:, : W // 2] == 1).all() and (seg[:, W // 2:] == 0).all()
    assert info[0]["area"] == H * W // 2
    seg, info = panoptic_inference(torch.tensor([0.3]), torch.tensor([0]), probs[None], object_mask_threshold=0.4,
                                   overlap_threshold=0.5, thing_classes={0})
    assert info == [] and (seg == 0).all() and seg.shape == (H, W)
    seg, info = panoptic_inference(torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, H, W),
                                   object_mask_threshold=0.4, overlap_threshold=0.5, thing_classes=set())
    assert info == [] and seg.shape == (H, W) and (seg == 0).all()


# ---------------------------------------------------------------- PostProcessor

def _network_outputs():
    """Two images, padded input 32x48 (mask logits 8x12); query 0 = left half of the image, query 1 = right."""
    logits = torch.stack([_class_logits([1, 2, 3], num_classes=3)] * 2)
    masks = torch.full((2, 3, 8, 12), -10.0)
    masks[0, 0, :, :6] = 10.0  # image 0 fills the whole padded input (32x48)
    masks[0, 1, :, 6:] = 10.0
    masks[1, 0, :5, :4] = 10.0  # image 1 is 16x32 in the padded input: left half = cells 0..3 (rows 0..3);
    masks[1, 1, :5, 4:9] = 10.0  # the first padding cells (row 4, column 8) bleed into the border pixels
    return {"pred_logits": logits, "pred_masks": masks}


def test_postprocessor_panoptic_at_original_sizes():
    processor = PostProcessor(mode="panoptic", object_mask_threshold=0.4, overlap_threshold=0.5, topk=10,
                              thing_classes=[1], num_classes=3)
    results = processor(_network_outputs(), image_sizes=[(32, 48), (16, 32)], padded_size=(32, 48),
                        orig_sizes=[(64, 96), (30, 50)])
    assert len(results) == 2
    for result, (height, width) in zip(results, [(64, 96), (30, 50)]):
        assert set(result) == {"sem_seg", "panoptic_seg"}
        sem = result["sem_seg"]
        assert sem.shape == (height, width) and sem.dtype == torch.int64
        assert (sem[:, : width // 2 - 2] == 1).all() and (sem[:, width // 2 + 2:] == 2).all()
        seg, info = result["panoptic_seg"]
        assert seg.shape == (height, width)
        assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 1, True), (2, 2, False)]
        assert (seg[:, : width // 2 - 2] == 1).all() and (seg[:, width // 2 + 2:] == 2).all()
        assert sum(s["area"] for s in info) == height * width


def test_postprocessor_instance_mode():
    processor = PostProcessor(mode="instance", object_mask_threshold=0.4, overlap_threshold=0.5, topk=2,
                              thing_classes=[], num_classes=3)
    result = processor(_network_outputs(), image_sizes=[(32, 48), (16, 32)], padded_size=(32, 48),
                       orig_sizes=[(32, 48), (16, 32)])[1]
    instances = result["instances"]
    assert instances["labels"].tolist() == [1, 2]
    assert instances["masks"].shape == (2, 16, 32)
    assert instances["boxes"].tolist() == [[0, 0, 16, 16], [16, 0, 32, 16]]
    assert (instances["scores"] > 0.99).all()


def test_postprocessor_semantic_bands_equal_one_pass(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 6, 5, generator=generator),
               "pred_masks": torch.randn(1, 6, 8, 12, generator=generator) * 3}
    processor = PostProcessor(mode="semantic", object_mask_threshold=0.4, overlap_threshold=0.5, topk=10,
                              thing_classes=[], num_classes=4)
    banded_kwargs = dict(image_sizes=[(30, 44)], padded_size=(32, 48), orig_sizes=[(45, 66)])
    monkeypatch.setattr(postprocess, "_SEMANTIC_BAND_ELEMENTS", 4 * 66 * 7)  # bands of 7 rows
    banded = processor(outputs, **banded_kwargs)[0]
    assert set(banded) == {"sem_seg"}
    mask_logits = masks_to_original(outputs["pred_masks"][0], image_size=(30, 44), padded_size=(32, 48),
                                    orig_size=(45, 66))
    expected = semantic_scores(outputs["pred_logits"], mask_logits[None])[0].argmax(0)
    assert torch.equal(banded["sem_seg"], expected)


def test_postprocessor_refuses_mismatches():
    with pytest.raises(ValueError, match="mode"):
        PostProcessor(mode="boxes", object_mask_threshold=0.4, overlap_threshold=0.5, topk=1, thing_classes=[],
                      num_classes=3)
    with pytest.raises(ValueError, match="thing_classes \\[3\\]"):
        PostProcessor(mode="panoptic", object_mask_threshold=0.4, overlap_threshold=0.5, topk=1,
                      thing_classes=[0, 3], num_classes=3)
    processor = PostProcessor(mode="semantic", object_mask_threshold=0.4, overlap_threshold=0.5, topk=1,
                              thing_classes=[], num_classes=5)
    with pytest.raises(ValueError, match="num_classes \\+ 1 = 6"):
        processor(_network_outputs(), image_sizes=[(32, 48)] * 2, padded_size=(32, 48), orig_sizes=[(32, 48)] * 2)


def test_build_postprocessor_maps_the_model_config():
    from mask2former.config.model import ModelConfig

    cfg = ModelConfig()
    cfg.mode = "instance"
    cfg.test_topk_per_image = 7
    cfg.sem_seg_head.num_classes = 9
    processor = build_postprocessor(cfg, thing_classes=[0, 4])
    assert (processor.mode, processor.topk, processor.num_classes) == ("instance", 7, 9)
    assert (processor.object_mask_threshold, processor.overlap_threshold) == (0.4, 0.5)
    assert processor.thing_classes == {0, 4}


# ---------------------------------------------------------------- export

class _TensorStage(torch.nn.Module):
    def forward(self, pred_logits, pred_masks):
        sem = semantic_scores(pred_logits, pred_masks)
        inst = instance_topk(pred_logits, pred_masks, topk=5)
        pano = panoptic_candidates(pred_logits, pred_masks)
        return (sem, *inst, *pano)


def test_tensor_stage_exports_to_onnx_with_dynamic_shapes(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    generator = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 4, 4, generator=generator), torch.randn(2, 4, 8, 12, generator=generator))
    path = tmp_path / "stage.onnx"
    dynamic = {"pred_logits": {0: "batch"}, "pred_masks": {0: "batch", 2: "height", 3: "width"}}
    torch.onnx.export(_TensorStage(), example, str(path), input_names=["pred_logits", "pred_masks"],
                      dynamic_axes=dynamic, opset_version=17, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = (torch.randn(3, 4, 4, generator=generator), torch.randn(3, 4, 6, 10, generator=generator))
    got = session.run(None, {"pred_logits": other[0].numpy(), "pred_masks": other[1].numpy()})
    expected = _TensorStage()(*other)
    assert len(got) == len(expected)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(value), reference, rtol=1e-4, atol=1e-5)
