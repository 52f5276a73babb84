"""From network outputs to semantic, instance and panoptic results at each image's original size.

Two stages:
  - a tensor stage (`semantic_scores`, `instance_topk`, `panoptic_candidates`): pure batched torch with no
    data-dependent shapes, so it can be traced into an exported graph;
  - a host stage (`semantic_inference`, `instance_inference`, `panoptic_inference`): one image at a time,
    variable-size results (kept segments, segment ids).
`PostProcessor` runs both for the PyTorch path, mapping mask logits to the original size first (upstream
Mask2Former order: upsample to the padded input, crop the padding, resize to the file's size, then infer).

Class indices are contiguous 0..K-1; the no-object logit is the last one (index K).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Sequence, Set, Tuple

import torch
import torch.nn.functional as F

MODES = ("panoptic", "instance", "semantic")
# Semantic argmax is computed in row bands holding at most this many class scores, to bound memory at the
# original resolution (K classes x H x W floats would be 1.6 GB for 200 classes on a 1920x1080 image).
_SEMANTIC_BAND_ELEMENTS = 1 << 24


def masks_to_original(mask_logits: torch.Tensor, image_size: Sequence[int], padded_size: Sequence[int],
                      orig_size: Sequence[int]) -> torch.Tensor:
    """Map [C, h, w] maps predicted on the padded input to the image file's [C, H, W] resolution.

    Upsamples to `padded_size` (bilinear, align_corners=False), crops the bottom/right padding down to
    `image_size` (the resized image before padding) and resizes to `orig_size` (bilinear, align_corners=False).
    Sizes are (height, width).
    """
    if mask_logits.dim() != 3:
        raise ValueError(f"masks_to_original expects [C, h, w] maps; got {tuple(mask_logits.shape)}")
    image_h, image_w = (int(v) for v in image_size)
    padded_h, padded_w = (int(v) for v in padded_size)
    orig_h, orig_w = (int(v) for v in orig_size)
    if not (0 < image_h <= padded_h and 0 < image_w <= padded_w):
        raise ValueError(f"masks_to_original: image_size {tuple(image_size)} must be positive and fit inside "
                         f"padded_size {tuple(padded_size)}")
    if orig_h <= 0 or orig_w <= 0:
        raise ValueError(f"masks_to_original: orig_size must be positive; got {tuple(orig_size)}")
    maps = F.interpolate(mask_logits[None], size=(padded_h, padded_w), mode="bilinear", align_corners=False)
    maps = maps[:, :, :image_h, :image_w]
    if (image_h, image_w) == (orig_h, orig_w):  # a bilinear resize to the same size is the identity
        return maps[0]
    return F.interpolate(maps, size=(orig_h, orig_w), mode="bilinear", align_corners=False)[0]


def _check_outputs(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> None:
    if torch.jit.is_tracing():  # shapes are symbolic while exporting; the eager run has checked them
        return
    if pred_logits.dim() != 3 or pred_masks.dim() != 4 or pred_logits.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(f"expected pred_logits [B, Q, K+1] and pred_masks [B, Q, h, w] with the same B and Q; "
                         f"got {tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}")


def _static_size(tensor: torch.Tensor, dim: int) -> int:
    """A size the network fixes (queries Q, classes K+1) as a Python int, silently also while tracing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        return int(tensor.shape[dim])


