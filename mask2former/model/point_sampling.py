"""Point sampling on mask logits: the memory saver of Mask2Former's matching and mask losses.

Coordinates are normalised to [0, 1] in (x, y) order over the whole map, so the same points can be read
from maps of different resolutions (1/4-scale predictions and full-resolution targets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(input: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly read `input` at normalised points.

    Args:
        input: [N, C, H, W] maps.
        coords: [N, P, 2] points in [0, 1], (x, y) order; a point's value is that of the continuous map whose
            pixel centres sit at ((i + 0.5) / W, (j + 0.5) / H) (grid_sample with align_corners=False).

    Returns:
        [N, C, P] values.
    """
    if input.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(
            f"point_sample expects input [N, C, H, W] and coords [N, P, 2]; got input {tuple(input.shape)} and "
            f"coords {tuple(coords.shape)}"
        )
    if input.shape[0] != coords.shape[0]:
        raise ValueError(
            f"point_sample: input batch {input.shape[0]} differs from coords batch {coords.shape[0]}"
        )
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(input.dtype)  # [N, P, 1, 2] in grid_sample's [-1, 1]
    return F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def sample_uncertain_points(
    logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> torch.Tensor:
    """Pick points where the mask logits are most uncertain, plus uniform random points.

    Draws int(num_points * oversample_ratio) uniform candidates, keeps the int(importance_sample_ratio *
    num_points) of them with the highest uncertainty -|logit|, and fills the rest with fresh uniform points.
    Not differentiable (the points are a sampling decision).

    Args:
        logits: [N, 1, H, W] mask logits.
        num_points: points returned per mask.
        oversample_ratio: candidates drawn per returned point, >= 1.
        importance_sample_ratio: share of the returned points taken from the most uncertain candidates, in [0, 1].

    Returns:
        [N, num_points, 2] coordinates in [0, 1]: the uncertain points first, then the random ones.
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"sample_uncertain_points expects logits [N, 1, H, W]; got {tuple(logits.shape)}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1; got {num_points}")
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1; got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"importance_sample_ratio must be in [0, 1]; got {importance_sample_ratio}")
    num_masks = logits.shape[0]
    device = logits.device
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    with torch.no_grad():
        candidates = torch.rand(num_masks, num_candidates, 2, device=device)
        uncertainty = -point_sample(logits.detach().float(), candidates).squeeze(1).abs()  # [N, candidates]
        top = uncertainty.topk(num_uncertain, dim=1).indices  # [N, num_uncertain]
        uncertain = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
        if num_random == 0:
            return uncertain
        random = torch.rand(num_masks, num_random, 2, device=device)
        return torch.cat([uncertain, random], dim=1)
