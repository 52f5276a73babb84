"""The Mask2Former network: backbone -> pixel decoder -> masked-attention transformer decoder.

Pre-processing (normalisation, padding) and post-processing (semantic / panoptic / instance
inference) stay outside: ``forward`` maps a normalised image batch to raw predictions, which keeps
the module exportable as is.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .pixel_decoder.msdeform_pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder.masked_decoder import MaskedTransformerDecoder


class Mask2Former(nn.Module):
    """``forward(images [B, 3, H, W])`` -> ``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, ceil(H/4),
    ceil(W/4)]}``, plus ``"aux_outputs"`` (one such dict per earlier prediction) in training mode.

    Class index K (the last) is no-object. Mask logits are at stride 4 of the input.
    """

    size_divisibility = 32  # the input size at which every stage's map is exactly H/stride x W/stride

    def __init__(self, *, backbone: nn.Module, pixel_decoder: MSDeformAttnPixelDecoder,
                 transformer_decoder: MaskedTransformerDecoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder

    @property
    def num_classes(self) -> int:
        return self.transformer_decoder.num_classes

    @property
    def num_queries(self) -> int:
        return self.transformer_decoder.num_queries

    def forward(self, images: torch.Tensor) -> Dict[str, object]:
        features = self.backbone(images)
        mask_features, multi_scale_features = self.pixel_decoder(features)
        return self.transformer_decoder(multi_scale_features, mask_features)
