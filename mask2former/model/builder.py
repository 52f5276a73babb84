"""Build the network from the spec's ``model`` section, or part by part from keyword arguments.

``build_model(model_config)`` reads only the architecture keys (``backbone.type`` with ``backbone.swin`` or
``backbone.efficientvit``, ``sem_seg_head``, ``mask_former``) through attribute access, so the typed config
and any object tree of the same shape (e.g. ``types.SimpleNamespace``) work. Loss weights and post-processing keys are not read here.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from .backbone.efficientvit import EfficientViT
from .backbone.swin import FEATURE_NAMES, SwinTransformer, resolve_swin_architecture
from .meta_arch import Mask2Former
from .pixel_decoder.msdeform_pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder.masked_decoder import MaskedTransformerDecoder

ENCODER_FFN_DIM = 1024  # upstream fixes the deformable encoder's FFN width
ENCODER_NUM_POINTS = 4


def build_backbone(*, type: Optional[str] = "tiny", embed_dim: Optional[int] = None,
                   depths: Optional[Sequence[int]] = None, num_heads: Optional[Sequence[int]] = None,
                   window_size: int = 7, patch_size: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                   drop_path_rate: float = 0.3, ape: bool = False, patch_norm: bool = True,
                   out_features: Sequence[str] = FEATURE_NAMES, pretrain_img_size: int = 224,
                   use_checkpoint: bool = False, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                   attn_drop_rate: float = 0.0) -> SwinTransformer:
    """A Swin backbone; ``embed_dim``/``depths``/``num_heads`` left None come from the preset ``type``."""
    arch = resolve_swin_architecture(type=type, embed_dim=embed_dim,
                                     depths=list(depths) if depths is not None else None,
                                     num_heads=list(num_heads) if num_heads is not None else None)
    return SwinTransformer(embed_dim=arch["embed_dim"], depths=arch["depths"], num_heads=arch["num_heads"],
                           window_size=window_size, patch_size=patch_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           drop_path_rate=drop_path_rate, ape=ape, patch_norm=patch_norm,
                           pretrain_img_size=pretrain_img_size, out_features=out_features,
                           use_checkpoint=use_checkpoint, qk_scale=qk_scale, drop_rate=drop_rate,
                           attn_drop_rate=attn_drop_rate)


def build_efficientvit_backbone(*, name: str = "l0", out_features: Sequence[str] = FEATURE_NAMES,
                                use_checkpoint: bool = False) -> EfficientViT:
    """An EfficientViT backbone, variant ``name`` (b0-b3, l0-l3)."""
    return EfficientViT(name=name, out_features=out_features, use_checkpoint=use_checkpoint)


def build_mask2former(*, backbone: Union[SwinTransformer, EfficientViT], num_classes: int, convs_dim: int = 256,
                      mask_dim: int = 256, transformer_enc_layers: int = 6,
                      transformer_in_features: Sequence[str] = ("res3", "res4", "res5"), common_stride: int = 4,
                      norm: str = "GN", num_queries: int = 100, hidden_dim: int = 256, nheads: int = 8,
                      dim_feedforward: int = 2048, dec_layers: int = 10, pre_norm: bool = False,
                      dropout: float = 0.0) -> Mask2Former:
    """Pixel decoder + transformer decoder on ``backbone``. ``nheads`` and ``dropout`` apply to both the
    deformable encoder and the decoder, as upstream and in the Hugging Face port."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
    pixel_decoder = MSDeformAttnPixelDecoder(
        in_channels=backbone.out_channels, in_strides=backbone.out_strides,
        transformer_in_features=transformer_in_features, conv_dim=convs_dim, mask_dim=mask_dim, num_heads=nheads,
        num_points=ENCODER_NUM_POINTS, ffn_dim=ENCODER_FFN_DIM, num_encoder_layers=transformer_enc_layers,
        dropout=dropout, common_stride=common_stride, norm=norm,
    )
    transformer_decoder = MaskedTransformerDecoder(
        in_channels=convs_dim, num_classes=num_classes, hidden_dim=hidden_dim, num_queries=num_queries,
        nheads=nheads, dim_feedforward=dim_feedforward, dec_layers=dec_layers, pre_norm=pre_norm,
        mask_dim=mask_dim, dropout=dropout,
    )
    return Mask2Former(backbone=backbone, pixel_decoder=pixel_decoder, transformer_decoder=transformer_decoder)


def build_model(model_config: Any) -> Mask2Former:
    """The network described by a spec's ``model`` section (attribute access)."""
    backbone_type = model_config.backbone.type
    if backbone_type == "swin":
        swin = model_config.backbone.swin
        backbone = build_backbone(
            type=swin.type, embed_dim=swin.embed_dim, depths=swin.depths, num_heads=swin.num_heads,
            window_size=swin.window_size, patch_size=swin.patch_size, mlp_ratio=swin.mlp_ratio,
            qkv_bias=swin.qkv_bias, drop_path_rate=swin.drop_path_rate, ape=swin.ape, patch_norm=swin.patch_norm,
            out_features=swin.out_features, pretrain_img_size=swin.pretrain_img_size,
            use_checkpoint=swin.use_checkpoint,
            # TAO's keys; absent from the model config of checkpoints written before they existed
            qk_scale=getattr(swin, "qk_scale", None), drop_rate=getattr(swin, "drop_rate", 0.0),
            attn_drop_rate=getattr(swin, "attn_drop_rate", 0.0),
        )
    elif backbone_type == "efficientvit":
        evit = model_config.backbone.efficientvit
        backbone = build_efficientvit_backbone(name=evit.name, out_features=evit.out_features,
                                               use_checkpoint=evit.use_checkpoint)
    else:
        raise ValueError(f"model.backbone.type {backbone_type!r} is not supported (expected 'swin' or "
                         "'efficientvit').")
    head = model_config.sem_seg_head
    mf = model_config.mask_former
    return build_mask2former(
        backbone=backbone, num_classes=head.num_classes, convs_dim=head.convs_dim, mask_dim=head.mask_dim,
        transformer_enc_layers=head.transformer_enc_layers,
        transformer_in_features=head.deformable_transformer_encoder_in_features,
        common_stride=head.common_stride, norm=head.norm, num_queries=mf.num_object_queries,
        hidden_dim=mf.hidden_dim, nheads=mf.nheads, dim_feedforward=mf.dim_feedforward, dec_layers=mf.dec_layers,
        pre_norm=mf.pre_norm, dropout=mf.dropout,
    )
