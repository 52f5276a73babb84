"""Import Hugging Face, detectron2 (original Mask2Former) and official Swin weights.

``import_weights(model, source, format)`` reads a checkpoint, renames its keys to this package's
module names, loads what fits and returns an :class:`ImportReport` listing every key: loaded,
missing (in the model, not in the checkpoint), unexpected (in the checkpoint, unknown to the model)
and skipped with the reason (derived buffers, loss buffers, a class head of another size, ...).

Formats:
- ``hf``: a ``Mask2FormerForUniversalSegmentation.save_pretrained`` folder (``config.json`` plus
  ``model.safetensors``, sharded safetensors or ``pytorch_model.bin``).
- ``detectron2``: the original repository's ``.pkl`` (a pickled dict whose ``model`` holds numpy
  arrays; read with an unpickler that only admits numpy arrays) or ``.pth`` checkpoint.
- ``swin``: an official Swin classification checkpoint (weights under ``model``) -> backbone only.
- ``tao``: a checkpoint of NVIDIA TAO's Mask2Former trainer (Lightning ``.pth``); its class head is re-laid
  out (:mod:`mask2former.model.tao_weights`).
- ``efficientvit``: an EfficientViT classification checkpoint, the MIT release's ``.pt`` (weights under
  ``state_dict`` as ``backbone.*``/``head.*``) or timm's naming (``stem.*``, ``stages.N.blocks.M``) ->
  backbone only.

``cli_import_weights(args)`` implements ``python -m mask2former import-weights``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .efficientvit_weights import infer_efficientvit_name, to_official_names
from .tao_weights import relayout_class_head, swin_preset, tao_rules

FORMATS = ("hf", "detectron2", "swin", "tao", "efficientvit")
BACKBONE_FORMATS = ("swin", "efficientvit")  # classification checkpoints that fill the backbone only
CHECKPOINT_FORMAT_VERSION = 1
CLASS_HEAD_KEYS = ("transformer_decoder.class_embed.weight", "transformer_decoder.class_embed.bias")

REASON_DERIVED = "buffer derived from the window size; recomputed by the model"
REASON_LOSS = "loss buffer (no-object class weight); the criterion builds it from the spec"
REASON_PIXEL_STATS = "input normalisation buffer; this tool normalises with dataset.pixel_mean/pixel_std"
REASON_CLS_NORM = "final norm of the classification network; the segmentation backbone has per-output norms"
REASON_CLS_HEAD = "image-classification head; not part of the segmentation backbone"


@dataclasses.dataclass
class ImportReport:
    """Outcome of :func:`import_weights`; keys are the model's names except ``unexpected``/``skipped``
    entries that could not be renamed (those keep the checkpoint's names)."""

    source: str
    format: str
    loaded: List[str] = dataclasses.field(default_factory=list)
    missing: List[str] = dataclasses.field(default_factory=list)
    unexpected: List[str] = dataclasses.field(default_factory=list)
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def class_head_skipped(self) -> bool:
        return any(key in self.skipped for key in CLASS_HEAD_KEYS)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"Imported {self.format} weights from {self.source}: {len(self.loaded)} loaded, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.skipped)} skipped."]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {title}: " + ", ".join(keys))
        for key, reason in self.skipped.items():
            lines.append(f"  skipped {key}: {reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading checkpoints

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 .pkl files: admits numpy arrays/scalars and plain containers only."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module == "numpy" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a detectron2 .pkl checkpoint holds "
                                     "numpy arrays only")


def _to_tensor_dict(state: Mapping[str, Any], source: Path) -> Dict[str, torch.Tensor]:
    import numpy as np

    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
        else:
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, expected a tensor or array.")
    return out


