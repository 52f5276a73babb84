"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch.

Sampling uses ``F.grid_sample`` on 4-D float32 tensors (bilinear, zero padding, align_corners=False),
which exports to ONNX (opset 16+) and runs in onnxruntime; there is no custom CUDA op.

Efficiency: heads are folded into the batch so there is one ``grid_sample`` per level for all points
of all heads, and the attention-weighted sum over points is accumulated level by level and point by
point (fused multiply-add) instead of stacking every level's samples into one large tensor first.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..shape_cache import shape_cached


def deformable_sample_and_sum(value_levels: Sequence[torch.Tensor], grids: torch.Tensor,
                              weights: torch.Tensor) -> torch.Tensor:
    """Sum over levels and points of attention-weighted bilinear samples.

    ``value_levels``: per level [N, D, h, w] (N = batch x heads); ``grids``: [L, N, P, Q, 2] in the
    [-1, 1] convention of ``grid_sample`` (x first); ``weights``: [L, N, P, Q]. Returns [N, D, Q].

    Points are the middle sample axis, so each point's samples are a [N, D, Q] slice that is
    multiplied and accumulated in one fused step (``addcmul``), with no reduction over a short
    innermost axis and no stacked copy of all samples.
    """
    out = None
    # unbind/split rather than indexing: their backward concatenates the gradients once instead of
    # materialising a zero-filled full-size gradient per slice.
    for value, level_grid, level_weights in zip(value_levels, grids.unbind(0), weights.unbind(0)):
        sampled = F.grid_sample(value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        for point_samples, point_weights in zip(sampled.unbind(2), level_weights.unsqueeze(1).unbind(2)):
            if out is None:
                out = point_samples * point_weights
            else:
                out = torch.addcmul(out, point_samples, point_weights)
    return out


@shape_cached
def offset_scale(spatial_shapes: Tuple[Tuple[int, int], ...], *, heads: int, points: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """[heads * levels * points * 2]: (2 / width, 2 / height) of each output of ``sampling_offsets`` (rows
    ordered heads, levels, points, xy), turning pixel offsets into grid_sample units."""
    per_level = 2 / torch.tensor([[w, h] for h, w in spatial_shapes], dtype=dtype, device=device)
    return per_level.view(1, -1, 1, 2).expand(heads, -1, points, 2).reshape(-1)


class MSDeformAttn(nn.Module):
    """Deformable attention of ``num_heads`` heads x ``num_levels`` levels x ``num_points`` points.

    Parameter names match Deformable DETR / Mask2Former / Hugging Face (``sampling_offsets``,
    ``attention_weights``, ``value_proj``, ``output_proj``).
    """

    def __init__(self, *, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 3,
                 num_points: int = 4) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MSDeformAttn embed_dim {embed_dim} is not divisible by num_heads {num_heads}.")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR init: offsets start on rings around the reference point, one direction per head."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, value: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        """``query`` [B, Q, C] (position embedding included); ``value`` [B, S, C], the levels' maps
        flattened and concatenated in ``spatial_shapes`` order; ``reference_points`` [Q, 2], normalised
        (x, y) in [0, 1], shared by the batch. Returns [B, Q, C]."""
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        head_dim = self.embed_dim // heads
        levels_flat = self.value_proj(value).split([height * width for height, width in spatial_shapes], dim=1)
        value_levels = [  # per level [B * heads, head_dim, h, w], the layout grid_sample reads
            level.reshape(batch, height * width, heads, head_dim).permute(0, 2, 3, 1).reshape(
                batch * heads, head_dim, height, width)
            for level, (height, width) in zip(levels_flat, spatial_shapes)
        ]

        # grid = 2 * (ref + offset / size) - 1 in grid_sample's [-1, 1] coordinates, reordered once. The scale
        # is one value per projection output, broadcast over its last axis: the same product through a 6-D
        # [.., levels, 1, xy] broadcast took twice as long, forward and backward.
        scale = offset_scale(tuple(spatial_shapes), heads=heads, points=points, device=query.device,
                             dtype=query.dtype)
        offsets = (self.sampling_offsets(query) * scale).view(batch, num_queries, heads, levels, points, 2)
        grids = offsets.permute(3, 0, 2, 4, 1, 5) + (2 * reference_points - 1)
        grids = grids.reshape(levels, batch * heads, points, num_queries, 2)

        # Softmax over levels x points with queries innermost (a softmax over a short innermost axis is slow).
        logits = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = logits.permute(0, 2, 3, 1).softmax(dim=2).view(batch, heads, levels, points, num_queries)
        weights = weights.permute(2, 0, 1, 3, 4).reshape(levels, batch * heads, points, num_queries)

        out = deformable_sample_and_sum(value_levels, grids, weights)  # [B * heads, head_dim, Q]
        out = out.reshape(batch, self.embed_dim, num_queries).transpose(1, 2)
        return self.output_proj(out)
