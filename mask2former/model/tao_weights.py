"""Checkpoints written by NVIDIA TAO's Mask2Former trainer: its parameter names and class layout.

A TAO checkpoint is PyTorch Lightning's ``.pth`` (``state_dict``, ``epoch``, ``global_step``, optimizer and
loop states, ``tao_model: "mask2former"``). Its weights sit under the Lightning module's ``model.``:
``model.backbone.*`` (a Swin with per-output ``norm{i}``), ``model.sem_seg_head.pixel_decoder.*`` and
``model.sem_seg_head.predictor.*`` (the original repository's module names), plus the loss buffer
``criterion.empty_weight``.

TAO's classifier differs from upstream Mask2Former in one way that changes meaning: the no-object logit is
the FIRST one, and TAO class ``j`` (1..K) is raw category id ``j`` (``dataset.contiguous_id`` false) or the
``j``-th entry of the label map (true). This package keeps the no-object logit last and class index ``i`` =
raw id ``i`` (false) or label-map position ``i`` (true), so the class head is re-laid out:

* contiguous_id true: rows ``[1..K, 0]`` (TAO class ``i + 1`` becomes class ``i``), K classes;
* contiguous_id false: K + 1 classes, class ``i`` = TAO class ``i`` for 1..K, and class 0 (raw id 0, which TAO
  cannot predict) a row whose logit is always :data:`NEVER_LOGIT`, so its probability is exactly 0 and every
  other probability equals TAO's.

TAO checkpoints do not record ``contiguous_id``; TAO's default (false) is assumed unless the caller says.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

log = logging.getLogger(__name__)

#: Logit of the class TAO cannot predict (contiguous_id false): exp() of it is 0 in float32 and float16.
NEVER_LOGIT = -1.0e4
TAO_MODEL_NAME = "mask2former"
TAO_PREFIX = "model."
CLASS_WEIGHT = "transformer_decoder.class_embed.weight"
CLASS_BIAS = "transformer_decoder.class_embed.bias"


def is_tao_payload(payload: Any) -> bool:
    """Whether a loaded checkpoint dict was written by TAO's trainer (its marker, or its parameter names)."""
    if not isinstance(payload, Mapping):
        return False
    if payload.get("tao_model") == TAO_MODEL_NAME:
        return True
    state = payload.get("state_dict")
    return (isinstance(state, Mapping) and "model_config" not in payload
            and any(isinstance(k, str) and k.startswith(TAO_PREFIX + "sem_seg_head.") for k in state))


def tao_class_head(weight: torch.Tensor, bias: torch.Tensor, *,
                   contiguous_id: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """TAO's class head (no-object first) in this package's layout (no-object last); see the module doc."""
    if weight.dim() != 2 or bias.dim() != 1 or weight.shape[0] != bias.shape[0] or weight.shape[0] < 2:
        raise ValueError(f"TAO class head has shapes {list(weight.shape)} / {list(bias.shape)}; expected "
                         "[K + 1, hidden] / [K + 1]")
    order_w = [weight[1:], weight[:1]]
    order_b = [bias[1:], bias[:1]]
    if not contiguous_id:
        order_w.insert(0, torch.zeros_like(weight[:1]))
        order_b.insert(0, torch.full_like(bias[:1], NEVER_LOGIT))
    return torch.cat(order_w), torch.cat(order_b)


def tao_rules(detectron2_rules: List[Tuple[str, Any]]) -> List[Tuple[str, Any]]:
    """TAO's renaming rules: the original repository's, under the Lightning module's ``model.``."""
    return [(r"^" + TAO_PREFIX.replace(".", r"\.") + pattern.lstrip("^"), replacement)
            for pattern, replacement in detectron2_rules]


def relayout_class_head(renamed: Dict[str, torch.Tensor], *, contiguous_id: bool) -> None:
    """Re-lay out the class head of a renamed TAO state dict in place (no-op when it has none)."""
    if CLASS_WEIGHT in renamed and CLASS_BIAS in renamed:
        renamed[CLASS_WEIGHT], renamed[CLASS_BIAS] = tao_class_head(renamed[CLASS_WEIGHT], renamed[CLASS_BIAS],
                                                                    contiguous_id=contiguous_id)


def swin_preset(swin: Mapping[str, Any]) -> Optional[str]:
    """The Swin preset (tiny, small, base, large) whose embed_dim, depths and num_heads ``swin`` has, or None."""
    from ..config.model import SWIN_PRESETS

    for name, preset in SWIN_PRESETS.items():
        if all(swin.get(key) == value for key, value in preset.items()):
            return name
    return None


def convert_tao_payload(payload: Mapping[str, Any], *, contiguous_id: bool = False,
                        source: str = "checkpoint") -> Dict[str, Any]:
    """A TAO Lightning checkpoint as this package's checkpoint payload (weights renamed, class head re-laid
    out, ``model_config`` read from the tensor shapes over the defaults). Raises ValueError naming ``source``
    when a weight of the network has no counterpart here."""
    from ..config.model import ModelConfig
    from .weights import _to_tensor_dict, model_overrides_from_state_dict, rename_state_dict

    state = _to_tensor_dict(payload["state_dict"], source)
    renamed, skipped, unmatched = rename_state_dict(state, "tao")
    if unmatched:
        raise ValueError(f"{source}: TAO checkpoint weights with no counterpart in this network: "
                         f"{', '.join(sorted(unmatched)[:5])}{' ...' if len(unmatched) > 5 else ''}")
    relayout_class_head(renamed, contiguous_id=contiguous_id)
    config = dataclasses.asdict(ModelConfig())
    for dotted, value in model_overrides_from_state_dict(renamed).items():
        node = config
        parts = dotted.split(".")[1:]
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    swin = config["backbone"]["swin"]
    preset = swin_preset(swin)
    if preset is not None:
        swin["type"] = preset
    config["backbone"]["pretrained_weights"] = None
    log.info("%s: TAO checkpoint (epoch %s), %d tensors mapped, %d loss/derived buffers left out; class head "
             "laid out for dataset.contiguous_id %s (%d classes)", source, payload.get("epoch"), len(renamed),
             len(skipped), str(contiguous_id).lower(), config["sem_seg_head"]["num_classes"])
    return {"state_dict": renamed, "model_config": config, "label_map": None,
            "contiguous_id": contiguous_id, "epoch": payload.get("epoch"), "global_step": payload.get("global_step"),
            "converted_from": "tao"}