def _unwrap(obj: Any, source: Path) -> Mapping[str, Any]:
    """The weights of a checkpoint dict: under 'model' or 'state_dict' when present, else the dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict of weights, got {type(obj).__name__}.")
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def read_checkpoint_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin (torch, weights only), .pkl (numpy, restricted) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".pkl":
        with path.open("rb") as handle:
            obj = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path}: not a weights-only torch checkpoint ({exc}).") from exc
    weights = _unwrap(obj, path)
    return _to_tensor_dict({k: v for k, v in weights.items() if not k.startswith("__")}, path)


def read_hf_folder(folder: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(config.json as a dict, weights) of a Hugging Face ``save_pretrained`` folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: config.json is missing.")
    config = json.loads(config_path.read_text())
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        weights = read_checkpoint_file(folder / "model.safetensors")
    elif index.is_file():
        weights = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            weights.update(read_checkpoint_file(folder / shard))
    elif (folder / "pytorch_model.bin").is_file():
        weights = read_checkpoint_file(folder / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or "
                                "pytorch_model.bin.")
    return config, weights


# --------------------------------------------------------------------------- key mapping

Rule = Tuple[str, Union[str, Callable[[re.Match], str]]]


def _minus_one(template: str) -> Callable[[re.Match], str]:
    """Replacement that writes group 1 minus one (1-based upstream module numbers -> 0-based lists)."""
    return lambda m: template.format(int(m.group(1)) - 1, *m.groups()[1:])


_HF_SWIN = r"^model\.pixel_level_module\.encoder\."
_HF_BLOCK = _HF_SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_HF_PIX = r"^model\.pixel_level_module\.decoder\."
_HF_TM = r"^model\.transformer_module\."

HF_RULES: List[Rule] = [
    (_HF_SWIN + r"embeddings\.patch_embeddings\.projection\.", "backbone.patch_embed.proj."),
    (_HF_SWIN + r"embeddings\.norm\.", "backbone.patch_embed.norm."),
    (_HF_BLOCK + r"layernorm_before\.", r"backbone.layers.\1.blocks.\2.norm1."),
    (_HF_BLOCK + r"layernorm_after\.", r"backbone.layers.\1.blocks.\2.norm2."),
    (_HF_BLOCK + r"attention\.self\.relative_position_bias_table$",
     r"backbone.layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (_HF_BLOCK + r"attention\.self\.(query|key|value)\.", r"backbone.layers.\1.blocks.\2.attn.qkv.\3."),
    (_HF_BLOCK + r"attention\.output\.dense\.", r"backbone.layers.\1.blocks.\2.attn.proj."),
    (_HF_BLOCK + r"intermediate\.dense\.", r"backbone.layers.\1.blocks.\2.mlp.fc1."),
    (_HF_BLOCK + r"output\.dense\.", r"backbone.layers.\1.blocks.\2.mlp.fc2."),
    (_HF_SWIN + r"encoder\.layers\.(\d+)\.downsample\.", r"backbone.layers.\1.downsample."),
    (_HF_SWIN + r"hidden_states_norms\.stage(\d+)\.", _minus_one("backbone.norm{0}.")),
    (_HF_PIX + r"input_projections\.", "pixel_decoder.input_proj."),
    (_HF_PIX + r"level_embed$", "pixel_decoder.level_embed"),
    (_HF_PIX + r"encoder\.layers\.(\d+)\.self_attn\.", r"pixel_decoder.encoder.layers.\1.self_attn."),
    (_HF_PIX + r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"pixel_decoder.encoder.layers.\1.norm1."),
    (_HF_PIX + r"encoder\.layers\.(\d+)\.fc1\.", r"pixel_decoder.encoder.layers.\1.linear1."),
    (_HF_PIX + r"encoder\.layers\.(\d+)\.fc2\.", r"pixel_decoder.encoder.layers.\1.linear2."),
    (_HF_PIX + r"encoder\.layers\.(\d+)\.final_layer_norm\.", r"pixel_decoder.encoder.layers.\1.norm2."),
    (_HF_PIX + r"mask_projection\.", "pixel_decoder.mask_features."),
    (_HF_PIX + r"adapter_(\d+)\.(\d)\.", _minus_one("pixel_decoder.fpn_lateral.{0}.{1}.")),
    (_HF_PIX + r"layer_(\d+)\.(\d)\.", _minus_one("pixel_decoder.fpn_output.{0}.{1}.")),
    (_HF_TM + r"queries_features\.", "transformer_decoder.query_feat."),
    (_HF_TM + r"queries_embedder\.", "transformer_decoder.query_embed."),
    (_HF_TM + r"level_embed\.", "transformer_decoder.level_embed."),
    (_HF_TM + r"input_projections\.", "transformer_decoder.input_proj."),
    (_HF_TM + r"decoder\.layers\.(\d+)\.cross_attn\.", r"transformer_decoder.layers.\1.cross_attn."),
    (_HF_TM + r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.", r"transformer_decoder.layers.\1.cross_norm."),
    (_HF_TM + r"decoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.",
     r"transformer_decoder.layers.\1.self_attn.in_proj.\2."),
    (_HF_TM + r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer_decoder.layers.\1.self_attn.out_proj."),
    (_HF_TM + r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer_decoder.layers.\1.self_norm."),
    (_HF_TM + r"decoder\.layers\.(\d+)\.fc1\.", r"transformer_decoder.layers.\1.linear1."),
    (_HF_TM + r"decoder\.layers\.(\d+)\.fc2\.", r"transformer_decoder.layers.\1.linear2."),
    (_HF_TM + r"decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer_decoder.layers.\1.ffn_norm."),
    (_HF_TM + r"decoder\.layernorm\.", "transformer_decoder.decoder_norm."),
    (_HF_TM + r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.", r"transformer_decoder.mask_embed.layers.\1."),
    (r"^class_predictor\.", "transformer_decoder.class_embed."),
]
HF_SKIP: List[Tuple[str, str]] = [
    (r"relative_position_index$", REASON_DERIVED),
    (r"^criterion\.empty_weight$", REASON_LOSS),
    (_HF_SWIN + r"swin\.layernorm\.", REASON_CLS_NORM),
]

_D2_PIX = r"^sem_seg_head\.pixel_decoder\."
_D2_PRED = r"^sem_seg_head\.predictor\."
DETECTRON2_RULES: List[Rule] = [
    (r"^backbone\.", "backbone."),
    (_D2_PIX + r"input_proj\.", "pixel_decoder.input_proj."),
    (_D2_PIX + r"transformer\.level_embed$", "pixel_decoder.level_embed"),
    (_D2_PIX + r"transformer\.encoder\.layers\.", "pixel_decoder.encoder.layers."),
    (_D2_PIX + r"mask_features\.", "pixel_decoder.mask_features."),
    (_D2_PIX + r"adapter_(\d+)\.norm\.", _minus_one("pixel_decoder.fpn_lateral.{0}.1.")),
    (_D2_PIX + r"adapter_(\d+)\.(weight|bias)$", _minus_one("pixel_decoder.fpn_lateral.{0}.0.{1}")),
    (_D2_PIX + r"layer_(\d+)\.norm\.", _minus_one("pixel_decoder.fpn_output.{0}.1.")),
    (_D2_PIX + r"layer_(\d+)\.(weight|bias)$", _minus_one("pixel_decoder.fpn_output.{0}.0.{1}")),
    (_D2_PRED + r"(?:query_feat|static_query)\.", "transformer_decoder.query_feat."),
    (_D2_PRED + r"(query_embed|level_embed|input_proj|decoder_norm|class_embed|mask_embed)\.",
     r"transformer_decoder.\1."),
    (_D2_PRED + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.",
     r"transformer_decoder.layers.\1.cross_attn."),
    (_D2_PRED + r"transformer_cross_attention_layers\.(\d+)\.norm\.", r"transformer_decoder.layers.\1.cross_norm."),
    (_D2_PRED + r"transformer_self_attention_layers\.(\d+)\.self_attn\.", r"transformer_decoder.layers.\1.self_attn."),
    (_D2_PRED + r"transformer_self_attention_layers\.(\d+)\.norm\.", r"transformer_decoder.layers.\1.self_norm."),
    (_D2_PRED + r"transformer_ffn_layers\.(\d+)\.(linear1|linear2)\.", r"transformer_decoder.layers.\1.\2."),
    (_D2_PRED + r"transformer_ffn_layers\.(\d+)\.norm\.", r"transformer_decoder.layers.\1.ffn_norm."),
]
DETECTRON2_SKIP: List[Tuple[str, str]] = [
    (r"relative_position_index$", REASON_DERIVED),
    (r"\.attn_mask$", REASON_DERIVED),
    (r"^criterion\.empty_weight$", REASON_LOSS),
    (r"^pixel_(mean|std)$", REASON_PIXEL_STATS),
]

SWIN_RULES: List[Rule] = [(r"^", "backbone.")]
SWIN_SKIP: List[Tuple[str, str]] = [
    (r"relative_position_index$", REASON_DERIVED),
    (r"\.attn_mask$", REASON_DERIVED),
    (r"^head\.", REASON_CLS_HEAD),
    (r"^norm\.(weight|bias)$", REASON_CLS_NORM),
]

TAO_RULES: List[Rule] = tao_rules(DETECTRON2_RULES)
TAO_SKIP: List[Tuple[str, str]] = [
    (r"relative_position_index$", REASON_DERIVED),
    (r"\.attn_mask$", REASON_DERIVED),
    (r"^criterion\.", REASON_LOSS),
]

# Official names after efficientvit_weights.to_official_names (timm's are rewritten there first).
EFFICIENTVIT_RULES: List[Rule] = [(r"^backbone\.", "backbone."), (r"^(input_stem|stages)\.", r"backbone.\1.")]
EFFICIENTVIT_SKIP: List[Tuple[str, str]] = [(r"^head\.", REASON_CLS_HEAD)]

_RULES = {"hf": (HF_RULES, HF_SKIP), "detectron2": (DETECTRON2_RULES, DETECTRON2_SKIP), "swin": (SWIN_RULES, SWIN_SKIP),
          "tao": (TAO_RULES, TAO_SKIP), "efficientvit": (EFFICIENTVIT_RULES, EFFICIENTVIT_SKIP)}

# Split projections fused into one parameter: (pattern of the renamed key, fused name, part order).
_FUSED = [
    (re.compile(r"^(.*\.attn\.qkv)\.(query|key|value)\.(weight|bias)$"), "{0}.{2}", ("query", "key", "value")),
    (re.compile(r"^(.*\.self_attn\.in_proj)\.(q|k|v)\.(weight|bias)$"), "{0}_{2}", ("q", "k", "v")),
]


def rename_state_dict(state: Mapping[str, torch.Tensor], format: str) -> Tuple[Dict[str, torch.Tensor],
                                                                                 Dict[str, str], List[str]]:
    """(tensors under this package's names, {checkpoint key: skip reason}, unmatched checkpoint keys)."""
    if format not in _RULES:
        raise ValueError(f"unknown weight format {format!r}; expected one of {list(FORMATS)}.")
    rules, skips = _RULES[format]
    if format == "efficientvit":
        state = to_official_names(state)
    renamed: Dict[str, torch.Tensor] = {}
    skipped: Dict[str, str] = {}
    unmatched: List[str] = []
    pending: Dict[str, Dict[str, Tuple[str, torch.Tensor]]] = {}  # fused name -> {part: (key, tensor)}
    part_order: Dict[str, Tuple[str, ...]] = {}
    for key, tensor in state.items():
        reason = next((r for pattern, r in skips if re.search(pattern, key)), None)
        if reason is not None:
            skipped[key] = reason
            continue
        rule = next(((p, r) for p, r in rules if re.search(p, key)), None)
        if rule is None:
            unmatched.append(key)
            continue
        new_key = re.sub(rule[0], rule[1], key, count=1)
        for fused_pattern, fused_name, order in _FUSED:
            match = fused_pattern.match(new_key)
            if match:
                name = fused_name.format(*match.groups())
                pending.setdefault(name, {})[match.group(2)] = (key, tensor)
                part_order[name] = order
                break
        else:
            renamed[new_key] = tensor
    for name, pieces in pending.items():
        order = part_order[name]
        if all(part in pieces for part in order):
            renamed[name] = torch.cat([pieces[part][1] for part in order], dim=0)
        else:
            for key, _ in pieces.values():
                skipped[key] = f"{name} needs all of {list(order)}; the checkpoint has only {sorted(pieces)}"
    return renamed, skipped, unmatched


# --------------------------------------------------------------------------- loading

def resize_relative_position_bias_table(table: torch.Tensor, window_size: int) -> torch.Tensor:
    """Bicubic resize of a [(2w-1)^2, heads] bias table to another window size."""
    side = int(round(math.sqrt(table.shape[0])))
    new_side = 2 * window_size - 1
    grid = table.float().t().reshape(1, table.shape[1], side, side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(table.shape[1], new_side * new_side).t().to(table.dtype)


def _fit(key: str, tensor: torch.Tensor, target: torch.Tensor) -> Tuple[Optional[torch.Tensor], str]:
    """The checkpoint tensor adapted to the model's shape, or (None, reason) to skip it."""
    if tensor.shape == target.shape:
        return tensor, ""
    if key.endswith("relative_position_bias_table") and tensor.shape[1] == target.shape[1]:
        window = (int(round(math.sqrt(target.shape[0]))) + 1) // 2
        return resize_relative_position_bias_table(tensor, window), ""
    if key.endswith("absolute_pos_embed") and tensor.shape[-1] == target.shape[1] and tensor.dim() == 3:
        side = int(round(math.sqrt(tensor.shape[1])))  # official layout [1, L, C] -> [1, C, h, w]
        grid = tensor.transpose(1, 2).reshape(1, tensor.shape[2], side, side)
        return F.interpolate(grid, size=tuple(target.shape[-2:]), mode="bicubic", align_corners=False), ""
    if key in CLASS_HEAD_KEYS:
        return None, (f"class head has {tensor.shape[0]} logits in the checkpoint and {target.shape[0]} in the model "
                      f"(num_classes {tensor.shape[0] - 1} vs {target.shape[0] - 1}); kept the model's initialisation "
                      "for fine-tuning")
    return None, f"shape {list(tensor.shape)} in the checkpoint, {list(target.shape)} in the model"


def load_renamed(model: nn.Module, renamed: Mapping[str, torch.Tensor], report: ImportReport,
                 expected_prefix: str = "") -> ImportReport:
    """Load tensors already under the model's names; fill ``report`` (missing = keys under
    ``expected_prefix`` the checkpoint did not provide)."""
    own = model.state_dict()
    to_load: Dict[str, torch.Tensor] = {}
    for key, tensor in renamed.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        fitted, reason = _fit(key, tensor, own[key])
        if fitted is None:
            report.skipped[key] = reason
            continue
        to_load[key] = fitted.to(dtype=own[key].dtype)
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k.startswith(expected_prefix) and k not in to_load
                            and k not in report.skipped)
    return report


def import_weights(model: nn.Module, source: Union[str, Path], format: str, *,
                   contiguous_id: bool = False) -> ImportReport:
    """Load ``source`` of ``format`` ('hf', 'detectron2', 'swin', 'tao' or 'efficientvit') into ``model`` (a
    Mask2Former, or a bare backbone for 'swin'/'efficientvit'); the model is changed in place. Never raises on
    key mismatches: read the report. ``contiguous_id`` (tao only) is the ``dataset.contiguous_id`` the TAO model
    was trained with."""
    if format not in FORMATS:
        raise ValueError(f"unknown weight format {format!r}; expected one of {list(FORMATS)}.")
    if format == "hf":
        _, state = read_hf_folder(source)
    else:
        state = read_checkpoint_file(source)
    renamed, skipped, unmatched = rename_state_dict(state, format)
    if format == "tao":
        relayout_class_head(renamed, contiguous_id=contiguous_id)
    report = ImportReport(source=str(source), format=format, unexpected=list(unmatched), skipped=dict(skipped))
    if format in BACKBONE_FORMATS:
        if hasattr(model, "backbone"):
            return load_renamed(model, renamed, report, expected_prefix="backbone.")
        bare = {key[len("backbone."):]: value for key, value in renamed.items()}
        return load_renamed(model, bare, report)
    return load_renamed(model, renamed, report)


# --------------------------------------------------------------------------- architecture of a source

def model_overrides_from_hf_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Dotted spec keys (``model.*``) describing the architecture of a Hugging Face config.json."""
    backbone = config.get("backbone_config") or {}
    if backbone.get("model_type", "swin") != "swin":
        raise ValueError(f"config.json: backbone model_type {backbone.get('model_type')!r} is not supported "
                         "(only swin).")
    unsupported = {"encoder_feedforward_dim": 1024, "enforce_input_projection": False, "common_stride": 4,
                   "activation_function": "relu"}
    for key, value in unsupported.items():
        if config.get(key, value) != value:
            raise ValueError(f"config.json: {key} = {config[key]!r} cannot be built by this tool "
                             f"(supported: {value!r}).")
    num_labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels")
    image_size = backbone.get("image_size", 224)
    return {
        "model.backbone.swin.embed_dim": backbone.get("embed_dim", 96),
        "model.backbone.swin.depths": list(backbone.get("depths", [2, 2, 6, 2])),
        "model.backbone.swin.num_heads": list(backbone.get("num_heads", [3, 6, 12, 24])),
        "model.backbone.swin.window_size": backbone.get("window_size", 7),
        "model.backbone.swin.patch_size": backbone.get("patch_size", 4),
        "model.backbone.swin.mlp_ratio": float(backbone.get("mlp_ratio", 4.0)),
        "model.backbone.swin.qkv_bias": backbone.get("qkv_bias", True),
        "model.backbone.swin.ape": backbone.get("use_absolute_embeddings", False),
        "model.backbone.swin.pretrain_img_size": image_size[0] if isinstance(image_size, list) else image_size,
        "model.sem_seg_head.num_classes": int(num_labels),
        "model.sem_seg_head.convs_dim": config.get("feature_size", 256),
        "model.sem_seg_head.mask_dim": config.get("mask_feature_size", 256),
        "model.sem_seg_head.transformer_enc_layers": config.get("encoder_layers", 6),
        "model.mask_former.num_object_queries": config.get("num_queries", 100),
        "model.mask_former.hidden_dim": config.get("hidden_dim", 256),
        "model.mask_former.nheads": config.get("num_attention_heads", 8),
        "model.mask_former.dim_feedforward": config.get("dim_feedforward", 2048),
        "model.mask_former.dec_layers": config.get("decoder_layers", 10),
        "model.mask_former.pre_norm": config.get("pre_norm", False),
        "model.mask_former.dropout": float(config.get("dropout", 0.0)),
    }


def _count(renamed: Mapping[str, torch.Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for k in renamed for m in [re.match(pattern, k)] if m}
    return max(indices) + 1 if indices else 0


def model_overrides_from_state_dict(renamed: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Dotted spec keys inferred from tensor shapes of a renamed checkpoint (backbone, and the heads
    when present). ``pre_norm`` cannot be seen in shapes and keeps the spec default."""
    if "backbone.patch_embed.proj.weight" not in renamed and any(k.startswith("backbone.stages.") for k in renamed):
        out: Dict[str, Any] = {"model.backbone.type": "efficientvit",
                               "model.backbone.efficientvit.name": infer_efficientvit_name(renamed)}
        return _head_overrides(renamed, out)
    try:
        proj = renamed["backbone.patch_embed.proj.weight"]
    except KeyError:
        raise ValueError("the checkpoint has no Swin patch embedding (patch_embed.proj.weight) nor EfficientViT "
                         "stages; is it a Swin or EfficientViT checkpoint?") from None
    depths = [_count(renamed, rf"^backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(4)]
    tables = [renamed[f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(4)]
    fc1 = renamed["backbone.layers.0.blocks.0.mlp.fc1.weight"]
    out = {
        "model.backbone.swin.embed_dim": int(proj.shape[0]),
        "model.backbone.swin.patch_size": int(proj.shape[-1]),
        "model.backbone.swin.depths": depths,
        "model.backbone.swin.num_heads": [int(t.shape[1]) for t in tables],
        "model.backbone.swin.window_size": (int(round(math.sqrt(tables[0].shape[0]))) + 1) // 2,
        "model.backbone.swin.mlp_ratio": float(fc1.shape[0] / fc1.shape[1]),
        "model.backbone.swin.qkv_bias": "backbone.layers.0.blocks.0.attn.qkv.bias" in renamed,
        "model.backbone.swin.patch_norm": "backbone.patch_embed.norm.weight" in renamed,
        "model.backbone.swin.ape": "backbone.absolute_pos_embed" in renamed,
    }
    return _head_overrides(renamed, out)


def _head_overrides(renamed: Mapping[str, torch.Tensor], out: Dict[str, Any]) -> Dict[str, Any]:
    """``out`` plus the pixel decoder and decoder keys when the checkpoint holds them."""
    if "transformer_decoder.class_embed.weight" not in renamed:
        return out
    query_feat = renamed["transformer_decoder.query_feat.weight"]
    offsets = renamed["pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.weight"]
    levels = _count(renamed, r"^pixel_decoder\.input_proj\.(\d+)\.")
    out.update({
        "model.sem_seg_head.num_classes": int(renamed["transformer_decoder.class_embed.weight"].shape[0]) - 1,
        "model.sem_seg_head.convs_dim": int(renamed["pixel_decoder.input_proj.0.0.weight"].shape[0]),
        "model.sem_seg_head.mask_dim": int(renamed["pixel_decoder.mask_features.weight"].shape[0]),
        "model.sem_seg_head.transformer_enc_layers": _count(renamed, r"^pixel_decoder\.encoder\.layers\.(\d+)\."),
        "model.mask_former.num_object_queries": int(query_feat.shape[0]),
        "model.mask_former.hidden_dim": int(query_feat.shape[1]),
        "model.mask_former.nheads": int(offsets.shape[0]) // (levels * 4 * 2),
        "model.mask_former.dim_feedforward": int(renamed["transformer_decoder.layers.0.linear1.weight"].shape[0])
        if "transformer_decoder.layers.0.linear1.weight" in renamed else 2048,
        "model.mask_former.dec_layers": _count(renamed, r"^transformer_decoder\.layers\.(\d+)\.") + 1,
    })
    return out


# --------------------------------------------------------------------------- CLI

def _nest(dotted: Mapping[str, Any]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for key, value in dotted.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def spec_contiguous_id(spec_path: Optional[str]) -> bool:
    """``dataset.contiguous_id`` of a spec file (false when there is no spec or it does not say)."""
    from ..config.loader import read_spec_file

    if not spec_path:
        return False
    dataset = read_spec_file(spec_path).get("dataset") or {}
    return bool(dataset.get("contiguous_id", False)) if isinstance(dataset, dict) else False


def resolve_import_model_config(*, format: str, source: Union[str, Path], spec_path: Optional[str],
                                overrides: Any) -> Any:
    """The typed ``model`` section for an import: from the spec when given, else from the source's
    architecture (config.json or tensor shapes) over the spec defaults; ``overrides`` last. For TAO the
    number of classes always comes from the checkpoint, whose class head is re-laid out."""
    from ..config import load_spec
    from ..config.loader import read_spec_file

    if spec_path:
        model_section = read_spec_file(spec_path).get("model", {})
    elif format == "hf":
        hf_config, _ = read_hf_folder(source)
        model_section = _nest(model_overrides_from_hf_config(hf_config))["model"]
    else:
        renamed, _, _ = rename_state_dict(read_checkpoint_file(source), format)
        model_section = _nest(model_overrides_from_state_dict(renamed))["model"]
    if format == "tao":
        renamed, _, _ = rename_state_dict(read_checkpoint_file(source), format)
        relayout_class_head(renamed, contiguous_id=spec_contiguous_id(spec_path))
        inferred = model_overrides_from_state_dict(renamed)
        model_section = dict(model_section or {})
        head = dict(model_section.get("sem_seg_head") or {})
        head["num_classes"] = inferred["model.sem_seg_head.num_classes"]
        model_section["sem_seg_head"] = head
        preset = swin_preset({key.rsplit(".", 1)[1]: value for key, value in inferred.items()
                              if key.startswith("model.backbone.swin.")})
        if not spec_path and preset is not None:  # TAO builds its Swin from a preset: name it
            model_section.setdefault("backbone", {}).setdefault("swin", {})["type"] = preset
    # The export action reads the model section only; its checkpoint key is a placeholder here.
    spec = {"model": model_section, "export": {"checkpoint": str(source)}}
    return load_spec("export", spec=spec, overrides=overrides or None).model


def save_checkpoint(model: nn.Module, model_config: Any, output: Union[str, Path]) -> Path:
    """Write this tool's checkpoint: {"state_dict", "model_config" (the model section as a dict),
    "format_version"}."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    config_dict = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else dict(model_config)
    torch.save({"state_dict": model.state_dict(), "model_config": config_dict,
                "format_version": CHECKPOINT_FORMAT_VERSION}, output)
    return output


def cli_import_weights(args: Any) -> int:
    """``import-weights --format {hf,detectron2,swin,tao,efficientvit} SOURCE OUTPUT.pth [-e SPEC] [key=value ...]``.

    Prints the import report; exit status 0 when written, 1 when nothing could be loaded, 2 when the
    source cannot be read or describes an architecture this tool cannot build.
    """
    from .builder import build_model

    try:
        model_config = resolve_import_model_config(format=args.format, source=args.source, spec_path=args.spec,
                                                   overrides=list(args.overrides or []))
        model = build_model(model_config)
        report = import_weights(model, args.source, args.format,
                                contiguous_id=args.format == "tao" and spec_contiguous_id(args.spec))
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        print(f"error: {args.format} weights {args.source}: {exc}")
        return 2
    print(report.summary())
    if not report.loaded:
        print(f"error: no tensor of {args.source} fits the model; nothing written.")
        return 1
    path = save_checkpoint(model, model_config, args.output)
    print(f"wrote {path}")
    return 0
