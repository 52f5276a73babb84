"""EfficientViT backbones (MIT Han Lab; multi-scale ReLU linear attention), variants b0-b3 and l0-l3.

Stage widths and depths are those of the official release and of TAO's Mask2Former: ``res2`` .. ``res5``
are the outputs of stages 1 .. 4 at strides 4, 8, 16, 32 (stage 0, the stem, runs at stride 2).

Parameter names follow the official MIT checkpoints under their ``backbone.`` prefix, so the release's
``.pt`` files load by name: the B family has ``input_stem.op_list.N`` and ``stages.0-3.op_list.M``; the L
family keeps its stem as ``stages.0`` and has ``stages.0-4.op_list.M``. Inside a block the names are
``main``/``shortcut`` (residual), ``conv``/``norm`` (conv + BatchNorm), ``inverted_conv``/``depth_conv``/
``point_conv`` (MBConv), ``spatial_conv`` (fused MBConv), ``conv1``/``conv2`` (L stem), ``qkv``/``aggreg``/
``proj`` (attention) and ``context_module``/``local_module`` (EfficientViT block). timm's names map onto
these in :mod:`mask2former.model.efficientvit_weights`.

Attention is always evaluated in its linear form, in float32 even under autocast; the release switches
to the quadratic form on maps smaller than the head dimension, which gives the same values.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
ATTENTION_EPS = 1e-15  # as in the release; keeps the normaliser of an all-zero kernel map finite
ATTENTION_SCALES = (5,)  # kernel sizes of the multi-scale token aggregation


@dataclasses.dataclass(frozen=True)
class EfficientViTVariant:
    """Architecture of one released variant: ``widths``/``depths`` of stage 0 (stem) .. stage 4."""

    family: str  # "b" or "l"
    widths: Tuple[int, int, int, int, int]
    depths: Tuple[int, int, int, int, int]
    head_dim: int


EFFICIENTVIT_VARIANTS: Dict[str, EfficientViTVariant] = {
    "b0": EfficientViTVariant("b", (8, 16, 32, 64, 128), (1, 2, 2, 2, 2), 16),
    "b1": EfficientViTVariant("b", (16, 32, 64, 128, 256), (1, 2, 3, 3, 4), 16),
    "b2": EfficientViTVariant("b", (24, 48, 96, 192, 384), (1, 3, 4, 4, 6), 32),
    "b3": EfficientViTVariant("b", (32, 64, 128, 256, 512), (1, 4, 6, 6, 9), 32),
    "l0": EfficientViTVariant("l", (32, 64, 128, 256, 512), (1, 1, 1, 4, 4), 32),
    "l1": EfficientViTVariant("l", (32, 64, 128, 256, 512), (1, 1, 1, 6, 6), 32),
    "l2": EfficientViTVariant("l", (32, 64, 128, 256, 512), (1, 2, 2, 8, 8), 32),
    "l3": EfficientViTVariant("l", (64, 128, 256, 512, 1024), (1, 2, 2, 8, 8), 32),
}
EFFICIENTVIT_NAMES = tuple(EFFICIENTVIT_VARIANTS)


def _activation(name: Optional[str]) -> Optional[nn.Module]:
    if name is None:
        return None
    if name == "hswish":
        return nn.Hardswish()
    if name == "gelu":
        return nn.GELU(approximate="tanh")  # the release's GELU
    raise ValueError(f"unknown activation {name!r}")


class ConvNormAct(nn.Module):
    """Convolution (padding k//2), optional BatchNorm, optional activation; ``conv``/``norm`` as released."""

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, bias: bool = False, norm: bool = True, act: Optional[str] = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class DSConv(nn.Module):
    """Depthwise 3x3 (with activation) then pointwise 1x1 (B-family stem block)."""

    def __init__(self, *, channels: int, act: str) -> None:
        super().__init__()
        self.depth_conv = ConvNormAct(in_channels=channels, out_channels=channels, groups=channels, act=act)
        self.point_conv = ConvNormAct(in_channels=channels, out_channels=channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(x))


class ResBlock(nn.Module):
    """Two 3x3 convolutions (L-family stem block)."""

    def __init__(self, *, channels: int, act: str) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_channels=channels, out_channels=channels, act=act)
        self.conv2 = ConvNormAct(in_channels=channels, out_channels=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand, depthwise 3x3 (``stride``), 1x1 project.

    ``fewer_norm`` (attention stages): the two first convolutions carry a bias and no BatchNorm.
    """

    def __init__(self, *, in_channels: int, out_channels: int, stride: int, expand_ratio: float, act: str,
                 fewer_norm: bool) -> None:
        super().__init__()
        mid = round(in_channels * expand_ratio)
        self.inverted_conv = ConvNormAct(in_channels=in_channels, out_channels=mid, kernel_size=1, bias=fewer_norm,
                                         norm=not fewer_norm, act=act)
        self.depth_conv = ConvNormAct(in_channels=mid, out_channels=mid, stride=stride, groups=mid, bias=fewer_norm,
                                      norm=not fewer_norm, act=act)
        self.point_conv = ConvNormAct(in_channels=mid, out_channels=out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class FusedMBConv(nn.Module):
    """Fused inverted bottleneck: full 3x3 expand (``stride``), 1x1 project (L family, stages 1-2)."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int, expand_ratio: float, act: str) -> None:
        super().__init__()
        mid = round(in_channels * expand_ratio)
        self.spatial_conv = ConvNormAct(in_channels=in_channels, out_channels=mid, stride=stride, act=act)
        self.point_conv = ConvNormAct(in_channels=mid, out_channels=out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.spatial_conv(x))


class Residual(nn.Module):
    """``main(x) + x`` when ``identity``, else ``main(x)`` (downsampling blocks); ``main`` as released."""

    def __init__(self, main: nn.Module, *, identity: bool) -> None:
        super().__init__()
        self.main = main
        self.identity = identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x if self.identity else self.main(x)


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention over all positions of the map.

    q, k, v come from one 1x1 convolution; each scale adds a depthwise k x k + grouped 1x1 aggregation of
    them as further heads. Per head: ``out = (v k^T) relu(q) / (1^T relu(k)^T relu(q) + eps)`` with
    ``relu`` on q and k, cost linear in the number of positions.
    """

    def __init__(self, *, channels: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        heads = channels // head_dim
        total = heads * head_dim
        self.qkv = ConvNormAct(in_channels=channels, out_channels=3 * total, kernel_size=1, norm=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * total, 3 * total, scale, padding=scale // 2, groups=3 * total, bias=False),
                nn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
            )
            for scale in ATTENTION_SCALES
        )
        self.proj = ConvNormAct(in_channels=total * (1 + len(ATTENTION_SCALES)), out_channels=channels,
                                kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [aggregate(qkv) for aggregate in self.aggreg], dim=1)
        batch, _, height, width = qkv.shape
        with torch.autocast(device_type="cuda" if x.is_cuda else "cpu", enabled=False):
            tokens = qkv.float().reshape(batch, -1, 3 * self.head_dim, height * width)  # [B, heads, 3d, N]
            q, k, v = tokens.split(self.head_dim, dim=2)
            q, k = F.relu(q), F.relu(k)
            v = F.pad(v, (0, 0, 0, 1), value=1.0)  # a row of ones gives the normaliser in the same product
            out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)  # [B, heads, d+1, N]
            out = out[:, :, :-1] / (out[:, :, -1:] + ATTENTION_EPS)
            out = out.reshape(batch, -1, height, width)
        return self.proj(out.to(qkv.dtype))


class EfficientViTBlock(nn.Module):
    """Linear-attention context module then an MBConv local module, both residual."""

    def __init__(self, *, channels: int, head_dim: int, expand_ratio: float, act: str) -> None:
        super().__init__()
        self.context_module = Residual(LiteMLA(channels=channels, head_dim=head_dim), identity=True)
        self.local_module = Residual(MBConv(in_channels=channels, out_channels=channels, stride=1,
                                            expand_ratio=expand_ratio, act=act, fewer_norm=True), identity=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class OpSequential(nn.Module):
    """Blocks applied in order, held as ``op_list`` (the release's name); optional activation checkpointing."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(blocks)
        self.use_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.op_list:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def _b_stages(variant: EfficientViTVariant, in_chans: int) -> List[OpSequential]:
    """Stem and stages 1-4 of a B-family network (Hardswish; expand ratio 4)."""
    act, expand = "hswish", 4
    widths, depths = variant.widths, variant.depths
    stem = [ConvNormAct(in_channels=in_chans, out_channels=widths[0], stride=2, act=act)]
    stem += [Residual(DSConv(channels=widths[0], act=act), identity=True) for _ in range(depths[0])]
    levels = [OpSequential(stem)]
    for stage in (1, 2):
        blocks = [Residual(MBConv(in_channels=widths[stage - 1] if i == 0 else widths[stage],
                                  out_channels=widths[stage], stride=2 if i == 0 else 1, expand_ratio=expand, act=act,
                                  fewer_norm=False), identity=i > 0)
                  for i in range(depths[stage])]
        levels.append(OpSequential(blocks))
    for stage in (3, 4):
        blocks = [Residual(MBConv(in_channels=widths[stage - 1], out_channels=widths[stage], stride=2,
                                  expand_ratio=expand, act=act, fewer_norm=True), identity=False)]
        blocks += [EfficientViTBlock(channels=widths[stage], head_dim=variant.head_dim, expand_ratio=expand, act=act)
                   for _ in range(depths[stage])]
        levels.append(OpSequential(blocks))
    return levels


def _l_stages(variant: EfficientViTVariant, in_chans: int) -> List[OpSequential]:
    """Stem and stages 1-4 of an L-family network (GELU; downsampling blocks expand 16, stage 4's 24)."""
    act = "gelu"
    widths, depths = variant.widths, variant.depths
    stem = [ConvNormAct(in_channels=in_chans, out_channels=widths[0], stride=2, act=act)]
    stem += [Residual(ResBlock(channels=widths[0], act=act), identity=True) for _ in range(depths[0])]
    levels = [OpSequential(stem)]
    for stage in (1, 2, 3):
        blocks = []
        for i in range(depths[stage] + 1):
            in_channels = widths[stage - 1] if i == 0 else widths[stage]
            stride, expand = (2, 16) if i == 0 else (1, 4)
            if stage < 3:
                block = FusedMBConv(in_channels=in_channels, out_channels=widths[stage], stride=stride,
                                    expand_ratio=expand, act=act)
            else:
                block = MBConv(in_channels=in_channels, out_channels=widths[stage], stride=stride,
                               expand_ratio=expand, act=act, fewer_norm=True)
            blocks.append(Residual(block, identity=i > 0))
        levels.append(OpSequential(blocks))
    blocks = [Residual(MBConv(in_channels=widths[3], out_channels=widths[4], stride=2, expand_ratio=24, act=act,
                              fewer_norm=True), identity=False)]
    blocks += [EfficientViTBlock(channels=widths[4], head_dim=variant.head_dim, expand_ratio=6, act=act)
               for _ in range(depths[4])]
    levels.append(OpSequential(blocks))
    return levels


class EfficientViT(nn.Module):
    """EfficientViT backbone ``name`` (b0-b3, l0-l3) returning ``{"res2": [B, w1, H/4, W/4], ...,
    "res5": [B, w4, H/32, W/32]}`` for the requested ``out_features`` (odd sizes round up)."""

    def __init__(self, *, name: str, out_features: Sequence[str] = FEATURE_NAMES, use_checkpoint: bool = False,
                 in_chans: int = 3) -> None:
        super().__init__()
        if name not in EFFICIENTVIT_VARIANTS:
            raise ValueError(f"EfficientViT name {name!r} is not one of {list(EFFICIENTVIT_NAMES)}.")
        unknown = [feature for feature in out_features if feature not in FEATURE_NAMES]
        if unknown or not out_features:
            raise ValueError(f"EfficientViT out_features {list(out_features)} must be among {list(FEATURE_NAMES)}.")
        self.name = name
        self.variant = EFFICIENTVIT_VARIANTS[name]
        self.out_features = [feature for feature in FEATURE_NAMES if feature in out_features]
        if self.variant.family == "b":
            stem, *stages = _b_stages(self.variant, in_chans)
            self.input_stem = stem
            self.stages = nn.ModuleList(stages)
        else:
            self.stages = nn.ModuleList(_l_stages(self.variant, in_chans))
        for level in self.levels:
            level.use_checkpoint = use_checkpoint

    @property
    def levels(self) -> List[OpSequential]:
        """Stem (stride 2) and stages 1-4 (strides 4-32), whatever the family's module layout."""
        stages = list(self.stages)
        return [self.input_stem] + stages if self.variant.family == "b" else stages

    @property
    def out_channels(self) -> Dict[str, int]:
        return {name: self.variant.widths[FEATURE_NAMES.index(name) + 1] for name in self.out_features}

    @property
    def out_strides(self) -> Dict[str, int]:
        return {name: 4 * 2 ** FEATURE_NAMES.index(name) for name in self.out_features}

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        stem, *stages = self.levels
        x = stem(images)
        outputs: Dict[str, torch.Tensor] = {}
        for name, stage in zip(FEATURE_NAMES, stages):
            x = stage(x)
            if name in self.out_features:
                outputs[name] = x
            if name == self.out_features[-1]:
                break
        return outputs
