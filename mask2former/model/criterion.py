"""Mask2Former training loss: class cross-entropy plus point-sampled mask BCE and dice, with deep supervision."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mask2former.model.matcher import HungarianMatcher, ignore_point_weights
from mask2former.model.point_sampling import point_sample, sample_uncertain_points

LOSS_TERMS = {"labels": ("loss_ce",), "masks": ("loss_mask", "loss_dice")}


def average_num_masks(num_masks: int, device: torch.device) -> float:
    """Number of target masks per rank: averaged over torch.distributed ranks when initialised, at least 1."""
    total = torch.as_tensor([float(num_masks)], dtype=torch.float32, device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        world_size = dist.get_world_size()
    return float(torch.clamp(total / world_size, min=1.0).item())


def sigmoid_bce_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                     num_masks: float) -> torch.Tensor:
    """Per-mask weighted mean BCE over points, summed over masks and divided by num_masks.

    Args:
        logits: [M, P] predicted logits at the points.
        labels: [M, P] target values in [0, 1].
        weights: [M, P] point weights (0 excludes a point).
    """
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights
    per_mask = loss.sum(1) / weights.sum(1).clamp(min=1.0)
    return per_mask.sum() / num_masks


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Per-mask dice loss (+1 smoothed) over weighted points, summed over masks and divided by num_masks."""
    probs = logits.sigmoid() * weights
    labels = labels * weights
    numerator = 2.0 * (probs * labels).sum(1)
    denominator = probs.sum(1) + labels.sum(1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


class SetCriterion(nn.Module):
    """Losses of one Mask2Former forward pass against its targets.

    For the final prediction and (with deep supervision) every entry of outputs["aux_outputs"], queries are
    matched to targets by `matcher`, then:
      - "labels": cross-entropy over K+1 classes, unmatched queries labelled no-object (index K) whose class
        weight is `no_object_weight` ("loss_ce");
      - "masks": sigmoid BCE ("loss_mask") and dice ("loss_dice") of the matched masks on `num_points`
        importance-sampled points, normalised by the number of target masks averaged over ranks.
    Aux losses carry the suffix _0, _1, ... in aux_outputs order. Everything is computed in fp32 with autocast
    disabled. Pixels under a target's "ignore_mask" get zero weight in the mask losses.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Mapping[str, float],
                 no_object_weight: float = 0.1, losses: Sequence[str] = ("labels", "masks"),
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 deep_supervision: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1; got {num_classes}")
        unknown = [name for name in losses if name not in LOSS_TERMS]
        if unknown or not losses:
            raise ValueError(f"SetCriterion: losses must be a non-empty subset of {sorted(LOSS_TERMS)}; "
                             f"got {list(losses)}")
        needed = [key for name in losses for key in LOSS_TERMS[name] if key not in weight_dict]
        if needed:
            raise ValueError(f"SetCriterion: weight_dict has no weight for {needed}; got keys {sorted(weight_dict)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, outputs: Dict[str, Any], targets: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Unweighted losses: loss_ce, loss_mask, loss_dice and their _<i> copies for aux outputs."""
        pred_logits = outputs["pred_logits"]
        if pred_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"SetCriterion: pred_logits has {pred_logits.shape[-1]} classes; expected "
                             f"num_classes + 1 = {self.num_classes + 1}")
        device = pred_logits.device
        num_masks = average_num_masks(sum(len(t["labels"]) for t in targets), device)
        # Convert the target masks once for the matcher and the losses of every prediction.
        targets = [dict(t, masks=t["masks"].to(device=device, dtype=torch.float32)) for t in targets]
        predictions = [("", outputs)]
        if self.deep_supervision:
            predictions += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        losses: Dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=device.type, enabled=False):
            for suffix, prediction in predictions:
                prediction = {"pred_logits": prediction["pred_logits"].float(),
                              "pred_masks": prediction["pred_masks"].float()}
                indices = self.matcher(prediction, targets)
                for name in self.losses:
                    terms = (self.loss_labels(prediction, targets, indices) if name == "labels"
                             else self.loss_masks(prediction, targets, indices, num_masks))
                    losses.update({key + suffix: value for key, value in terms.items()})
        return losses

    def total_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum of losses[k] * weight_dict[k]; a loss without a weight is an error (not silently dropped)."""
        missing = [key for key in losses if key not in self.weight_dict]
        if missing:
            raise KeyError(f"SetCriterion.total_loss: no weight for {missing} in weight_dict "
                           f"(keys {sorted(self.weight_dict)}); more aux outputs than mask_former.dec_layers - 1?")
        return sum(losses[key] * self.weight_dict[key] for key in losses)

    def loss_labels(self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]],
                    indices: List[Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Cross-entropy over K+1 classes; unmatched queries are no-object (weighted by no_object_weight)."""
        logits = outputs["pred_logits"]  # [B, Q, K+1]
        batch_idx, query_idx = _prediction_index(indices)
        matched_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(logits.device)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[batch_idx.to(logits.device), query_idx.to(logits.device)] = matched_labels.to(torch.int64)
        loss = F.cross_entropy(logits.transpose(1, 2), classes, weight=self.class_weights.to(logits.device))
        return {"loss_ce": loss}

    def loss_masks(self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]],
                   indices: List[Tuple[torch.Tensor, torch.Tensor]], num_masks: float) -> Dict[str, torch.Tensor]:
        """BCE and dice of matched masks on importance-sampled points."""
        pred_masks = outputs["pred_masks"]  # [B, Q, h, w]
        batch_idx, query_idx = _prediction_index(indices)
        if batch_idx.numel() == 0:
            zero = pred_masks.sum() * 0.0  # keeps the graph connected (DDP expects every parameter used)
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        matched = pred_masks[batch_idx.to(pred_masks.device), query_idx.to(pred_masks.device)][:, None]  # [M,1,h,w]
        coords = sample_uncertain_points(matched, num_points=self.num_points, oversample_ratio=self.oversample_ratio,
                                         importance_sample_ratio=self.importance_sample_ratio)  # [M, P, 2]
        point_logits = point_sample(matched, coords).squeeze(1)  # [M, P]
        with torch.no_grad():
            labels, weights = [], []
            start = 0
            for target, (_, tgt) in zip(targets, indices):
                count = len(tgt)
                image_coords = coords[start:start + count]
                start += count
                if count == 0:
                    continue
                masks = target["masks"][tgt.to(target["masks"].device)]
                masks = masks.to(device=image_coords.device, dtype=torch.float32)[:, None]  # [n, 1, H, W]
                labels.append(point_sample(masks, image_coords).squeeze(1))
                weights.append(ignore_point_weights(target.get("ignore_mask"), image_coords))
            labels = torch.cat(labels)
            weights = torch.cat(weights)
        return {"loss_mask": sigmoid_bce_loss(point_logits, labels, weights, num_masks),
                "loss_dice": dice_loss(point_logits, labels, weights, num_masks)}


