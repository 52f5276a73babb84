"""Names of EfficientViT checkpoints: the MIT release's (this package's) and timm's, and the variant a
checkpoint holds.

The MIT release's classification ``.pt`` files keep their weights under ``state_dict`` as
``backbone.<module>`` (``input_stem.op_list.N`` and ``stages.0-3`` for b0-b3; ``stages.0-4`` for l0-l3)
plus ``head.*``. timm's ``efficientvit_*`` weights name the same tensors ``stem.in_conv``,
``stem.res{k}`` and ``stages.{i}.blocks.{j}`` (its stages start after the stem in both families) plus
``head.*``; :func:`to_official_names` rewrites them, telling the families apart by the stem block
(L: ``conv1``/``conv2``, B: ``depth_conv``/``point_conv``).
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping

import torch

from .backbone.efficientvit import EFFICIENTVIT_VARIANTS

_TIMM_STEM_CONV = re.compile(r"^stem\.in_conv\.(.*)$")
_TIMM_STEM_BLOCK = re.compile(r"^stem\.res(\d+)\.(.*)$")
_TIMM_STAGE_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$")
_TIMM_LARGE_STEM = re.compile(r"^stem\.res\d+\.main\.conv1\.")


def is_timm_naming(state: Mapping[str, torch.Tensor]) -> bool:
    return any(_TIMM_STEM_CONV.match(key) for key in state)


def _timm_key(key: str, large: bool) -> str:
    stem = "backbone.stages.0" if large else "backbone.input_stem"
    match = _TIMM_STEM_CONV.match(key)
    if match:
        return f"{stem}.op_list.0.{match.group(1)}"
    match = _TIMM_STEM_BLOCK.match(key)
    if match:
        return f"{stem}.op_list.{int(match.group(1)) + 1}.{match.group(2)}"
    match = _TIMM_STAGE_BLOCK.match(key)
    if match:
        return f"backbone.stages.{int(match.group(1)) + int(large)}.op_list.{match.group(2)}.{match.group(3)}"
    return key  # head.* and anything unknown keep their name (skipped or reported unexpected)


def to_official_names(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with a DataParallel ``module.`` prefix dropped and timm's names (when it has them) rewritten
    to the MIT release's ``backbone.*`` names; official names pass unchanged."""
    state = {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}
    if not is_timm_naming(state):
        return state
    large = any(_TIMM_LARGE_STEM.match(key) for key in state)
    return {_timm_key(key, large): value for key, value in state.items()}


def _blocks(renamed: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.op_list\.(\d+)\.")
    indices = {int(m.group(1)) for key in renamed for m in [pattern.match(key)] if m}
    return max(indices) + 1 if indices else 0


def infer_efficientvit_name(renamed: Mapping[str, torch.Tensor]) -> str:
    """The variant (b0-b3, l0-l3) whose stage widths and depths match a checkpoint under this package's names
    (``backbone.*``); ValueError when none does."""
    if "backbone.input_stem.op_list.0.conv.weight" in renamed:
        family, stem = "b", "backbone.input_stem"
        stages: List[str] = [f"backbone.stages.{i}" for i in range(4)]
    elif "backbone.stages.0.op_list.0.conv.weight" in renamed:
        family, stem = "l", "backbone.stages.0"
        stages = [f"backbone.stages.{i}" for i in range(1, 5)]
    else:
        raise ValueError("the checkpoint has no EfficientViT stem (input_stem.op_list.0.conv.weight or "
                         "stages.0.op_list.0.conv.weight); is it an EfficientViT checkpoint?")
    width = int(renamed[f"{stem}.op_list.0.conv.weight"].shape[0])
    counts = [_blocks(renamed, stem)] + [_blocks(renamed, prefix) for prefix in stages]
    for name, variant in EFFICIENTVIT_VARIANTS.items():
        if variant.family != family or variant.widths[0] != width:
            continue
        if family == "b":
            expected = [variant.depths[0] + 1, variant.depths[1], variant.depths[2], variant.depths[3] + 1,
                        variant.depths[4] + 1]
        else:
            expected = [depth + 1 for depth in variant.depths]
        if counts == expected:
            return name
    raise ValueError(f"no EfficientViT variant has a {family.upper()}-family stem of width {width} and "
                     f"{counts} blocks per stage.")