def semantic_scores(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """[B, K, h, w] class scores: sum over queries of softmax class prob (no-object dropped) x sigmoid mask."""
    _check_outputs(pred_logits, pred_masks)
    class_probs = pred_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", class_probs, pred_masks.sigmoid())


def instance_topk(pred_logits: torch.Tensor, pred_masks: torch.Tensor,
                  topk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (query, class) pairs per image by class probability, rescored by mask quality.

    The k = min(topk, Q*K) best entries of the [Q, K] softmax class probabilities (no-object dropped) are
    kept in descending class-probability order; score = class prob x mean sigmoid mask prob over the pixels
    whose mask logit is > 0 (0 for an empty mask).

    Returns:
        scores [B, k], classes [B, k] (int64, 0..K-1), mask_logits [B, k, h, w] of the selected queries.
    """
    _check_outputs(pred_logits, pred_masks)
    num_classes = _static_size(pred_logits, -1) - 1
    num_queries = _static_size(pred_logits, 1)
    k = min(int(topk), num_queries * num_classes)
    class_probs = pred_logits.softmax(-1)[..., :-1].flatten(1)  # [B, Q*K], query-major
    class_scores, flat_index = class_probs.topk(k, dim=1)
    classes = torch.remainder(flat_index, num_classes)
    queries = torch.div(flat_index, num_classes, rounding_mode="floor")
    height, width = pred_masks.shape[-2:]
    mask_logits = torch.gather(pred_masks, 1, queries[:, :, None, None].expand(-1, -1, height, width))
    inside = (mask_logits > 0).to(mask_logits.dtype).flatten(2)
    mask_scores = (mask_logits.sigmoid().flatten(2) * inside).sum(-1) / (inside.sum(-1) + 1e-6)
    return class_scores * mask_scores, classes, mask_logits


def panoptic_candidates(pred_logits: torch.Tensor,
                        pred_masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query best class over all K+1 classes and mask probabilities.

    Returns:
        scores [B, Q] (max softmax prob; 0 where no-object wins), classes [B, Q] (int64; -1 where no-object
        wins), mask_probs [B, Q, h, w] (sigmoid of the mask logits).
    """
    _check_outputs(pred_logits, pred_masks)
    num_classes = pred_logits.shape[-1] - 1
    scores, classes = pred_logits.softmax(-1).max(-1)
    no_object = classes == num_classes
    scores = torch.where(no_object, torch.zeros_like(scores), scores)
    classes = torch.where(no_object, torch.full_like(classes, -1), classes)
    return scores, classes, pred_masks.sigmoid()


def semantic_inference(class_scores: torch.Tensor) -> torch.Tensor:
    """[H, W] int64 class map: argmax over the classes of [K, H, W] scores (from `semantic_scores`)."""
    if class_scores.dim() != 3:
        raise ValueError(f"semantic_inference expects [K, H, W] scores; got {tuple(class_scores.shape)}")
    return class_scores.max(0).indices  # the first index on ties, as argmax, and faster on the CPU


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[N, 4] float boxes (x1, y1, x2, y2) enclosing [N, H, W] bool masks; x2/y2 are exclusive
    (last pixel + 1, detectron2 BitMasks convention); all zeros for an empty mask."""
    if masks.dim() != 3:
        raise ValueError(f"masks_to_boxes expects [N, H, W] masks; got {tuple(masks.shape)}")
    height, width = masks.shape[-2:]
    rows = masks.any(dim=2)  # [N, H]
    cols = masks.any(dim=1)  # [N, W]
    y1 = rows.to(torch.uint8).argmax(1)
    y2 = height - rows.flip(1).to(torch.uint8).argmax(1)
    x1 = cols.to(torch.uint8).argmax(1)
    x2 = width - cols.flip(1).to(torch.uint8).argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32)
    return boxes * rows.any(dim=1, keepdim=True).to(torch.float32)


def instance_inference(scores: torch.Tensor, classes: torch.Tensor,
                       mask_logits: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One image's instances from `instance_topk` outputs (already at the wanted resolution).

    Returns:
        {"scores" [N] float, "labels" [N] int64, "masks" [N, H, W] bool (logit > 0), "boxes" [N, 4] xyxy}.
    """
    if scores.dim() != 1 or classes.shape != scores.shape or mask_logits.dim() != 3 \
            or mask_logits.shape[0] != scores.shape[0]:
        raise ValueError(f"instance_inference expects scores [N], classes [N], mask_logits [N, H, W]; got "
                         f"{tuple(scores.shape)}, {tuple(classes.shape)}, {tuple(mask_logits.shape)}")
    masks = mask_logits > 0
    return {"scores": scores.to(torch.float32), "labels": classes.to(torch.int64), "masks": masks,
            "boxes": masks_to_boxes(masks)}


def panoptic_inference(scores: torch.Tensor, classes: torch.Tensor, mask_probs: torch.Tensor,
                       object_mask_threshold: float, overlap_threshold: float,
                       thing_classes: Set[int]) -> Tuple[torch.Tensor, List[Dict[str, Any]]]:
    """One image's panoptic segmentation from `panoptic_candidates` outputs (upstream Mask2Former rules).

    Queries with class >= 0 (not no-object) and score > object_mask_threshold compete per pixel by
    score x mask prob; a pixel goes to the winner when the winner's mask prob is >= 0.5, else it stays void.
    A query is dropped when its winning area over its own area (mask prob >= 0.5) is below overlap_threshold.
    Stuff queries of one class (class not in `thing_classes`) merge into one segment.

    Returns:
        panoptic_seg [H, W] int32 (0 = void, segment ids 1, 2, ...) and segments_info: one dict per segment
        {"id", "category_id" (contiguous class index), "isthing", "score" (max over merged queries), "area"}.
    """
    if scores.dim() != 1 or classes.shape != scores.shape or mask_probs.dim() != 3 \
            or mask_probs.shape[0] != scores.shape[0]:
        raise ValueError(f"panoptic_inference expects scores [Q], classes [Q], mask_probs [Q, H, W]; got "
                         f"{tuple(scores.shape)}, {tuple(classes.shape)}, {tuple(mask_probs.shape)}")
    height, width = mask_probs.shape[-2:]
    keep = (classes >= 0) & (scores > object_mask_threshold)
    kept_scores, kept_classes, kept_masks = scores[keep], classes[keep], mask_probs[keep]
    num_kept = kept_scores.shape[0]
    if num_kept == 0:
        return torch.zeros((height, width), dtype=torch.int32, device=mask_probs.device), []
    # max(0).indices, not argmax(0): the same first index on ties, several times faster on the CPU
    winner = (kept_scores[:, None, None] * kept_masks).max(0).indices  # [H, W]
    confident = kept_masks.gather(0, winner[None])[0] >= 0.5
    winner_area = torch.bincount(winner.flatten(), minlength=num_kept).tolist()
    own_area = (kept_masks >= 0.5).flatten(1).sum(1).tolist()
    confident_area = torch.bincount(winner[confident], minlength=num_kept).tolist()
    segment_of_query = [0] * num_kept
    segments: List[Dict[str, Any]] = []
    stuff_segments: Dict[int, Dict[str, Any]] = {}
    for k, (category, score) in enumerate(zip(kept_classes.tolist(), kept_scores.tolist())):
        if winner_area[k] == 0 or own_area[k] == 0 or confident_area[k] == 0:
            continue
        if winner_area[k] / own_area[k] < overlap_threshold:
            continue
        isthing = category in thing_classes
        if not isthing and category in stuff_segments:
            merged = stuff_segments[category]
            merged["score"] = max(merged["score"], score)
            segment_of_query[k] = merged["id"]
            continue
        segment = {"id": len(segments) + 1, "category_id": category, "isthing": isthing, "score": score}
        segments.append(segment)
        if not isthing:
            stuff_segments[category] = segment
        segment_of_query[k] = segment["id"]
    lookup = torch.as_tensor(segment_of_query, dtype=torch.int32, device=mask_probs.device)
    panoptic_seg = lookup[winner] * confident.to(torch.int32)
    areas = torch.bincount(panoptic_seg.flatten().to(torch.int64), minlength=len(segments) + 1).tolist()
    for segment in segments:
        segment["area"] = areas[segment["id"]]
    return panoptic_seg, segments


class PostProcessor:
    """Network outputs -> per-image results at the original image size (PyTorch path).

    Every result has "sem_seg" ([H, W] int64 class map); instance mode adds "instances"
    (`instance_inference`'s dict) and panoptic mode "panoptic_seg" ((seg, segments_info) of
    `panoptic_inference`). Results are returned on the CPU.
    """

    def __init__(self, mode: str, object_mask_threshold: float, overlap_threshold: float, topk: int,
                 thing_classes: Iterable[int], num_classes: int) -> None:
        if mode not in MODES:
            raise ValueError(f"PostProcessor: mode must be one of {list(MODES)}; got {mode!r}")
        if topk < 1:
            raise ValueError(f"PostProcessor: topk must be >= 1; got {topk}")
        self.thing_classes = set(int(c) for c in thing_classes)
        outside = sorted(c for c in self.thing_classes if not 0 <= c < num_classes)
        if outside:
            raise ValueError(f"PostProcessor: thing_classes {outside} are outside 0..{num_classes - 1}")
        self.mode = mode
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.topk = topk
        self.num_classes = num_classes

    @torch.no_grad()
    def __call__(self, outputs: Dict[str, torch.Tensor], image_sizes: Sequence[Sequence[int]],
                 padded_size: Sequence[int], orig_sizes: Sequence[Sequence[int]]) -> List[Dict[str, Any]]:
        """Args: outputs {"pred_logits" [B, Q, K+1], "pred_masks" [B, Q, h, w]}; image_sizes and orig_sizes
        one (height, width) per image; padded_size the batch's (height, width) network input size."""
        pred_logits = outputs["pred_logits"].float()
        pred_masks = outputs["pred_masks"].float()
        _check_outputs(pred_logits, pred_masks)
        if pred_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"PostProcessor: pred_logits has {pred_logits.shape[-1]} classes; expected "
                             f"num_classes + 1 = {self.num_classes + 1}")
        if not len(image_sizes) == len(orig_sizes) == pred_logits.shape[0]:
            raise ValueError(f"PostProcessor: {len(image_sizes)} image_sizes and {len(orig_sizes)} orig_sizes for "
                             f"a batch of {pred_logits.shape[0]}")
        return [self._one_image(logits=pred_logits[b], mask_logits=masks_to_original(
                    pred_masks[b], image_size=image_sizes[b], padded_size=padded_size, orig_size=orig_sizes[b]))
                for b in range(pred_logits.shape[0])]

    def _one_image(self, logits: torch.Tensor, mask_logits: torch.Tensor) -> Dict[str, Any]:
        result: Dict[str, Any] = {"sem_seg": self._semantic(logits=logits, mask_logits=mask_logits).cpu()}
        if self.mode == "instance":
            scores, classes, selected = instance_topk(logits[None], mask_logits[None], topk=self.topk)
            instances = instance_inference(scores[0], classes[0], selected[0])
            result["instances"] = {key: value.cpu() for key, value in instances.items()}
        elif self.mode == "panoptic":
            scores, classes, mask_probs = panoptic_candidates(logits[None], mask_logits[None])
            seg, segments_info = panoptic_inference(
                scores[0], classes[0], mask_probs[0], object_mask_threshold=self.object_mask_threshold,
                overlap_threshold=self.overlap_threshold, thing_classes=self.thing_classes)
            result["panoptic_seg"] = (seg.cpu(), segments_info)
        return result

    def _semantic(self, logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """Semantic argmax in row bands (identical to one pass; bounds the [K, H, W] score memory)."""
        height, width = mask_logits.shape[-2:]
        band = max(1, _SEMANTIC_BAND_ELEMENTS // max(1, self.num_classes * width))
        rows = [semantic_inference(semantic_scores(logits[None], mask_logits[None, :, start:start + band])[0])
                for start in range(0, height, band)]
        return torch.cat(rows, dim=0)


def build_postprocessor(model_cfg: Any, thing_classes: Iterable[int]) -> PostProcessor:
    """PostProcessor from the `model` config section (mode, object_mask_threshold, overlap_threshold,
    test_topk_per_image, sem_seg_head.num_classes) and the contiguous indices of the thing classes."""
    return PostProcessor(mode=model_cfg.mode, object_mask_threshold=model_cfg.object_mask_threshold,
                         overlap_threshold=model_cfg.overlap_threshold, topk=model_cfg.test_topk_per_image,
                         thing_classes=thing_classes, num_classes=model_cfg.sem_seg_head.num_classes)
