"""Point sampling and SetCriterion: values, gradients, no-object weight, ignore pixels, deep supervision."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mask2former.model.criterion import (SetCriterion, average_num_masks, build_criterion, build_weight_dict)
from mask2former.model.matcher import HungarianMatcher
from mask2former.model.point_sampling import point_sample, sample_uncertain_points

NUM_CLASSES = 3
NUM_POINTS = 64


# ---------------------------------------------------------------- point sampling

def test_point_sample_reads_pixel_centres_and_interpolates():
    maps = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)  # H=3, W=4
    centres = torch.tensor([[[(i + 0.5) / 4, (j + 0.5) / 3] for j in range(3) for i in range(4)]])
    torch.testing.assert_close(point_sample(maps, centres)[0, 0], torch.arange(12, dtype=torch.float32))
    between = torch.tensor([[[0.25, 0.5]]])  # halfway between pixel centres (0, 1) and (1, 1) in x
    assert float(point_sample(maps, between)) == pytest.approx((4 + 5) / 2)


def test_point_sample_rejects_bad_shapes():
    with pytest.raises(ValueError, match="coords"):
        point_sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="batch"):
        point_sample(torch.zeros(2, 1, 4, 4), torch.zeros(1, 5, 2))


def test_uncertain_points_land_where_logits_are_near_zero():
    """Logits are 0 in a band of 40% of the width and +-10 elsewhere: with 3x oversampling the importance-
    sampled points fall almost all in the band; uniform points only 40% of the time."""
    torch.manual_seed(0)
    logits = torch.full((4, 1, 20, 20), 10.0)
    logits[:, :, :, 12:] = -10.0
    logits[:, :, :, 4:12] = 0.0  # the band: x in [0.2, 0.6)
    points = sample_uncertain_points(logits, num_points=200, oversample_ratio=3.0, importance_sample_ratio=1.0)
    assert points.shape == (4, 200, 2)
    uncertain = -point_sample(logits, points).abs()[:, 0]
    assert (uncertain > -9.5).float().mean() > 0.97
    uniform = -point_sample(logits, torch.rand(4, 200, 2)).abs()[:, 0]
    assert (uniform > -9.5).float().mean() < 0.6


def test_uncertain_points_mix_importance_and_random():
    torch.manual_seed(0)
    logits = torch.full((2, 1, 16, 16), 10.0)
    logits[:, :, :8] = 0.0  # top half uncertain
    points = sample_uncertain_points(logits, num_points=100, oversample_ratio=2.0, importance_sample_ratio=0.5)
    assert points.shape == (2, 100, 2)
    assert (points >= 0).all() and (points <= 1).all()
    importance, random = points[:, :50], points[:, 50:]
    assert (importance[..., 1] < 0.5 + 1 / 32).all()  # the top half (plus the interpolation edge)
    assert (random[..., 1] > 0.5).any()
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        sample_uncertain_points(logits, num_points=10, oversample_ratio=3.0, importance_sample_ratio=1.5)


# ---------------------------------------------------------------- criterion fixtures

def _criterion(no_object_weight=0.1, deep_supervision=True, num_aux=2, importance_sample_ratio=0.75,
               num_points=NUM_POINTS):
    return SetCriterion(
        num_classes=NUM_CLASSES, matcher=HungarianMatcher(num_points=num_points),
        weight_dict=build_weight_dict(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_aux=num_aux),
        no_object_weight=no_object_weight, num_points=num_points, oversample_ratio=3.0,
        importance_sample_ratio=importance_sample_ratio, deep_supervision=deep_supervision)


def _outputs(seed=0, batch=2, queries=5, num_aux=2, size=(8, 12)):
    generator = torch.Generator().manual_seed(seed)

    def prediction():
        return {"pred_logits": torch.randn(batch, queries, NUM_CLASSES + 1, generator=generator).requires_grad_(),
                "pred_masks": (torch.randn(batch, queries, *size, generator=generator) * 2).requires_grad_()}

    outputs = prediction()
    outputs["aux_outputs"] = [prediction() for _ in range(num_aux)]
    return outputs


def _targets(seed=0, counts=(2, 1), size=(32, 48)):
    generator = torch.Generator().manual_seed(seed + 1000)
    return [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator),
             "masks": torch.rand(n, *size, generator=generator) > 0.5} for n in counts]


def _losses(criterion, outputs, targets, seed=5):
    torch.manual_seed(seed)
    return criterion(outputs, targets)


# ---------------------------------------------------------------- criterion behaviour

def test_losses_finite_and_gradients_reach_every_prediction():
    criterion = _criterion()
    outputs = _outputs()
    losses = _losses(criterion, outputs, _targets())
    expected = {f"{name}{suffix}" for name in ("loss_ce", "loss_mask", "loss_dice") for suffix in ("", "_0", "_1")}
    assert set(losses) == expected
    assert all(torch.isfinite(value) and value.dtype == torch.float32 for value in losses.values())
    criterion.total_loss(losses).backward()
    for prediction in [outputs] + outputs["aux_outputs"]:
        for key in ("pred_logits", "pred_masks"):
            grad = prediction[key].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_total_loss_is_the_weighted_sum():
    criterion = _criterion()
    losses = _losses(criterion, _outputs(), _targets())
    expected = sum(value * (2.0 if key.startswith("loss_ce") else 5.0) for key, value in losses.items())
    torch.testing.assert_close(criterion.total_loss(losses), expected)
    with pytest.raises(KeyError, match="loss_ce_7"):
        criterion.total_loss({"loss_ce_7": torch.tensor(1.0)})


def test_deep_supervision_off_ignores_aux_outputs():
    losses = _losses(_criterion(deep_supervision=False, num_aux=0), _outputs(), _targets())
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}


def test_no_object_weight_changes_the_class_loss_only_when_queries_are_unmatched():
    outputs, targets = _outputs(num_aux=0), _targets()
    low = _losses(_criterion(no_object_weight=0.1), outputs, targets)
    high = _losses(_criterion(no_object_weight=1.0), outputs, targets)
    assert not torch.isclose(low["loss_ce"], high["loss_ce"])
    torch.testing.assert_close(low["loss_mask"], high["loss_mask"])
    full = _targets(counts=(5, 5))  # every query matched: no query is labelled no-object
    low = _losses(_criterion(no_object_weight=0.1), outputs, full)
    high = _losses(_criterion(no_object_weight=1.0), outputs, full)
    torch.testing.assert_close(low["loss_ce"], high["loss_ce"])


def test_class_loss_equals_weighted_cross_entropy_of_the_matching():
    outputs, targets = _outputs(num_aux=0), _targets()
    criterion = _criterion(no_object_weight=0.3)
    torch.manual_seed(9)
    indices = criterion.matcher(outputs, targets)
    classes = torch.full((2, 5), NUM_CLASSES)
    for b, (src, tgt) in enumerate(indices):
        classes[b, src] = targets[b]["labels"][tgt]
    weight = torch.tensor([1.0] * NUM_CLASSES + [0.3])
    expected = F.cross_entropy(outputs["pred_logits"].reshape(-1, NUM_CLASSES + 1), classes.flatten(), weight=weight)
    got = criterion.loss_labels(outputs, targets, indices)["loss_ce"]
    torch.testing.assert_close(got, expected)


def test_ignored_pixels_do_not_change_the_loss():
    outputs = _outputs(num_aux=1)
    targets = _targets()
    for target in targets:
        ignore = torch.zeros(32, 48, dtype=torch.bool)
        ignore[:, 24:] = True
        target["ignore_mask"] = ignore
    changed = [dict(target, masks=target["masks"].clone()) for target in targets]
    for target in changed:
        target["masks"][:, :, 26:] = ~target["masks"][:, :, 26:]
    criterion = _criterion(num_aux=1)
    base, other = _losses(criterion, outputs, targets), _losses(criterion, outputs, changed)
    for key in base:
        torch.testing.assert_close(base[key], other[key])
    # Control: without the ignore mask the same change does alter the mask losses.
    plain = [{k: v for k, v in t.items() if k != "ignore_mask"} for t in targets]
    plain_changed = [{k: v for k, v in t.items() if k != "ignore_mask"} for t in changed]
    assert not torch.isclose(_losses(criterion, outputs, plain)["loss_mask"],
                             _losses(criterion, outputs, plain_changed)["loss_mask"])


def test_perfect_predictions_have_small_losses():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :, :16] = True
    masks[1, :, 16:] = True
    targets = [{"labels": torch.tensor([1, 2]), "masks": masks}]
    small = F.interpolate(masks[None].float(), size=(8, 8), mode="area")[0]
    good_masks = torch.full((1, 4, 8, 8), -20.0)
    good_masks[0, :2] = (small * 2 - 1) * 20
    good_logits = torch.full((1, 4, NUM_CLASSES + 1), -10.0)
    good_logits[0, 0, 1] = good_logits[0, 1, 2] = good_logits[0, 2, 3] = good_logits[0, 3, 3] = 10.0
    criterion = _criterion(num_aux=0, num_points=256)
    good = _losses(criterion, {"pred_logits": good_logits, "pred_masks": good_masks}, targets)
    bad = _losses(criterion, {"pred_logits": torch.zeros(1, 4, NUM_CLASSES + 1),
                              "pred_masks": torch.zeros(1, 4, 8, 8)}, targets)
    assert good["loss_ce"] < 1e-3 and good["loss_dice"] < 0.15 and good["loss_mask"] < 0.5
    assert bad["loss_ce"] > 1.0 and bad["loss_dice"] > 0.3 and bad["loss_mask"] > 0.6


def test_mask_loss_matches_dense_bce_with_uniform_points():
    """With uniform points (importance 0) the point BCE estimates the mean BCE of the upsampled maps."""
    outputs = _outputs(num_aux=0, batch=1, queries=2)
    targets = [{"labels": torch.tensor([0, 1]), "masks": _targets(counts=(2,))[0]["masks"]}]
    criterion = _criterion(num_aux=0, importance_sample_ratio=0.0, num_points=8192)
    indices = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    torch.manual_seed(0)
    got = criterion.loss_masks(outputs, targets, indices, num_masks=2.0)["loss_mask"]
    size = (320, 480)
    dense_logits = F.interpolate(outputs["pred_masks"], size=size, mode="bilinear", align_corners=False)[0]
    dense_targets = F.interpolate(targets[0]["masks"][None].float(), size=size, mode="bilinear",
                                  align_corners=False)[0]
    expected = F.binary_cross_entropy_with_logits(dense_logits, dense_targets, reduction="none").mean((1, 2)).sum() / 2
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=0.03)


def test_images_without_targets():
    criterion = _criterion(num_aux=1)
    outputs = _outputs(num_aux=1)
    losses = _losses(criterion, outputs, _targets(counts=(0, 2)))
    assert all(torch.isfinite(value) for value in losses.values())
    losses = _losses(criterion, outputs, _targets(counts=(0, 0)))
    assert float(losses["loss_mask"].detach()) == 0.0 and float(losses["loss_dice"].detach()) == 0.0
    assert losses["loss_ce"] > 0
    criterion.total_loss(losses).backward()
    assert outputs["pred_masks"].grad is not None and float(outputs["pred_masks"].grad.abs().sum()) == 0.0


def test_half_precision_inputs_give_fp32_losses():
    outputs = _outputs(num_aux=0)
    half = {key: value.detach().to(torch.bfloat16) for key, value in outputs.items() if key != "aux_outputs"}
    as_float = {key: value.float() for key, value in half.items()}
    criterion = _criterion(num_aux=0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = _losses(criterion, half, _targets())
    expected = _losses(criterion, as_float, _targets())
    for key in expected:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key])


def test_bad_configuration_is_refused():
    matcher = HungarianMatcher(num_points=8)
    with pytest.raises(ValueError, match="loss_dice"):
        SetCriterion(num_classes=3, matcher=matcher, weight_dict={"loss_ce": 1.0, "loss_mask": 1.0})
    with pytest.raises(ValueError, match="boxes"):
        SetCriterion(num_classes=3, matcher=matcher, weight_dict={"loss_ce": 1.0}, losses=("labels", "boxes"))
    with pytest.raises(ValueError, match="num_classes \\+ 1 = 4"):
        _criterion()({"pred_logits": torch.zeros(1, 2, 7), "pred_masks": torch.zeros(1, 2, 4, 4)},
                     _targets(counts=(1,)))


def test_build_criterion_maps_the_model_config():
    from mask2former.config.model import ModelConfig

    cfg = ModelConfig()
    cfg.sem_seg_head.num_classes = 7
    cfg.mask_former.dec_layers = 4
    cfg.mask_former.class_weight = 3.0
    cfg.mask_former.no_object_weight = 0.2
    cfg.mask_former.train_num_points = 100
    criterion = build_criterion(cfg)
    assert criterion.num_classes == 7
    assert criterion.matcher.cost_class == 3.0 and criterion.matcher.num_points == 100
    assert criterion.num_points == 100 and criterion.oversample_ratio == 3.0
    assert criterion.importance_sample_ratio == 0.75
    assert float(criterion.class_weights[-1]) == pytest.approx(0.2) and len(criterion.class_weights) == 8
    assert set(criterion.weight_dict) == {f"{k}{s}" for k in ("loss_ce", "loss_mask", "loss_dice")
                                          for s in ("", "_0", "_1", "_2")}
    assert criterion.weight_dict["loss_ce_2"] == 3.0 and criterion.weight_dict["loss_dice"] == 5.0
    cfg.mask_former.deep_supervision = False
    assert set(build_criterion(cfg).weight_dict) == {"loss_ce", "loss_mask", "loss_dice"}


# ---------------------------------------------------------------- distributed num_masks

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, counts: list, results) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results[rank] = average_num_masks(counts[rank], torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_num_masks_is_averaged_over_ranks():
    assert average_num_masks(0, torch.device("cpu")) == 1.0  # clamped, no process group
    assert average_num_masks(5, torch.device("cpu")) == 5.0
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank_main, args=(_free_port(), [1, 4], results), nprocs=2, join=True)
    assert dict(results) == {0: 2.5, 1: 2.5}
