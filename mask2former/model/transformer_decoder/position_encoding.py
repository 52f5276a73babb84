"""Sine position embedding of a feature map (DETR style, normalised coordinates).

Built from ``torch.arange`` on the map's size only (no mask, no cumsum), so it never depends on
tensor values; cached per size (see :mod:`..shape_cache`).
"""

from __future__ import annotations

import math

import torch

from ..shape_cache import shape_cached


@shape_cached
def sine_position_embedding(*, height: int, width: int, num_pos_feats: int, device: torch.device,
                            dtype: torch.dtype, temperature: float = 10000.0) -> torch.Tensor:
    """[1, 2 * num_pos_feats, height, width]: y features first, then x; sin/cos interleaved.

    Coordinates run 1..H (1..W), divided by H + 1e-6 (W + 1e-6) and scaled by 2*pi, as in the
    upstream ``PositionEmbeddingSine(normalize=True)``.
    """
    eps = 1e-6
    scale = 2 * math.pi
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + eps) * scale
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + eps) * scale
    dim_t = torch.arange(num_pos_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_y = _interleave_sin_cos(y[:, None] / dim_t)  # [H, F]
    pos_x = _interleave_sin_cos(x[:, None] / dim_t)  # [W, F]
    pos = torch.cat((pos_y[:, None, :].expand(height, width, num_pos_feats),
                     pos_x[None, :, :].expand(height, width, num_pos_feats)), dim=-1)
    return pos.permute(2, 0, 1).unsqueeze(0).to(dtype)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [..., F] with sin of the even and cos of the odd features, interleaved."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
