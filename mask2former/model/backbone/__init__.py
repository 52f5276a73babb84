"""Backbones (Swin Transformer)."""

from .swin import FEATURE_NAMES, SWIN_PRESETS, SwinTransformer

__all__ = ["FEATURE_NAMES", "SWIN_PRESETS", "SwinTransformer"]
