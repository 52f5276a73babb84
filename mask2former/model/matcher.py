"""Hungarian matching of predicted masks to ground-truth segments (Mask2Former's point-based costs)."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from mask2former.model.point_sampling import point_sample


def batch_sigmoid_bce_cost(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every prediction against every target over shared points.

    Args:
        logits: [Q, P] mask logits at the points.
        targets: [N, P] target values in [0, 1] at the same points.
        weights: [P] point weights (0 excludes a point); the mean is over the weight sum.

    Returns:
        [Q, N] costs.
    """
    positive = F.softplus(-logits) * weights  # BCE against 1
    negative = F.softplus(logits) * weights  # BCE against 0
    total = positive @ targets.T + negative @ (1.0 - targets).T
    return total / weights.sum().clamp(min=1.0)


def batch_dice_cost(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Dice loss (+1 smoothed) of every prediction against every target over shared weighted points.

    Args:
        logits: [Q, P] mask logits at the points.
        targets: [N, P] target values in [0, 1].
        weights: [P] point weights (0 excludes a point).

    Returns:
        [Q, N] costs.
    """
    probs = logits.sigmoid() * weights
    weighted_targets = targets * weights
    numerator = 2.0 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + weighted_targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def ignore_point_weights(ignore_mask: torch.Tensor | None, coords: torch.Tensor) -> torch.Tensor:
    """Weights of points for the mask costs/losses: 0 where the sampled ignore mask is >= 0.5, else 1.

    Args:
        ignore_mask: [H, W] bool/uint8 void-or-crowd mask, or None (every point counts).
        coords: [M, P, 2] points in [0, 1].

    Returns:
        [M, P] float weights.
    """
    if ignore_mask is None:
        return torch.ones(coords.shape[:2], dtype=torch.float32, device=coords.device)
    if ignore_mask.dim() != 2:
        raise ValueError(f"target 'ignore_mask' must be [H, W]; got {tuple(ignore_mask.shape)}")
    sampled = point_sample(ignore_mask.to(device=coords.device, dtype=torch.float32)[None, None],
                           coords.reshape(1, -1, 2))
    return (sampled.reshape(coords.shape[:2]) < 0.5).to(torch.float32)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising class, mask-BCE and dice costs.

    The mask costs are computed in fp32 (autocast disabled) on one shared set of `num_points` uniform random
    points per image, read from the predictions and the targets alike: the points are drawn as one
    `torch.rand(B, num_points, 2)` on the logits' device. Pixels under a target's "ignore_mask" are excluded
    from the mask costs.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice cannot all be 0")
        if num_points < 1:
            raise ValueError(f"HungarianMatcher: num_points must be >= 1; got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor],
                targets: Sequence[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w]} (other keys ignored).
            targets: B dicts with "labels" [N] in 0..K-1, "masks" [N, H, W] and optionally "ignore_mask" [H, W].

        Returns:
            B pairs (pred_idx, tgt_idx) of CPU LongTensors of length min(Q, N), pred_idx ascending.
        """
        pred_logits = outputs["pred_logits"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {pred_logits.shape[0]} "
                             "predictions")
        coords = torch.rand(pred_logits.shape[0], self.num_points, 2, device=pred_logits.device)
        costs = self.cost_matrices(outputs, targets, point_coords=coords)
        return [self._assign(cost, image_index=b) for b, cost in enumerate(costs)]

    @torch.no_grad()
    def cost_matrices(self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]],
                      point_coords: torch.Tensor) -> List[torch.Tensor]:
        """Per image, the [Q, N] fp32 matching cost read at `point_coords` [B, P, 2] (in [0, 1])."""
        pred_logits = outputs["pred_logits"]
        device = pred_logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            point_logits = point_sample(outputs["pred_masks"].float(), point_coords.float())  # [B, Q, P]
            probs = pred_logits.float().softmax(-1)  # [B, Q, K+1]
            return [self._cost_matrix(probs=probs[b], point_logits=point_logits[b], target=target,
                                      coords=point_coords[b].float())
                    for b, target in enumerate(targets)]

    def _cost_matrix(self, probs: torch.Tensor, point_logits: torch.Tensor, target: Dict[str, torch.Tensor],
                     coords: torch.Tensor) -> torch.Tensor:
        """[Q, N] total cost for one image."""
        labels = target["labels"]
        num_classes = probs.shape[-1] - 1
        if labels.numel() > 0 and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"target labels must be in 0..{num_classes - 1} (num_classes={num_classes}); got "
                f"min {int(labels.min())}, max {int(labels.max())}"
            )
        if labels.numel() == 0:
            return probs.new_zeros((probs.shape[0], 0))
        masks = target["masks"]
        if masks.shape[0] != labels.shape[0]:
            raise ValueError(f"target has {labels.shape[0]} labels but {masks.shape[0]} masks")
        target_points = point_sample(masks.to(device=coords.device, dtype=torch.float32)[None], coords[None])[0]
        weights = ignore_point_weights(target.get("ignore_mask"), coords[None])[0]  # [P]
        cost_class = -probs[:, labels.to(probs.device)]
        cost_mask = batch_sigmoid_bce_cost(point_logits, target_points, weights)
        cost_dice = batch_dice_cost(point_logits, target_points, weights)
        return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @staticmethod
    def _assign(cost: torch.Tensor, image_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if cost.shape[1] == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty.clone()
        cost = cost.cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError(
                f"HungarianMatcher: the cost matrix of image {image_index} has NaN or inf entries "
                "(diverged predictions?)"
            )
        rows, cols = linear_sum_assignment(cost.numpy())
        return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
