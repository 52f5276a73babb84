"""Pixel decoder: multi-scale deformable attention encoder + FPN."""

from .msdeform_attn import MSDeformAttn
from .msdeform_pixel_decoder import MSDeformAttnPixelDecoder

__all__ = ["MSDeformAttn", "MSDeformAttnPixelDecoder"]
