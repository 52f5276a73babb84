"""Host stage: named runner outputs -> one :class:`ImagePrediction` per image at its ORIGINAL size, in raw
category ids.

The tensor stage (mask2former.runtime.inference_model) works at a quarter of the padded input; here each
image's maps are upsampled to the padded input, cropped to the resized image and resized to the file's
size (mask2former.model.postprocess.masks_to_original), then the per-image rules of
mask2former.model.postprocess run. Memory stays bounded at large resolutions: semantic scores and
instance masks are upsampled a few channels at a time, and only the panoptic queries that pass the score
threshold are upsampled at all (the others cannot win a pixel).

Raw decoder outputs (``pred_logits``/``pred_masks``, as training validation has them) go through the same
tensor stage first, so validation and the evaluate action compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..data.label_map import IGNORE_VALUE, LabelMap
from ..metrics import masks_to_rle
from ..model.postprocess import masks_to_original, panoptic_inference
from ..runtime.inference_model import RAW_OUTPUTS, output_names, tensor_stage

# Upsampled channels held at once: at most this many float32 values (64 MB).
CHUNK_ELEMENTS = 1 << 24


@dataclass
class ImagePrediction:
    """One image's results at its original size, raw category ids.

    ``sem_seg``: int32 [H, W], 255 where the predicted class has no label-map entry (None only while
    prediction files of another kind are scored).
    ``panoptic_seg``/``segments_info`` (panoptic mode): int32 segment ids (0 void) and
    {id, category_id, isthing, score, area} per segment.
    ``instances`` (instance and panoptic mode): COCO results entries without image_id:
    {category_id, segmentation (RLE, str counts), score, bbox [x, y, w, h]}.
    """

    image_id: int
    file_name: str
    orig_size: Tuple[int, int]
    sem_seg: Optional[np.ndarray]
    panoptic_seg: Optional[np.ndarray] = None
    segments_info: Optional[List[Dict[str, Any]]] = None
    instances: Optional[List[Dict[str, Any]]] = None


class HostStage:
    """Runner outputs of a batch -> ImagePredictions (see the module docstring).

    Args:
        label_map: class index <-> raw id, thing classes.
        mode: panoptic | instance | semantic (the outputs must hold that mode's names).
        object_mask_threshold, overlap_threshold: panoptic rules.
        topk: detections per image when raw outputs are converted (model.test_topk_per_image).
    """

    def __init__(self, *, label_map: LabelMap, mode: str, object_mask_threshold: float, overlap_threshold: float,
                 topk: int) -> None:
        self.names = output_names(mode)
        self.label_map = label_map
        self.mode = mode
        self.object_mask_threshold = float(object_mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.topk = int(topk)
        self.thing_classes = set(label_map.thing_classes)
        self._raw_ids = np.full(label_map.num_classes, IGNORE_VALUE, dtype=np.int32)
        for index, raw_id in label_map.index_to_raw.items():
            self._raw_ids[index] = raw_id

    @classmethod
    def from_config(cls, model_cfg: Any, label_map: LabelMap) -> "HostStage":
        return cls(label_map=label_map, mode=model_cfg.mode, object_mask_threshold=model_cfg.object_mask_threshold,
                   overlap_threshold=model_cfg.overlap_threshold, topk=model_cfg.test_topk_per_image)

    def named_outputs(self, outputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Runner outputs as they are, or raw decoder outputs through the tensor stage; checked."""
        if all(name in outputs for name in RAW_OUTPUTS):
            outputs = tensor_stage(outputs["pred_logits"].float(), outputs["pred_masks"].float(), mode=self.mode,
                                   topk=self.topk)
        missing = [name for name in self.names if name not in outputs]
        if missing:
            raise ValueError(f"model.mode={self.mode} needs the outputs {list(self.names)}; the model gave "
                             f"{sorted(outputs)} (missing {missing}). Was it exported in another mode?")
        classes = outputs["sem_scores"].shape[1]
        if classes != self.label_map.num_classes:
            raise ValueError(f"the model predicts {classes} classes but the label map was built for "
                             f"model.sem_seg_head.num_classes={self.label_map.num_classes}")
        return {name: outputs[name] for name in self.names}

    @torch.no_grad()
    def __call__(self, outputs: Mapping[str, torch.Tensor],
                 metas: Sequence[Mapping[str, Any]]) -> List[ImagePrediction]:
        named = self.named_outputs(outputs)
        batch = named["sem_scores"].shape[0]
        if batch != len(metas):
            raise ValueError(f"{batch} predictions for {len(metas)} images")
        return [self._one(named={k: v[b] for k, v in named.items()}, meta=metas[b]) for b in range(batch)]

    def _one(self, *, named: Dict[str, torch.Tensor], meta: Mapping[str, Any]) -> ImagePrediction:
        low_h, low_w = named["sem_scores"].shape[-2:]
        sizes = {"image_size": tuple(meta["image_size"]), "orig_size": tuple(meta["orig_size"]),
                 "padded_size": tuple(meta.get("padded_size") or (4 * low_h, 4 * low_w))}
        prediction = ImagePrediction(image_id=int(meta["image_id"]), file_name=str(meta["file_name"]),
                                     orig_size=sizes["orig_size"],
                                     sem_seg=self._semantic(named["sem_scores"].float(), sizes))
        if "pan_scores" in named:
            prediction.panoptic_seg, prediction.segments_info = self._panoptic(
                named["pan_scores"], named["pan_classes"], named["pan_mask_probs"].float(), sizes)
        if "inst_scores" in named:
            prediction.instances = self._instances(named["inst_scores"], named["inst_classes"],
                                                   named["inst_mask_logits"].float(), sizes)
        return prediction

    # ------------------------------------------------------------------ semantic
    def _semantic(self, scores: torch.Tensor, sizes: Dict[str, Tuple[int, int]]) -> np.ndarray:
        """Argmax over classes at the original size, a few classes at a time (first class wins ties)."""
        best_value: Optional[torch.Tensor] = None
        best_index: Optional[torch.Tensor] = None
        for start, chunk in _chunks(scores, sizes["orig_size"]):
            value, index = masks_to_original(chunk, **sizes).max(0)
            index = index + start
            if best_value is None:
                best_value, best_index = value, index
            else:
                better = value > best_value
                best_value = torch.where(better, value, best_value)
                best_index = torch.where(better, index, best_index)
        return self._raw_ids[best_index.cpu().numpy()]

    # ------------------------------------------------------------------ panoptic
    def _panoptic(self, scores: torch.Tensor, classes: torch.Tensor, mask_probs: torch.Tensor,
                  sizes: Dict[str, Tuple[int, int]]) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
        keep = (classes >= 0) & (scores > self.object_mask_threshold)
        kept_probs = mask_probs[keep]
        if kept_probs.shape[0]:
            kept_probs = masks_to_original(kept_probs, **sizes)
        else:
            kept_probs = kept_probs.new_zeros((0,) + tuple(sizes["orig_size"]))
        seg, segments = panoptic_inference(scores[keep], classes[keep], kept_probs,
                                           object_mask_threshold=self.object_mask_threshold,
                                           overlap_threshold=self.overlap_threshold, thing_classes=self.thing_classes)
        seg = seg.cpu().numpy().astype(np.int32)
        kept_segments = []
        for segment in segments:
            raw_id = int(self._raw_ids[segment["category_id"]])
            if raw_id == IGNORE_VALUE:  # a class without a label-map entry: its pixels become void
                seg[seg == segment["id"]] = 0
                continue
            kept_segments.append({"id": int(segment["id"]), "category_id": raw_id, "isthing": bool(segment["isthing"]),
                                  "score": float(segment["score"]), "area": int(segment["area"])})
        return seg, kept_segments

    # ------------------------------------------------------------------ instances
    def _instances(self, scores: torch.Tensor, classes: torch.Tensor, mask_logits: torch.Tensor,
                   sizes: Dict[str, Tuple[int, int]]) -> List[Dict[str, Any]]:
        """Detections of classes with a label-map entry; in panoptic mode things only (as upstream)."""
        wanted = [c in self.thing_classes if self.mode == "panoptic" else self._raw_ids[c] != IGNORE_VALUE
                  for c in classes.tolist()]
        keep = torch.as_tensor(wanted, dtype=torch.bool, device=classes.device)
        scores, classes, mask_logits = scores[keep].tolist(), classes[keep].tolist(), mask_logits[keep]
        detections: List[Dict[str, Any]] = []
        for start, chunk in _chunks(mask_logits, sizes["orig_size"]):
            masks = (masks_to_original(chunk, **sizes) > 0).cpu().numpy()
            for offset, rle in enumerate(masks_to_rle(masks)):
                position = start + offset
                detections.append({"category_id": int(self._raw_ids[classes[position]]), "segmentation": rle,
                                   "score": float(scores[position]), "bbox": _bbox(rle)})
        return detections


def _chunks(maps: torch.Tensor, orig_size: Tuple[int, int]):
    """(start, maps[start:start + n]) with n channels of the original size fitting CHUNK_ELEMENTS."""
    step = max(1, CHUNK_ELEMENTS // max(1, int(orig_size[0]) * int(orig_size[1])))
    for start in range(0, maps.shape[0], step):
        yield start, maps[start:start + step]


def _bbox(rle: Dict[str, Any]) -> List[float]:
    return [float(v) for v in mask_utils.toBbox(rle)]
