"""Swin Transformer backbone for dense prediction (stride 4, 8, 16, 32 outputs).

Parameter names follow the official Swin checkpoints (``patch_embed.proj``, ``layers.N.blocks.M.attn.qkv``,
``relative_position_bias_table``, ``layers.N.downsample.reduction``) and the detectron2 port's per-output
norms (``norm0`` .. ``norm3``), so official and detectron2 weights load by name.

Export notes: every padding size is computed from tensor shapes and applied unconditionally with
``F.pad`` (a zero pad is a no-op), the shifted-window mask is built from ``torch.arange`` comparisons,
and window attention is one ``F.scaled_dot_product_attention`` call with the relative-position bias
(plus the shift mask) as an additive float mask.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..shape_cache import shape_cached

FEATURE_NAMES = ("res2", "res3", "res4", "res5")

# Presets of the official checkpoints (window 7; the 384-px checkpoints use window 12).
SWIN_PRESETS: Dict[str, Dict[str, object]] = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
    "small": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)},
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
    "large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)},
}

# Attention logit added between tokens of different regions of a shifted window (as in the
# official implementation; exp(-100) underflows to zero weight).
SHIFT_MASK_VALUE = -100.0


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of a whole sample with probability ``drop_prob``."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into the (2w-1)^2 bias table for every (query, key) token pair of a w x w window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return rel[:, :, 0] * (2 * window_size - 1) + rel[:, :, 1]


@shape_cached
def window_token_order(height: int, width: int, window_size: int, shift_size: int, *,
                       device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index maps between a [H, W] map and its (cyclically shifted) windows, for ``index_select``.

    Returns ``to_windows`` [Hp*Wp]: for each window token (windows row-major, tokens row-major inside
    a window) its position in the map padded to Hp x Wp (multiples of the window), after rolling the
    map by -shift_size on both axes; and ``from_windows`` [H*W]: for each position of the unpadded map
    the index of the window token holding it. Gathering with them does pad-crop, roll and window
    partition/merge in one copy each way. Built from ``arange`` arithmetic only (exportable).
    """
    padded_h = height + (window_size - height % window_size) % window_size
    padded_w = width + (window_size - width % window_size) % window_size
    windows_per_row = padded_w // window_size
    tokens = window_size * window_size
    t = torch.arange(padded_h * padded_w, device=device)
    window, token = t // tokens, t % tokens
    row = (window // windows_per_row) * window_size + token // window_size  # in the rolled map
    col = (window % windows_per_row) * window_size + token % window_size
    to_windows = ((row + shift_size) % padded_h) * padded_w + (col + shift_size) % padded_w
    rows = (torch.arange(height, device=device) - shift_size + padded_h) % padded_h  # rolled coordinates
    cols = (torch.arange(width, device=device) - shift_size + padded_w) % padded_w
    window = (rows // window_size)[:, None] * windows_per_row + (cols // window_size)[None, :]
    token = (rows % window_size)[:, None] * window_size + (cols % window_size)[None, :]
    return to_windows, (window * tokens + token).flatten()


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of the window) -> [B, num_windows, window_size**2, C]."""
    _, height, width, channels = x.shape
    x = x.reshape(-1, height // window_size, window_size, width // window_size, window_size, channels)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, (height // window_size) * (width // window_size), window_size * window_size, channels)


@shape_cached
def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int, *,
                        device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [num_windows, N, N] keeping attention inside each region of a cyclically shifted window.

    ``height`` and ``width`` are the padded sizes (multiples of the window). The image is split into
    three bands per axis ([0, H-w), [H-w, H-s), [H-s, H)); tokens attend only to tokens of the same
    band pair.
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_band = (rows >= height - window_size).long() + (rows >= height - shift_size).long()
    col_band = (cols >= width - window_size).long() + (cols >= width - shift_size).long()
    region = (row_band[:, None] * 3 + col_band[None, :])[None, :, :, None].to(dtype)
    region = window_partition(region, window_size).reshape(-1, window_size * window_size)
    different = (region[:, None, :] - region[:, :, None]) != 0
    return torch.where(different, torch.full((), SHIFT_MASK_VALUE, dtype=dtype, device=device),
                       torch.zeros((), dtype=dtype, device=device))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias."""

    def __init__(self, *, dim: int, num_heads: int, window_size: int, qkv_bias: bool,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Swin stage width {dim} is not divisible by num_heads {num_heads}.")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Derived from the window size: not stored in checkpoints.
        self.register_buffer("relative_position_index", relative_position_index(window_size).flatten(),
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.scale = qk_scale  # None: head_dim ** -0.5
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """[num_heads, N, N] bias for every (query, key) pair of a window."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.reshape(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        """``windows`` [B, nW, N, C]; ``attn_bias`` [heads, N, N] (regular windows) or [nW, heads, N, N]
        (shifted windows: relative-position bias plus shift mask)."""
        num_windows, n = windows.shape[1], windows.shape[2]
        # [3, B * nW, heads, N, d] as a view of the projection (no copy); 4-D inputs keep SDPA on its
        # fused CPU kernel. The batch size is always inferred (-1) so it stays dynamic when exported.
        q, k, v = self.qkv(windows).reshape(-1, n, 3, self.num_heads, self.dim // self.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        if attn_bias.dim() == 3:
            mask = attn_bias.unsqueeze(0)
        else:  # a view for batch 1; one copy of the mask per extra image otherwise
            mask = attn_bias.expand(q.shape[0] // num_windows, -1, -1, -1, -1).reshape(-1, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=self.scale,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(-1, num_windows, n, self.dim)))


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock(nn.Module):
    """(Shifted) window attention + MLP, both pre-norm residual; works on channels-last [B, H, W, C]."""

    def __init__(self, *, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop_path: float, qk_scale: Optional[float] = None, drop: float = 0.0,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must lie in [0, window_size={window_size}).")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, num_heads=num_heads, window_size=window_size, qkv_bias=qkv_bias,
                                    qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, to_windows: torch.Tensor, from_windows: torch.Tensor,
                shift_mask: torch.Tensor) -> torch.Tensor:
        """``x`` [B, H, W, C]; index maps from :func:`window_token_order` for this block's shift;
        ``shift_mask`` [nW, N, N] from :func:`shifted_window_mask` (unused by unshifted blocks)."""
        height, width, channels = x.shape[1], x.shape[2], x.shape[3]
        ws = self.window_size
        # Padded tokens are zeros after the norm, as in the official implementation.
        normed = F.pad(self.norm1(x), (0, 0, 0, (ws - width % ws) % ws, 0, (ws - height % ws) % ws))
        # (reshape, not unflatten: the exporter's unflatten bakes the example batch size in)
        windows = normed.flatten(1, 2).index_select(1, to_windows).reshape(
            -1, to_windows.shape[0] // (ws * ws), ws * ws, channels)
        bias = self.attn.relative_position_bias()
        if self.shift_size:
            bias = bias[None] + shift_mask[:, None]
        attended = self.attn(windows, bias).flatten(1, 2).index_select(1, from_windows)
        x = x + self.drop_path(attended.reshape(-1, height, width, channels))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat + LayerNorm + linear reduction: [B, H, W, C] -> [B, H/2, W/2, 2C]."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width, channels = x.shape[1], x.shape[2], x.shape[3]
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        half_h, half_w = x.shape[1] // 2, x.shape[2] // 2
        # Channel order of the official implementation: (0,0), (1,0), (0,1), (1,1) as (row, col).
        x = x.reshape(-1, half_h, 2, half_w, 2, channels).permute(0, 1, 3, 4, 2, 5)
        x = x.reshape(-1, half_h, half_w, 4 * channels)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` blocks alternating regular and shifted windows, then optional patch merging."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop_path: Sequence[float], downsample: bool, use_checkpoint: bool,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(dim=dim, num_heads=num_heads, window_size=window_size,
                      shift_size=0 if i % 2 == 0 else self.shift_size, mlp_ratio=mlp_ratio,
                      qkv_bias=qkv_bias, drop_path=drop_path[i], qk_scale=qk_scale, drop=drop,
                      attn_drop=attn_drop)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim=dim) if downsample else None

    def forward(self, x: torch.Tensor):
        """Returns (stage output [B, H, W, C], input of the next stage or None)."""
        height, width = x.shape[1], x.shape[2]
        ws = self.window_size
        layouts = [window_token_order(height, width, ws, 0, device=x.device)]
        shift_mask = x.new_zeros(())  # placeholder for unshifted-only stages
        if len(self.blocks) > 1:
            layouts.append(window_token_order(height, width, ws, self.shift_size, device=x.device))
            shift_mask = shifted_window_mask(height + (ws - height % ws) % ws, width + (ws - width % ws) % ws, ws,
                                             self.shift_size, device=x.device, dtype=x.dtype)
        for i, block in enumerate(self.blocks):
            to_windows, from_windows = layouts[i % 2]
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, to_windows, from_windows, shift_mask, use_reentrant=False)
            else:
                x = block(x, to_windows, from_windows, shift_mask)
        return x, (self.downsample(x) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; pads the image to a multiple of the patch size first."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> channels-last [B, ceil(H/p), ceil(W/p), C]."""
        p = self.patch_size
        images = F.pad(images, (0, (p - images.shape[3] % p) % p, 0, (p - images.shape[2] % p) % p))
        x = self.proj(images).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class SwinTransformer(nn.Module):
    """Swin backbone returning ``{"res2": [B, C, H/4, W/4], ..., "res5": [B, 8C, H/32, W/32]}``.

    Any input size works: the image is padded to the patch grid, every block pads to its window grid,
    patch merging pads odd sizes; outputs have ceil(H / stride) x ceil(W / stride) cells.
    """

    def __init__(self, *, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int = 7,
                 patch_size: int = 4, in_chans: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.3, ape: bool = False, patch_norm: bool = True,
                 pretrain_img_size: int = 224, out_features: Sequence[str] = FEATURE_NAMES,
                 use_checkpoint: bool = False, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0) -> None:
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"Swin needs 4 stages: got depths={list(depths)}, num_heads={list(num_heads)}.")
        unknown = [name for name in out_features if name not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"Swin out_features {unknown} are not among {list(FEATURE_NAMES)}.")
        self.out_features = [name for name in FEATURE_NAMES if name in out_features]
        self.num_features = [int(embed_dim * 2 ** i) for i in range(4)]
        self.window_size = window_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      patch_norm=patch_norm)
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)  # after patch embedding (and the absolute position embedding)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.layers.append(SwinStage(
                dim=self.num_features[i], depth=depths[i], num_heads=num_heads[i], window_size=window_size,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rates[start:start + depths[i]],
                downsample=i < 3, use_checkpoint=use_checkpoint, qk_scale=qk_scale, drop=drop_rate,
                attn_drop=attn_drop_rate,
            ))
        for i, name in enumerate(FEATURE_NAMES):
            if name in self.out_features:
                self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(_init_weights)

    @property
    def out_channels(self) -> Dict[str, int]:
        return {name: self.num_features[FEATURE_NAMES.index(name)] for name in self.out_features}

    @property
    def out_strides(self) -> Dict[str, int]:
        return {name: 4 * 2 ** FEATURE_NAMES.index(name) for name in self.out_features}

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.patch_embed(images)
        if self.absolute_pos_embed is not None:
            pos = F.interpolate(self.absolute_pos_embed, size=(x.shape[1], x.shape[2]), mode="bicubic",
                                align_corners=False)
            x = x + pos.permute(0, 2, 3, 1)
        x = self.pos_drop(x)
        outputs: Dict[str, torch.Tensor] = {}
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            name = FEATURE_NAMES[i]
            if name in self.out_features:
                outputs[name] = getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous()
            if name == self.out_features[-1]:
                break
        return outputs


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def resolve_swin_architecture(*, type: Optional[str], embed_dim: Optional[int], depths: Optional[List[int]],
                              num_heads: Optional[List[int]]) -> Dict[str, object]:
    """Fill ``embed_dim``/``depths``/``num_heads`` left as None from the named preset."""
    values = {"embed_dim": embed_dim, "depths": depths, "num_heads": num_heads}
    if any(v is None for v in values.values()):
        if type not in SWIN_PRESETS:
            missing = [k for k, v in values.items() if v is None]
            raise ValueError(f"Swin {missing} are not set and type {type!r} is not a preset "
                             f"({sorted(SWIN_PRESETS)}).")
        preset = SWIN_PRESETS[type]
        values = {k: (preset[k] if v is None else v) for k, v in values.items()}
    return {"embed_dim": int(values["embed_dim"]), "depths": [int(d) for d in values["depths"]],
            "num_heads": [int(h) for h in values["num_heads"]]}
