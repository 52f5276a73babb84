"""Deformable-attention transformer encoder over the flattened multi-scale feature maps."""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..shape_cache import shape_cached
from .msdeform_attn import MSDeformAttn


@shape_cached
def encoder_reference_points(spatial_shapes: Tuple[Tuple[int, int], ...], *, device: torch.device,
                             dtype: torch.dtype) -> torch.Tensor:
    """[S, 2] normalised (x, y) centres of every cell of every level, levels concatenated in order."""
    points = []
    for height, width in spatial_shapes:
        ys = torch.linspace(0.5, height - 0.5, height, device=device, dtype=dtype) / height
        xs = torch.linspace(0.5, width - 0.5, width, device=device, dtype=dtype) / width
        points.append(torch.stack((xs[None, :].expand(height, width), ys[:, None].expand(height, width)),
                                  dim=-1).reshape(-1, 2))
    return torch.cat(points, dim=0)


class MSDeformEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(self, *, embed_dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels,
                                      num_points=num_points)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout = dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        src = self.norm1(src + self._drop(self.self_attn(src + pos, src, reference_points, spatial_shapes)))
        # On 2-D rows the projection's output is not a view, so the in-place ReLU saves one large
        # allocation without making autograd rebuild the tensor in the backward pass.
        hidden = F.relu(self.linear1(src.flatten(0, 1)), inplace=True)
        ffn = self.linear2(self._drop(hidden)).view_as(src)
        return self.norm2(src + self._drop(ffn))


class MSDeformEncoder(nn.Module):
    """A stack of :class:`MSDeformEncoderLayer` sharing one set of reference points."""

    def __init__(self, *, num_layers: int, embed_dim: int, num_heads: int, num_levels: int, num_points: int,
                 ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MSDeformEncoderLayer(embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels,
                                 num_points=num_points, ffn_dim=ffn_dim, dropout=dropout)
            for _ in range(num_layers)
        )

    #: In training, keep only each layer's input and recompute the layer in the backward pass (the sampled
    #: values, attention weights and FFN activations of every token at three scales are most of the pixel
    #: decoder's saved memory; recomputing them costs one more encoder forward).
    recompute_layers = False

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        """``src``/``pos`` [B, S, C] with the levels flattened and concatenated in ``spatial_shapes`` order."""
        reference_points = encoder_reference_points(tuple(spatial_shapes), device=src.device, dtype=src.dtype)
        recompute = self.recompute_layers and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                src = checkpoint(layer, src, pos, reference_points, spatial_shapes, use_reentrant=False)
            else:
                src = layer(src, pos, reference_points, spatial_shapes)
        return src
