"""Small builders shared by the tests/test_model_*.py files (tiny networks that run in milliseconds)."""

from __future__ import annotations

from typing import Any, Dict

import torch

from mask2former.model import build_backbone, build_mask2former
from mask2former.model.meta_arch import Mask2Former

TINY_SWIN: Dict[str, Any] = {"type": None, "embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
                             "window_size": 7, "drop_path_rate": 0.0}
TINY_HEAD: Dict[str, Any] = {"num_classes": 5, "convs_dim": 64, "mask_dim": 64, "transformer_enc_layers": 2,
                             "num_queries": 8, "hidden_dim": 64, "nheads": 8, "dim_feedforward": 96,
                             "dec_layers": 4}


def tiny_model(seed: int = 0, swin: Dict[str, Any] | None = None, **head: Any) -> Mask2Former:
    """A tiny Mask2Former (Swin embed 32, depths 1, hidden 64); keyword arguments override TINY_HEAD."""
    torch.manual_seed(seed)
    backbone = build_backbone(**{**TINY_SWIN, **(swin or {})})
    return build_mask2former(backbone=backbone, **{**TINY_HEAD, **head})


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add Gaussian noise to every parameter so zero-initialised tensors (offsets, bias tables) matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
