"""Masked-attention transformer decoder (Mask2Former's multi-scale decoder with prediction heads).

Each layer: masked cross-attention to one feature level, self-attention among the queries, FFN;
levels cycle 1/32, 1/16, 1/8. The cross-attention of a layer only sees the pixels where the previous
prediction's mask logit is >= 0 (sigmoid >= 0.5); a query whose mask is empty at that level sees
every pixel. The mask is built with comparisons and ``torch.where`` (no in-place writes) and passed
as an additive float mask.

``dec_layers`` counts predictions, as upstream: the first comes from the learnable query features
before any layer, so ``dec_layers`` = 10 builds 9 layers.

Work saved without changing any output:
- bilinear resizing commutes with the channel contraction of the mask head, so attention masks are
  computed from the mask features resized once per level instead of resizing [B, Q, H/4, W/4] mask
  logits after every layer;
- in eval mode the full-resolution masks and class logits of intermediate layers (only used by the
  auxiliary losses) are not computed.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .position_encoding import sine_position_embedding

NUM_FEATURE_LEVELS = 3


class MaskedAttentionDecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, post-norm (or pre-norm) residual blocks."""

    def __init__(self, *, hidden_dim: int, nheads: int, dim_feedforward: int, dropout: float,
                 pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.dropout = dropout
        self.cross_attn = MultiHeadAttention(embed_dim=hidden_dim, num_heads=nheads, dropout=dropout)
        self.cross_norm = nn.LayerNorm(hidden_dim)
        self.self_attn = MultiHeadAttention(embed_dim=hidden_dim, num_heads=nheads, dropout=dropout)
        self.self_norm = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.ffn_norm = nn.LayerNorm(hidden_dim)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.linear1(x.flatten(0, 1)), inplace=True)  # 2-D: not a view, safe in place
        return self.linear2(self._drop(hidden)).view_as(x)

    def forward(self, tgt: torch.Tensor, *, memory: torch.Tensor, memory_pos: torch.Tensor,
                query_pos: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """``tgt``/``query_pos`` [B, Q, C]; ``memory`` [B, HW, C]; ``memory_pos`` [1, HW, C];
        ``attn_mask`` additive [B, 1, Q, HW]."""
        key = memory + memory_pos
        if self.pre_norm:
            x = self.cross_norm(tgt)
            tgt = tgt + self._drop(self.cross_attn(x + query_pos, key, memory, attn_mask))
            x = self.self_norm(tgt)
            tgt = tgt + self._drop(self.self_attn(x + query_pos, x + query_pos, x))
            return tgt + self._drop(self._ffn(self.ffn_norm(tgt)))
        tgt = self.cross_norm(tgt + self._drop(self.cross_attn(tgt + query_pos, key, memory, attn_mask)))
        tgt = self.self_norm(tgt + self._drop(self.self_attn(tgt + query_pos, tgt + query_pos, tgt)))
        return self.ffn_norm(tgt + self._drop(self._ffn(tgt)))


class MaskEmbedMLP(nn.Module):
    """Three linear layers with ReLU between them (``layers.0`` .. ``layers.2``)."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def masked_attention_bias(mask_logits: torch.Tensor) -> torch.Tensor:
    """Additive cross-attention mask [B, 1, Q, HW] from mask logits [B, Q, HW] at the level's size.

    Blocked where sigmoid(logit) < 0.5, i.e. logit < 0; a row blocked everywhere is unblocked.
    """
    blocked = mask_logits < 0
    all_blocked = blocked.sum(dim=-1, keepdim=True) == blocked.shape[-1]
    blocked = torch.logical_and(blocked, torch.logical_not(all_blocked))
    bias = torch.where(blocked, torch.full((), float("-inf"), dtype=mask_logits.dtype, device=mask_logits.device),
                       torch.zeros((), dtype=mask_logits.dtype, device=mask_logits.device))
    return bias.unsqueeze(1).detach()


class MaskedTransformerDecoder(nn.Module):
    """Queries -> per-layer class logits [B, Q, K+1] (no-object last) and mask logits [B, Q, H/4, W/4]."""

    def __init__(self, *, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 10, pre_norm: bool = False,
                 mask_dim: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"dec_layers must be >= 1 (the query prediction counts as one); got {dec_layers}.")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(NUM_FEATURE_LEVELS, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(NUM_FEATURE_LEVELS):
            if in_channels != hidden_dim:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(hidden_dim=hidden_dim, nheads=nheads, dim_feedforward=dim_feedforward,
                                        dropout=dropout, pre_norm=pre_norm)
            for _ in range(dec_layers - 1)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MaskEmbedMLP(input_dim=hidden_dim, hidden_dim=hidden_dim, output_dim=mask_dim)

    def forward(self, multi_scale_features: List[torch.Tensor],
                mask_features: torch.Tensor) -> Dict[str, object]:
        """``multi_scale_features``: the 1/32, 1/16, 1/8 maps [B, in_channels, h, w];
        ``mask_features`` [B, mask_dim, H/4, W/4]."""
        memories, memory_pos, level_mask_features = [], [], []
        # The CPU bilinear kernel works channels-last and would convert its input on every call:
        # convert once for the three resizes (values are identical).
        mask_features_cl = mask_features.detach().contiguous(memory_format=torch.channels_last)
        for i in range(NUM_FEATURE_LEVELS):
            x = multi_scale_features[i]
            height, width = x.shape[-2], x.shape[-1]
            memories.append(self.input_proj[i](x).flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            pos = sine_position_embedding(height=height, width=width, num_pos_feats=self.hidden_dim // 2,
                                          device=x.device, dtype=memories[-1].dtype)
            memory_pos.append(pos.flatten(2).transpose(1, 2))
            level_mask_features.append(F.interpolate(mask_features_cl, size=(height, width), mode="bilinear",
                                                     align_corners=False).flatten(2))

        batch = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        tgt = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        mask_flat = mask_features.flatten(2)
        out_height, out_width = mask_features.shape[-2], mask_features.shape[-1]

        predictions = []
        num_predictions = len(self.layers) + 1
        for step in range(num_predictions):
            if step > 0:
                level = (step - 1) % NUM_FEATURE_LEVELS
                tgt = self.layers[step - 1](tgt, memory=memories[level], memory_pos=memory_pos[level],
                                            query_pos=query_pos, attn_mask=attn_mask)
            normed = self.decoder_norm(tgt)
            mask_embed = self.mask_embed(normed)
            if self.training or step == num_predictions - 1:
                logits = self.class_embed(normed)
                masks = torch.bmm(mask_embed, mask_flat).reshape(-1, self.num_queries, out_height, out_width)
                predictions.append({"pred_logits": logits, "pred_masks": masks})
            if step < num_predictions - 1:
                next_level = step % NUM_FEATURE_LEVELS
                attn_mask = masked_attention_bias(torch.bmm(mask_embed.detach(), level_mask_features[next_level]))

        out: Dict[str, object] = dict(predictions[-1])
        if self.training:
            out["aux_outputs"] = predictions[:-1]
        return out