def _prediction_index(indices: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(batch index, query index) of every matched prediction, image by image."""
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx


def build_weight_dict(class_weight: float, mask_weight: float, dice_weight: float, num_aux: int) -> Dict[str, float]:
    """Loss weights for the final prediction and `num_aux` aux predictions (keys suffixed _0 .. _{num_aux-1})."""
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    weights = dict(base)
    for i in range(num_aux):
        weights.update({f"{key}_{i}": value for key, value in base.items()})
    return weights


def build_criterion(model_cfg: Any) -> SetCriterion:
    """SetCriterion (and its matcher) from the `model` config section.

    Uses mask_former.{class_weight, mask_weight, dice_weight, no_object_weight, deep_supervision,
    train_num_points, oversample_ratio, importance_sample_ratio, dec_layers} and sem_seg_head.num_classes.
    With deep supervision the decoder makes dec_layers predictions: the final one plus dec_layers - 1 aux.
    """
    head = model_cfg.mask_former
    matcher = HungarianMatcher(cost_class=head.class_weight, cost_mask=head.mask_weight, cost_dice=head.dice_weight,
                               num_points=head.train_num_points)
    num_aux = head.dec_layers - 1 if head.deep_supervision else 0
    weight_dict = build_weight_dict(class_weight=head.class_weight, mask_weight=head.mask_weight,
                                    dice_weight=head.dice_weight, num_aux=num_aux)
    return SetCriterion(num_classes=model_cfg.sem_seg_head.num_classes, matcher=matcher, weight_dict=weight_dict,
                        no_object_weight=head.no_object_weight, losses=("labels", "masks"),
                        num_points=head.train_num_points, oversample_ratio=head.oversample_ratio,
                        importance_sample_ratio=head.importance_sample_ratio,
                        deep_supervision=head.deep_supervision)
