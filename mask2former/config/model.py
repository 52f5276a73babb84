"""The `model` section: Swin or EfficientViT backbone, pixel decoder, masked-attention decoder, loss weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .fields import section, spec_field

SWIN_PRESETS = {
    "tiny": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]},
    "small": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24]},
    "base": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]},
    "large": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48]},
}
FEATURE_NAMES = ["res2", "res3", "res4", "res5"]
EFFICIENTVIT_NAMES = ["b0", "b1", "b2", "b3", "l0", "l1", "l2", "l3"]


@dataclass
class SwinConfig:
    type: str = spec_field(
        "tiny",
        description="Swin preset, as TAO: a preset set in the spec fixes embed_dim, depths and num_heads (values "
                    "that contradict it are replaced, and the log says so); custom uses the explicit values. When "
                    "the spec sets no type, explicit values are used and null ones come from the tiny preset.",
        enum=["tiny", "small", "base", "large", "custom"],
        option_weights=[0.4, 0.3, 0.2, 0.1, 0.0],
        popular=True,
    )
    embed_dim: Optional[int] = spec_field(
        None, description="Channels of the first stage (null: from the preset).", minimum=8, nullable=True
    )
    depths: Optional[List[int]] = spec_field(
        None, description="Blocks per stage, four stages (null: from the preset).", min_items=4, max_items=4,
        nullable=True, minimum=1,
    )
    num_heads: Optional[List[int]] = spec_field(
        None, description="Attention heads per stage, four stages (null: from the preset).", min_items=4,
        max_items=4, nullable=True, minimum=1,
    )
    window_size: int = spec_field(7, description="Attention window (12 for the 384-px checkpoints).", minimum=1)
    patch_size: int = spec_field(4, description="Patch-embedding stride and kernel.", minimum=1)
    mlp_ratio: float = spec_field(4.0, description="MLP hidden size over embedding size.", exclusive_minimum=0)
    qkv_bias: bool = spec_field(True, description="Learn a bias in the qkv projection.")
    drop_path_rate: float = spec_field(0.3, description="Stochastic depth rate (linear over blocks).", minimum=0,
                                       maximum=1)
    ape: bool = spec_field(False, description="Add an absolute position embedding after patch embedding.")
    patch_norm: bool = spec_field(True, description="LayerNorm after patch embedding.")
    out_features: List[str] = spec_field(
        list(FEATURE_NAMES), description="Backbone outputs passed on (all four are needed by the decoder).",
        min_items=4, max_items=4, enum=FEATURE_NAMES,
    )
    pretrain_img_size: int = spec_field(224, description="Image size of the pretrained checkpoint (used with ape).",
                                        minimum=32)
    use_checkpoint: bool = spec_field(False, description="Activation checkpointing in the Swin blocks (saves memory, "
                                                         "costs about a third more compute).")
    qk_scale: Optional[float] = spec_field(None, description="Scale of the attention logits (null: "
                                                             "head_dim ** -0.5).", nullable=True,
                                           exclusive_minimum=0)
    drop_rate: float = spec_field(0.0, description="Dropout after the patch embedding, the attention projection "
                                                   "and the MLP layers (training only).", minimum=0, maximum=1)
    attn_drop_rate: float = spec_field(0.0, description="Dropout on the attention weights (training only).",
                                       minimum=0, maximum=1)
    out_indices: List[int] = spec_field([0, 1, 2, 3], description="Stages whose outputs are passed on (all four "
                                                                  "are needed by the decoder).", enum=[0, 1, 2, 3])


@dataclass
class EfficientViTConfig:
    name: str = spec_field("l0", description="EfficientViT variant (MIT Han Lab): b0-b3 or l0-l3.",
                           enum=EFFICIENTVIT_NAMES, popular=True)
    out_indices: List[int] = spec_field(
        [1, 2, 3], description="Accepted as in TAO's spec; the outputs passed on are chosen by out_features.",
        minimum=0, maximum=4,
    )
    pretrain_img_size: int = spec_field(384, description="Accepted as in TAO's spec; EfficientViT has no position "
                                                         "embedding, so any input size works.", minimum=32)
    use_checkpoint: bool = spec_field(False, description="Activation checkpointing in the EfficientViT blocks "
                                                         "(saves memory, costs about a third more compute).")
    out_features: List[str] = spec_field(
        list(FEATURE_NAMES), description="Backbone outputs passed on (all four are needed by the decoder).",
        min_items=4, max_items=4, enum=FEATURE_NAMES,
    )


@dataclass
class BackboneConfig:
    type: str = spec_field("swin", description="Backbone family.", enum=["swin", "efficientvit"])
    pretrained_weights: Optional[str] = spec_field(
        None, description="Official ImageNet checkpoint of the backbone: Swin .pth (weights under 'model'), or "
                          "EfficientViT .pt of the MIT release or timm's naming; path, file://, s3:// or https://.",
        nullable=True, popular=True,
    )
    pretrained_weights_sha256: Optional[str] = spec_field(
        None, description="Expected SHA-256 (64 hex digits) of pretrained_weights; a download or file that differs "
                          "is refused.", nullable=True,
    )
    swin: SwinConfig = section(SwinConfig, "Swin Transformer settings (type swin).")
    efficientvit: EfficientViTConfig = section(EfficientViTConfig, "EfficientViT settings (type efficientvit).")


@dataclass
class SemSegHeadConfig:
    num_classes: int = spec_field(200, description="Number of real classes K (the no-object class is added as "
                                                   "index K).", minimum=1, popular=True)
    common_stride: int = spec_field(4, description="Stride of the mask features.", enum=[4])
    transformer_enc_layers: int = spec_field(6, description="Deformable-attention encoder layers in the pixel "
                                                            "decoder.", minimum=0, maximum=12)
    convs_dim: int = spec_field(256, description="Channels of the pixel decoder (multiple of 32 for GroupNorm).",
                                minimum=32, math_cond="/ 32", multiple_of=32)
    mask_dim: int = spec_field(256, description="Channels of the mask features.", minimum=8)
    deformable_transformer_encoder_in_features: List[str] = spec_field(
        ["res3", "res4", "res5"], description="Backbone levels the deformable encoder attends over.",
        enum=FEATURE_NAMES[1:], min_items=3, max_items=3,
    )
    norm: str = spec_field("GN", description="Normalisation in the pixel decoder convolutions.", enum=["GN"])


@dataclass
class MaskFormerConfig:
    num_object_queries: int = spec_field(100, description="Object queries.", minimum=1, maximum=1000,
                                         automl_enabled=True, automl_min=20, automl_max=200, popular=True)
    hidden_dim: int = spec_field(256, description="Decoder width.", minimum=8, maximum=1024, math_cond="/ 8",
                                 automl_enabled=True, automl_min=64, automl_max=1024)
    nheads: int = spec_field(8, description="Attention heads in the decoder.", minimum=1)
    dim_feedforward: int = spec_field(2048, description="FFN width in the decoder.", minimum=8)
    dec_layers: int = spec_field(10, description="Decoder predictions: the query prediction plus dec_layers - 1 "
                                                 "masked-attention layers.", minimum=1, maximum=50,
                                 automl_enabled=True, automl_min=1, automl_max=50)
    pre_norm: bool = spec_field(False, description="Pre-norm decoder layers.")
    dropout: float = spec_field(0.0, description="Dropout in the decoder.", minimum=0, maximum=1)
    class_weight: float = spec_field(2.0, description="Weight of the classification loss and matching cost.",
                                     minimum=0)
    mask_weight: float = spec_field(5.0, description="Weight of the mask BCE loss and matching cost.", minimum=0)
    dice_weight: float = spec_field(5.0, description="Weight of the dice loss and matching cost.", minimum=0)
    no_object_weight: float = spec_field(0.1, description="Class weight of no-object in the cross-entropy.",
                                         minimum=0, maximum=1)
    deep_supervision: bool = spec_field(True, description="Apply the loss to every decoder layer's prediction.")
    train_num_points: int = spec_field(12544, description="Points sampled per mask for matching and the mask "
                                                          "losses (112*112).", minimum=1)
    oversample_ratio: float = spec_field(3.0, description="Candidate points per kept point in importance "
                                                          "sampling.", minimum=1)
    importance_sample_ratio: float = spec_field(0.75, description="Share of points taken at the most uncertain "
                                                                  "candidates; the rest are uniform.", minimum=0,
                                                maximum=1)


@dataclass
class ModelConfig:
    export: bool = spec_field(False, description="TAO's export-mode switch of the network.",
                              no_effect="export builds its own traced network.")
    mode: str = spec_field("panoptic", description="Segmentation task.", enum=["panoptic", "instance", "semantic"],
                           popular=True)
    object_mask_threshold: float = spec_field(0.4, description="Panoptic: minimum query score kept.", minimum=0,
                                              maximum=1)
    overlap_threshold: float = spec_field(0.5, description="Panoptic: minimum share of a mask left after overlap "
                                                           "resolution.", minimum=0, maximum=1)
    test_topk_per_image: int = spec_field(100, description="Instance: detections kept per image.", minimum=1)
    backbone: BackboneConfig = section(BackboneConfig, "Backbone.")
    sem_seg_head: SemSegHeadConfig = section(SemSegHeadConfig, "Pixel decoder.")
    mask_former: MaskFormerConfig = section(MaskFormerConfig, "Masked-attention transformer decoder and loss.")


SWIN_ARCHITECTURE_KEYS = ("embed_dim", "depths", "num_heads")


def resolve_swin(swin: SwinConfig, *, preset_wins: bool = False) -> List[str]:
    """Fill the architecture numbers a preset implies; returns one sentence per value the preset replaced.

    ``preset_wins`` (the spec named ``swin.type``, as in TAO): the preset fixes the three numbers. Otherwise
    (no type in the spec, or a checkpoint's recorded architecture) only the numbers left null are filled.
    ``custom`` takes the explicit numbers and needs all three; explicit numbers that differ from the preset
    turn the type into ``custom``.
    """
    if swin.type == "custom":
        missing = [f"model.backbone.swin.{k}" for k in SWIN_ARCHITECTURE_KEYS if getattr(swin, k) is None]
        if missing:
            raise ValueError(f"model.backbone.swin.type custom uses explicit values, but {', '.join(missing)} "
                             "is not set.")
        return []
    preset = SWIN_PRESETS[swin.type]
    replaced = []
    for key in SWIN_ARCHITECTURE_KEYS:
        value = getattr(swin, key)
        if value is not None and value != preset[key] and preset_wins:
            replaced.append(f"model.backbone.swin.{key} {value} is replaced by the {swin.type} preset's "
                            f"{preset[key]} (set model.backbone.swin.type to custom to keep explicit values)")
        if value is None or preset_wins:
            setattr(swin, key, list(preset[key]) if isinstance(preset[key], list) else preset[key])
    if any(getattr(swin, key) != preset[key] for key in SWIN_ARCHITECTURE_KEYS):
        # explicit numbers off the preset: recorded as custom, so the recorded spec (experiment.yaml, the
        # spec the training workers read) builds this same network when it is read again
        swin.type = "custom"
    return replaced


ARCHITECTURE_KEYS = ("backbone.type", "backbone.swin", "backbone.efficientvit", "sem_seg_head", "mask_former")
