"""Pixel decoder: deformable-attention encoder on res3..res5 plus an FPN branch down to stride 4.

Outputs the mask features (stride ``common_stride``) and the three lowest-resolution maps the
transformer decoder attends to (1/32, 1/16, 1/8). It always runs in float32, also under autocast,
as deformable attention is unstable in half precision.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..transformer_decoder.position_encoding import sine_position_embedding
from .msdeform_encoder import MSDeformEncoder

NUM_DECODER_LEVELS = 3  # the transformer decoder always cycles over three scales


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2 'XavierFill' (uniform, gain for ReLU-free fan-in), the init upstream uses for FPN convs."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _group_norm(num_channels: int) -> nn.GroupNorm:
    if num_channels % 32:
        raise ValueError(f"GroupNorm(32) needs a multiple of 32 channels; got convs_dim {num_channels}.")
    return nn.GroupNorm(32, num_channels)


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder.

    ``in_channels``/``in_strides`` describe the backbone outputs by name (``res2``..``res5``);
    ``transformer_in_features`` are the levels the deformable encoder reads; levels of higher
    resolution down to ``common_stride`` are added by the FPN branch.
    """

    def __init__(self, *, in_channels: Mapping[str, int], in_strides: Mapping[str, int],
                 transformer_in_features: Sequence[str] = ("res3", "res4", "res5"), conv_dim: int = 256,
                 mask_dim: int = 256, num_heads: int = 8, num_points: int = 4, ffn_dim: int = 1024,
                 num_encoder_layers: int = 6, dropout: float = 0.0, common_stride: int = 4,
                 norm: str = "GN") -> None:
        super().__init__()
        if norm != "GN":
            raise ValueError(f"Pixel decoder norm {norm!r} is not supported (only 'GN').")
        unknown = [name for name in transformer_in_features if name not in in_channels]
        if unknown or len(set(transformer_in_features)) != len(transformer_in_features):
            raise ValueError(f"deformable_transformer_encoder_in_features {list(transformer_in_features)} must be "
                             f"distinct backbone outputs among {sorted(in_channels)}.")
        self.in_features = sorted(in_channels, key=lambda name: in_strides[name])
        self.transformer_in_features = sorted(transformer_in_features, key=lambda name: in_strides[name])
        if len(self.transformer_in_features) < NUM_DECODER_LEVELS:
            raise ValueError(f"The decoder needs {NUM_DECODER_LEVELS} feature levels; the deformable encoder "
                             f"reads only {self.transformer_in_features}.")
        self.conv_dim = conv_dim
        num_levels = len(self.transformer_in_features)
        # Projections ordered from low to high resolution (res5 first), like the upstream weights.
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], conv_dim, kernel_size=1), _group_norm(conv_dim))
            for name in reversed(self.transformer_in_features)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.empty(num_levels, conv_dim))
        nn.init.normal_(self.level_embed)
        self.encoder = MSDeformEncoder(num_layers=num_encoder_layers, embed_dim=conv_dim, num_heads=num_heads,
                                       num_levels=num_levels, num_points=num_points, ffn_dim=ffn_dim,
                                       dropout=dropout)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        _c2_xavier_fill(self.mask_features)

        min_stride = in_strides[self.transformer_in_features[0]]
        num_fpn_levels = int(round(math.log2(min_stride) - math.log2(common_stride)))
        self.fpn_features = self.in_features[:max(num_fpn_levels, 0)]
        if len(self.fpn_features) != max(num_fpn_levels, 0) or (
                self.fpn_features and in_strides[self.fpn_features[0]] != common_stride):
            raise ValueError(f"common_stride {common_stride} needs backbone outputs from stride {common_stride} up "
                             f"to {min_stride}; have {dict(in_strides)}.")
        # Indexed like the upstream adapter_1.. / layer_1.. modules: position 0 is the highest resolution.
        self.fpn_lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], conv_dim, kernel_size=1, bias=False), _group_norm(conv_dim))
            for name in self.fpn_features
        )
        self.fpn_output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False),
                          _group_norm(conv_dim), nn.ReLU())
            for _ in self.fpn_features
        )
        for module in list(self.fpn_lateral) + list(self.fpn_output):
            _c2_xavier_fill(module[0])

    #: Under autocast, run in fp32 all the same (training: the sampling offsets and attention weights are
    #: sensitive to bf16/fp16 rounding). An inference runner may set it False to let autocast reach the
    #: pixel decoder as well.
    fp32_under_autocast = True

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Returns (mask features [B, mask_dim, H/4, W/4], [1/32, 1/16, 1/8 maps, each [B, conv_dim, h, w]])."""
        if not self.fp32_under_autocast:
            return self._forward_levels(features)
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_levels({name: x.float() for name, x in features.items()})

    def _forward_levels(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        srcs, pos, shapes = [], [], []
        for idx, name in enumerate(reversed(self.transformer_in_features)):
            y = self.input_proj[idx](features[name])
            height, width = y.shape[-2], y.shape[-1]
            shapes.append((height, width))
            srcs.append(y.flatten(2).transpose(1, 2))
            level_pos = sine_position_embedding(height=height, width=width, num_pos_feats=self.conv_dim // 2,
                                                device=y.device, dtype=y.dtype)
            pos.append(level_pos.flatten(2).transpose(1, 2) + self.level_embed[idx])
        memory = self.encoder(torch.cat(srcs, dim=1), torch.cat(pos, dim=1), shapes)

        outs = [level.transpose(1, 2).reshape(-1, self.conv_dim, height, width)
                for level, (height, width) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)]
        for index in reversed(range(len(self.fpn_features))):
            lateral = self.fpn_lateral[index](features[self.fpn_features[index]])
            top_down = F.interpolate(outs[-1], size=(lateral.shape[-2], lateral.shape[-1]), mode="bilinear",
                                     align_corners=False)
            outs.append(self.fpn_output[index](lateral + top_down))
        return self.mask_features(outs[-1]), outs[:NUM_DECODER_LEVELS]
