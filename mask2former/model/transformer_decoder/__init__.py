"""Masked-attention transformer decoder and its positional encoding."""

from .masked_decoder import MaskedTransformerDecoder
from .position_encoding import sine_position_embedding

__all__ = ["MaskedTransformerDecoder", "sine_position_embedding"]
