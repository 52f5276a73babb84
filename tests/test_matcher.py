"""HungarianMatcher: optimal assignment against brute force over all injective assignments."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mask2former.model.matcher import HungarianMatcher

NUM_CLASSES = 4
NUM_POINTS = 64


def _random_case(generator: torch.Generator, num_queries: int, num_targets: list[int], with_ignore: bool = False):
    batch = len(num_targets)
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, NUM_CLASSES + 1, generator=generator) * 2,
        "pred_masks": torch.randn(batch, num_queries, 8, 12, generator=generator) * 3,
    }
    targets = []
    for n in num_targets:
        target = {
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator),
            "masks": torch.rand(n, 32, 48, generator=generator) > 0.5,
        }
        if with_ignore:
            ignore = torch.zeros(32, 48, dtype=torch.bool)
            ignore[:, :20] = True
            target["ignore_mask"] = ignore
        targets.append(target)
    return outputs, targets


def _sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """[C, H, W] maps read at [P, 2] points in [0, 1] -> [C, P] (direct grid_sample, test-side)."""
    grid = (coords * 2 - 1)[None, :, None, :]
    return F.grid_sample(maps[None].float(), grid, mode="bilinear", align_corners=False)[0, :, :, 0]


def _naive_cost(logits, mask_points, target_label, target_points, weights, matcher):
    """Cost of one query against one target, written out point by point."""
    class_cost = -logits.softmax(-1)[target_label]
    bce = F.binary_cross_entropy_with_logits(mask_points, target_points, reduction="none")
    bce = (bce * weights).sum() / max(float(weights.sum()), 1.0)
    probs = mask_points.sigmoid()
    dice = 1 - (2 * (probs * target_points * weights).sum() + 1) / (
        (probs * weights).sum() + (target_points * weights).sum() + 1)
    return matcher.cost_class * class_cost + matcher.cost_mask * bce + matcher.cost_dice * dice


def _naive_cost_matrix(matcher, outputs, target, b, coords):
    num_queries = outputs["pred_logits"].shape[1]
    n = len(target["labels"])
    pred_points = _sample(outputs["pred_masks"][b], coords[b])  # [Q, P]
    target_points = _sample(target["masks"], coords[b])  # [N, P]
    if "ignore_mask" in target:
        weights = (_sample(target["ignore_mask"][None], coords[b])[0] < 0.5).float()
    else:
        weights = torch.ones(coords.shape[1])
    return torch.tensor([[float(_naive_cost(outputs["pred_logits"][b, q], pred_points[q], target["labels"][j],
                                            target_points[j], weights, matcher))
                          for j in range(n)] for q in range(num_queries)]).reshape(num_queries, n)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_ignore", [False, True])
def test_matches_brute_force(seed, with_ignore):
    generator = torch.Generator().manual_seed(seed)
    num_queries = 2 + seed % 4  # 2..5
    num_targets = [min(3, num_queries), seed % 3, 0]
    outputs, targets = _random_case(generator, num_queries, num_targets, with_ignore=with_ignore)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=NUM_POINTS)
    torch.manual_seed(100 + seed)
    indices = matcher(outputs, targets)
    torch.manual_seed(100 + seed)
    coords = torch.rand(len(targets), NUM_POINTS, 2)  # the matcher's documented single draw
    costs = matcher.cost_matrices(outputs, targets, point_coords=coords)
    for b, (target, (pred_idx, tgt_idx)) in enumerate(zip(targets, indices)):
        n = len(target["labels"])
        cost = _naive_cost_matrix(matcher, outputs, target, b, coords)
        torch.testing.assert_close(costs[b], cost, atol=1e-5, rtol=1e-5)
        assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
        assert len(pred_idx) == len(tgt_idx) == n
        best = min(sum(float(cost[q, j]) for j, q in enumerate(assignment))
                   for assignment in itertools.permutations(range(num_queries), n))
        got = sum(float(cost[q, j]) for q, j in zip(pred_idx.tolist(), tgt_idx.tolist()))
        assert got == pytest.approx(best, abs=1e-5)
        assert sorted(tgt_idx.tolist()) == list(range(n))
        assert pred_idx.tolist() == sorted(pred_idx.tolist())


def test_ignored_pixels_do_not_change_costs():
    """Targets that differ only under the ignore mask cost the same; without the ignore mask they do not."""
    generator = torch.Generator().manual_seed(11)
    outputs, targets = _random_case(generator, 4, [2], with_ignore=True)
    changed = {key: value.clone() for key, value in targets[0].items()}
    changed["masks"][:, :, :16] = ~changed["masks"][:, :, :16]  # ignore covers columns 0..19
    matcher = HungarianMatcher(num_points=NUM_POINTS)
    coords = torch.rand(1, NUM_POINTS, 2, generator=generator)
    base = matcher.cost_matrices(outputs, targets, point_coords=coords)[0]
    torch.testing.assert_close(matcher.cost_matrices(outputs, [changed], point_coords=coords)[0], base)
    unignored = [{key: value for key, value in target.items() if key != "ignore_mask"} for target in (targets[0],
                                                                                                     changed)]
    first = matcher.cost_matrices(outputs, unignored[:1], point_coords=coords)[0]
    second = matcher.cost_matrices(outputs, unignored[1:], point_coords=coords)[0]
    assert not torch.allclose(first, second)


def test_zero_targets_everywhere():
    generator = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(generator, 3, [0, 0])
    indices = HungarianMatcher(num_points=NUM_POINTS)(outputs, targets)
    assert len(indices) == 2
    for pred_idx, tgt_idx in indices:
        assert pred_idx.numel() == 0 and tgt_idx.numel() == 0
        assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64


def test_planted_assignment_is_recovered():
    """Queries that are confident copies of the targets (shuffled) are matched to them whatever the points."""
    generator = torch.Generator().manual_seed(3)
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, :16] = True  # top half
    masks[1, 16:, :16] = True  # bottom-left quarter
    masks[2, 16:, 16:] = True  # bottom-right quarter
    labels = torch.tensor([2, 0, 2])
    permutation = [4, 0, 2]  # target j is predicted by query permutation[j]
    pred_masks = torch.full((1, 5, 8, 8), -8.0)
    pred_logits = torch.randn(1, 5, NUM_CLASSES + 1, generator=generator)
    for j, q in enumerate(permutation):
        small = F.interpolate(masks[j][None, None].float(), size=(8, 8), mode="area")[0, 0]
        pred_masks[0, q] = (small * 2 - 1) * 8
        pred_logits[0, q, labels[j]] = 8.0
    indices = HungarianMatcher(num_points=256)({"pred_logits": pred_logits, "pred_masks": pred_masks},
                                               [{"labels": labels, "masks": masks}])
    pred_idx, tgt_idx = indices[0]
    assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == {0: 4, 1: 0, 2: 2}


def test_autocast_does_not_change_matching():
    generator = torch.Generator().manual_seed(7)
    outputs, targets = _random_case(generator, 5, [3, 2])
    outputs = {key: value.to(torch.bfloat16) for key, value in outputs.items()}
    matcher = HungarianMatcher(num_points=NUM_POINTS)
    torch.manual_seed(1)
    expected = matcher(outputs, targets)
    torch.manual_seed(1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = matcher(outputs, targets)
    for (p1, t1), (p2, t2) in zip(expected, got):
        assert torch.equal(p1, p2) and torch.equal(t1, t2)


def test_rejects_labels_outside_classes():
    generator = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(generator, 3, [2])
    targets[0]["labels"] = torch.tensor([0, NUM_CLASSES])
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        HungarianMatcher(num_points=NUM_POINTS)(outputs, targets)


def test_rejects_non_finite_costs():
    generator = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(generator, 3, [2])
    outputs["pred_logits"][0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="image 0"):
        HungarianMatcher(num_points=NUM_POINTS)(outputs, targets)
