"""Evaluation metrics at each image's original resolution, on raw dataset category ids.

- :class:`SemanticEvaluator`: confusion matrix, mIoU, fwIoU, pixel and mean accuracy.
- :class:`PanopticEvaluator`: PQ, SQ, RQ over all, thing and stuff categories (panopticapi semantics).
- :class:`InstanceEvaluator`: mask AP through faster-coco-eval's COCOeval ("segm", the same numbers as pycocotools).

Plain numpy in, plain dicts out (values in percent); no dependency on the data loaders or torch.
"""

from mask2former.metrics._common import read_png
from mask2former.metrics.instance import InstanceEvaluator, evaluate_coco_results_file, masks_to_rle
from mask2former.metrics.panoptic import (
    PanopticEvaluator,
    evaluate_panoptic_files,
    id_to_rgb,
    read_panoptic_png,
    rgb_to_id,
)
from mask2former.metrics.semantic import SemanticEvaluator, evaluate_semantic_files

__all__ = [
    "InstanceEvaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "evaluate_coco_results_file",
    "evaluate_panoptic_files",
    "evaluate_semantic_files",
    "id_to_rgb",
    "masks_to_rle",
    "read_panoptic_png",
    "read_png",
    "rgb_to_id",
]
