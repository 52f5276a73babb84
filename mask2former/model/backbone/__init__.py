"""Backbones (Swin Transformer, EfficientViT)."""

from .efficientvit import EFFICIENTVIT_NAMES, EFFICIENTVIT_VARIANTS, EfficientViT
from .swin import FEATURE_NAMES, SWIN_PRESETS, SwinTransformer

__all__ = ["EFFICIENTVIT_NAMES", "EFFICIENTVIT_VARIANTS", "EfficientViT", "FEATURE_NAMES", "SWIN_PRESETS",
           "SwinTransformer"]
