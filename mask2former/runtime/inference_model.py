"""The network plus the export-friendly tensor stage of post-processing, with fixed output names.

:class:`InferenceModel` is what the PyTorch runner calls and what export traces into ONNX, so every
runtime (PyTorch, ONNX Runtime, TensorRT) returns the same named tensors::

    always          sem_scores        [B, K, h, w]  softmax class prob (no-object dropped) x sigmoid mask
    instance mode   inst_scores       [B, k]        top-k (query, class) scores x mask quality
                    inst_classes      [B, k]        int64 class indices 0..K-1
                    inst_mask_logits  [B, k, h, w]  mask logits of the selected queries
    panoptic mode   pan_scores        [B, Q]        best class prob per query (0 where no-object wins)
                    pan_classes       [B, Q]        int64 class index per query (-1 where no-object wins)
                    pan_mask_probs    [B, Q, h, w]  sigmoid mask probabilities
                    + the three inst_* tensors (mask AP from the instance head, as upstream reports it)

h, w are a quarter of the padded input; k = min(test_topk_per_image, Q * K). The names and their order
come from :func:`output_names`; exporters name the graph outputs with it.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from ..model.postprocess import instance_topk, panoptic_candidates, semantic_scores

MODES = ("panoptic", "instance", "semantic")
SEMANTIC_OUTPUTS = ("sem_scores",)
INSTANCE_OUTPUTS = ("inst_scores", "inst_classes", "inst_mask_logits")
PANOPTIC_OUTPUTS = ("pan_scores", "pan_classes", "pan_mask_probs")
RAW_OUTPUTS = ("pred_logits", "pred_masks")


def output_names(mode: str) -> Tuple[str, ...]:
    """The tensor names an inference model of ``mode`` returns, in graph-output order."""
    if mode == "semantic":
        return SEMANTIC_OUTPUTS
    if mode == "instance":
        return SEMANTIC_OUTPUTS + INSTANCE_OUTPUTS
    if mode == "panoptic":
        return SEMANTIC_OUTPUTS + PANOPTIC_OUTPUTS + INSTANCE_OUTPUTS
    raise ValueError(f"model.mode={mode!r} is not one of {list(MODES)}")


def tensor_stage(pred_logits: torch.Tensor, pred_masks: torch.Tensor, *, mode: str,
                 topk: int) -> Dict[str, torch.Tensor]:
    """Raw decoder outputs ([B, Q, K+1] logits, [B, Q, h, w] mask logits) -> the named tensors of ``mode``.

    Pure batched torch with no data-dependent shapes; used by :class:`InferenceModel` and by the
    evaluator for raw training outputs, so both paths give identical numbers.
    """
    names = output_names(mode)
    outputs: Dict[str, torch.Tensor] = {"sem_scores": semantic_scores(pred_logits, pred_masks)}
    if "pan_scores" in names:
        scores, classes, mask_probs = panoptic_candidates(pred_logits, pred_masks)
        outputs.update(pan_scores=scores, pan_classes=classes, pan_mask_probs=mask_probs)
    if "inst_scores" in names:
        scores, classes, mask_logits = instance_topk(pred_logits, pred_masks, topk=topk)
        outputs.update(inst_scores=scores, inst_classes=classes, inst_mask_logits=mask_logits)
    return {name: outputs[name] for name in names}


class InferenceModel(nn.Module):
    """``model`` (normalised images -> pred_logits/pred_masks) followed by the tensor stage of ``mode``.

    Args:
        model: a Mask2Former network in eval mode (the caller sets the mode; training outputs also work).
        mode: panoptic | instance | semantic.
        topk: detections kept per image in the instance outputs (model.test_topk_per_image).
    """

    def __init__(self, model: nn.Module, *, mode: str, topk: int) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"model.test_topk_per_image must be >= 1; got {topk}")
        self.output_names = output_names(mode)
        self.model = model
        self.mode = mode
        self.topk = int(topk)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        raw = self.model(images)
        return tensor_stage(raw["pred_logits"].float(), raw["pred_masks"].float(), mode=self.mode, topk=self.topk)
