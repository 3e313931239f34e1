"""PCT-Net: parallel convolution and transformer network (MIS-FM paper, SPEC §7.1).

Layout for the default 5 levels (channels 24, 48, 128, 256, 512), anisotropic embedding::

    level 0  full res        proj 1x3x3 conv -> 2D conv block            (skip 0, 24 ch)
             1x2x2 max-pool
    level 1  1/2 in-plane    3D conv -> 3D conv block                    (skip 1, 48 ch)
             2x2x2 max-pool
    level 2  pyramid 1       3D conv -> PCT block                        (skip 2, 128 ch)
             2x2x2 max-pool
    level 3  pyramid 2       3D conv -> PCT block                        (skip 3, 256 ch)
             2x2x2 max-pool
    level 4  pyramid 3       3D conv -> PCT block                        (bottleneck, 512 ch)

The decoder goes back up: transposed conv (kernel = stride = the pool), concatenation with
the skip, a fusing conv (2C -> C), then a PCT block (pyramid levels) or a conv block (head:
3D at level 1, 2D at level 0). 1x1x1 convs predict at levels 0..3 (full, 1/2, 1/4, 1/8).
A PCT block is a pre-activation conv block (dropout before its second conv) in parallel with
``swin_depth`` Swin blocks (window MSA, then shifted window MSA, shift = window // 2); the
two branch outputs are added. The Swin blocks use dropout, attention dropout and drop-path
0.2 each (``swin_dropout``, ``swin_attn_dropout``, ``swin_drop_path``; the released model).

Pre-activation everywhere (the authors' code): BN -> PReLU comes before every conv except the
input projection (which sees the raw image): the downsampling convs, the transposed conv and
the fuse conv of every decoder level, and each 1x1x1 output head (``seg_layers[i]`` is
BN -> PReLU -> conv, so it is fresh at fine-tuning, its BN included).

Assumptions (the paper and its Fig. 3 text do not fix them):
- Between pyramid levels: 2x2x2 max-pool then a 3x3x3 conv to the next width, the same
  pattern as the embedding's "max-pool, conv -> 128" (the layout, not a number: no field).
- Window attention pads a pyramid feature map up to a multiple of the window and masks the
  padding (see ``blocks/swin.py``; ``swin_mask_padding=False`` lets padded tokens take part, as
  the original Swin code does): the paper's 64x128x128 patch gives 32^3, 16^3, 8^3 pyramid
  maps, which window 6 does not divide.
"""
from dataclasses import dataclass, fields
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from nnssl.architectures.blocks.conv import ConvBlock, PreActConv, same_conv, to_3tuple
from nnssl.architectures.blocks.swin import SwinBlock, init_transformer_weights
from nnssl.architectures.spec import ArchitectureSpec, register_architecture
from nnssl.errors import NnsslError

EMBEDDINGS = ("aniso", "iso")


@dataclass
class PCTNetConfig:
    """Architecture hyper-parameters (paper defaults); the plans' ``arch_kwargs`` override them."""
    channels: Tuple[int, ...] = (24, 48, 128, 256, 512)  # per level; the last 3 form the pyramid
    heads: Tuple[int, ...] = (4, 8, 16)  # per pyramid level
    swin_depth: int = 2  # Swin blocks per PCT block (window MSA, shifted window MSA, ...)
    window_size: Union[int, Tuple[int, int, int]] = 6
    mlp_ratio: float = 4.0
    dropout: Tuple[float, ...] = (0.0, 0.0, 0.2, 0.2, 0.2)  # per level, before a block's 2nd conv
    # Swin branch regularization of the released model: dropout after its linear layers, on the
    # attention weights, and drop-path on both residual branches, the same rate in every block.
    swin_dropout: float = 0.2
    swin_attn_dropout: float = 0.2
    swin_drop_path: float = 0.2
    swin_mask_padding: bool = True  # Assumption: padded window tokens are masked out as keys (blocks/swin.py)
    embedding: str = "aniso"  # "aniso": 2D (1x3x3) level 0 and 1x2x2 first pool; "iso": all 3D
    # Assumption: convs get He init for a PReLU of this negative slope (PReLU's start value 0.25);
    # the paper does not say how it initializes.
    init_prelu_slope: float = 0.25

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.heads = tuple(int(h) for h in self.heads)
        self.dropout = tuple(float(p) for p in self.dropout)
        self.window_size = to_3tuple(self.window_size)
        n_pyr = len(self.channels) - 2
        problems = []
        if n_pyr < 1:
            problems.append(f"channels {self.channels} needs at least 3 levels (2 embedding + 1 pyramid)")
        if len(self.heads) != n_pyr:
            problems.append(f"heads {self.heads} needs one entry per pyramid level ({n_pyr})")
        elif any(c % h for c, h in zip(self.channels[2:], self.heads)):
            problems.append(f"pyramid channels {self.channels[2:]} must be divisible by heads {self.heads}")
        if len(self.dropout) != len(self.channels):
            problems.append(f"dropout {self.dropout} needs one entry per level ({len(self.channels)})")
        if self.embedding not in EMBEDDINGS:
            problems.append(f"embedding '{self.embedding}' must be one of {EMBEDDINGS}")
        if not all(0 <= p < 1 for p in (*self.dropout, self.swin_dropout, self.swin_attn_dropout,
                                        self.swin_drop_path)):
            problems.append("dropout, swin_dropout, swin_attn_dropout and swin_drop_path must be in [0, 1)")
        if problems:
            raise NnsslError("Invalid PCT-Net arch_kwargs (from the plans file or --set): "
                             + "; ".join(problems) + ". Fix the 'arch_kwargs' of the plans' "
                             "architecture block or re-run planning.")

    @property
    def first_pool(self) -> Tuple[int, int, int]:
        return (1, 2, 2) if self.embedding == "aniso" else (2, 2, 2)

    @property
    def level0_kernel(self) -> Tuple[int, int, int]:
        return (1, 3, 3) if self.embedding == "aniso" else (3, 3, 3)

    @property
    def pools(self) -> List[Tuple[int, int, int]]:
        """Pool between level i-1 and level i (index 0 is (1, 1, 1): the input level)."""
        return [(1, 1, 1), self.first_pool] + [(2, 2, 2)] * (len(self.channels) - 2)


def required_divisor(embedding: str = "aniso", n_pyramid_levels: int = 3) -> Tuple[int, int, int]:
    """What each patch axis must be divisible by so every pooling is exact.

    aniso: (2^n, 2^(n+1), 2^(n+1)) -> (8, 16, 16) for the paper's 3 pyramid levels;
    iso: 2^(n+1) on every axis -> (16, 16, 16). The window size imposes nothing (padding).
    """
    first = (1, 2, 2) if embedding == "aniso" else (2, 2, 2)
    return tuple(f * 2 ** n_pyramid_levels for f in first)


def _scaled(size: Sequence[int], pool: Sequence[int]) -> Tuple[int, ...]:
    return tuple(s // p for s, p in zip(size, pool))


def _conv_size(channels: int, size: Sequence[int]) -> int:
    return int(np.prod([channels, *size], dtype=np.int64))


class PreActUp(nn.Module):
    """BN(in) -> PReLU -> ConvTranspose3d(in -> out, kernel = stride = ``pool``).

    x: [B, in, D, H, W] -> [B, out, D·pd, H·ph, W·pw]. The transposed-conv twin of PreActConv.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: Sequence[int]):
        super().__init__()
        self.norm = nn.BatchNorm3d(in_channels)
        self.act = nn.PReLU()
        self.conv = nn.ConvTranspose3d(in_channels, out_channels, tuple(pool), stride=tuple(pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


class PCTBlock(nn.Module):
    """Conv branch + Swin branch, outputs added. x: [B, C, D, H, W] -> same shape.

    ``swin_drop``, ``swin_attn_drop``, ``swin_drop_path``: the Swin blocks' dropout (after the
    linear layers), attention dropout and drop-path rates."""

    def __init__(self, channels: int, heads: int, window: Tuple[int, int, int], depth: int = 2,
                 dropout: float = 0.0, mlp_ratio: float = 4.0, swin_drop: float = 0.0,
                 swin_attn_drop: float = 0.0, swin_drop_path: float = 0.0, mask_padding: bool = True):
        super().__init__()
        self.conv = ConvBlock(channels, channels, 3, dropout)
        shift = tuple(w // 2 for w in window)
        self.swin = nn.ModuleList(
            SwinBlock(channels, heads, window, shift if i % 2 else (0, 0, 0), mlp_ratio, drop=swin_drop,
                      attn_drop=swin_attn_drop, drop_path=swin_drop_path, mask_padding=mask_padding)
            for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 4, 1)  # channels-last tokens [B, D, H, W, C]
        for block in self.swin:
            t = block(t)
        return self.conv(x) + t.permute(0, 4, 1, 2, 3)

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        return (self.conv.compute_conv_feature_map_size(size)
                + sum(b.compute_conv_feature_map_size(size) for b in self.swin))


def _pct_block(cfg: PCTNetConfig, level: int) -> PCTBlock:
    """The PCT block of pyramid ``level`` (2 .. n-1) as configured."""
    return PCTBlock(cfg.channels[level], cfg.heads[level - 2], cfg.window_size, cfg.swin_depth, cfg.dropout[level],
                    cfg.mlp_ratio, cfg.swin_dropout, cfg.swin_attn_dropout, cfg.swin_drop_path, cfg.swin_mask_padding)


class PCTEncoder(nn.Module):
    """Embedding + pyramid encoder. x: [B, C_in, D, H, W] -> skips [level 0, ..., bottleneck].

    Skip i has ``output_channels[i]`` channels and is downsampled by ``strides[i]`` relative
    to skip i-1 (``strides[0]`` relative to the input), as in dynamic_network_architectures.
    """

    def __init__(self, input_channels: int, cfg: PCTNetConfig):
        super().__init__()
        c = cfg.channels
        self.output_channels = list(c)
        self.strides = cfg.pools
        self.pools = nn.ModuleList(nn.MaxPool3d(p) for p in cfg.pools[1:])
        # Level 0: 2D (or 3D) projection (a plain conv: it sees the raw image) + conv block;
        # level 1: pre-activated conv + 3D conv block.
        self.stem = nn.ModuleList([same_conv(input_channels, c[0], cfg.level0_kernel), PreActConv(c[0], c[1], 3)])
        self.stem_blocks = nn.ModuleList([ConvBlock(c[0], c[0], cfg.level0_kernel, cfg.dropout[0]),
                                          ConvBlock(c[1], c[1], 3, cfg.dropout[1])])
        self.down = nn.ModuleList(PreActConv(c[i - 1], c[i], 3) for i in range(2, len(c)))
        self.stages = nn.ModuleList(_pct_block(cfg, i) for i in range(2, len(c)))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        skips = []
        for level in range(len(self.output_channels)):
            if level > 0:
                x = self.pools[level - 1](x)
            if level < 2:
                x = self.stem_blocks[level](self.stem[level](x))
            else:
                x = self.stages[level - 2](self.down[level - 2](x))
            skips.append(x)
        return skips

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        total, size = 0, tuple(patch_size)
        for level, ch in enumerate(self.output_channels):
            size = _scaled(size, self.strides[level])
            if level < 2:
                total += _conv_size(ch, size) + self.stem_blocks[level].compute_conv_feature_map_size(size)
            else:
                total += _conv_size(ch, size) + self.stages[level - 2].compute_conv_feature_map_size(size)
        return total


class PCTDecoder(nn.Module):
    """Pyramid decoder + prediction head. skips -> logits [full, 1/2, 1/4, 1/8] or full only.

    Decoder level i (0 .. n_levels-2): up from level i+1, concat skip i, fuse conv, block.
    ``seg_layers[i]`` predicts at level i.
    """

    def __init__(self, cfg: PCTNetConfig, num_classes: int, deep_supervision: bool):
        super().__init__()
        c = cfg.channels
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        self.channels = list(c)
        self.strides = cfg.pools
        n = len(c) - 1  # decoder levels 0 .. n-1
        self.up = nn.ModuleList(PreActUp(c[i + 1], c[i], cfg.pools[i + 1]) for i in range(n))
        self.fuse = nn.ModuleList(
            PreActConv(2 * c[i], c[i], cfg.level0_kernel if i == 0 else 3) for i in range(n))
        blocks = [ConvBlock(c[0], c[0], cfg.level0_kernel, cfg.dropout[0]), ConvBlock(c[1], c[1], 3, cfg.dropout[1])]
        blocks += [_pct_block(cfg, i) for i in range(2, n)]
        self.blocks = nn.ModuleList(blocks)
        self.seg_layers = nn.ModuleList(PreActConv(c[i], num_classes, 1) for i in range(n))

    def forward(self, skips: List[torch.Tensor]):
        x = skips[-1]
        outputs = []
        for i in reversed(range(len(self.blocks))):
            x = self.up[i](x)
            x = self.blocks[i](self.fuse[i](torch.cat([x, skips[i]], dim=1)))
            if self.deep_supervision or i == 0:
                outputs.append(self.seg_layers[i](x))
        outputs = outputs[::-1]  # nnU-Net order: highest resolution first
        return outputs if self.deep_supervision else outputs[0]

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        sizes, size = [], tuple(patch_size)
        for pool in self.strides:
            size = _scaled(size, pool)
            sizes.append(size)
        total = 0
        for i in range(len(self.blocks)):
            # transposed conv output, fuse conv output, block, segmentation output
            total += 2 * _conv_size(self.channels[i], sizes[i])
            total += self.blocks[i].compute_conv_feature_map_size(sizes[i])
            if self.deep_supervision or i == 0:
                total += _conv_size(self.num_classes, sizes[i])
        return total


class PCTNet(nn.Module):
    """PCT-Net. x: [B, C_in, D, H, W] (D: the thick-slice axis) -> [B, num_classes, D, H, W],
    or with deep supervision a list at full, 1/2, 1/4, 1/8 resolution (highest first)."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = True, **arch_kwargs):
        super().__init__()
        known = {f.name for f in fields(PCTNetConfig)}
        unknown = sorted(set(arch_kwargs) - known)
        if unknown:
            raise NnsslError(f"Unknown PCT-Net arch_kwargs {unknown} (from the plans file or --set). "
                             f"Allowed: {sorted(known)}; fix the plans' architecture block or re-run planning.")
        self.config = PCTNetConfig(**arch_kwargs)
        self.encoder = PCTEncoder(input_channels, self.config)
        self.decoder = PCTDecoder(self.config, num_classes, deep_supervision)

    @property
    def divisor(self) -> Tuple[int, int, int]:
        return required_divisor(self.config.embedding, len(self.config.channels) - 2)

    def forward(self, x: torch.Tensor):
        bad = [s for s, d in zip(x.shape[2:], self.divisor) if s % d]
        if bad:
            raise NnsslError(f"PCT-Net input of spatial shape {tuple(x.shape[2:])} is not divisible by "
                             f"{self.divisor} (embedding '{self.config.embedding}'). Use a patch size "
                             "that is (the nnssl PCT-Net planner picks one).")
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        """Activation elements stored for one sample (conv/linear outputs and attention maps)."""
        return (self.encoder.compute_conv_feature_map_size(patch_size)
                + self.decoder.compute_conv_feature_map_size(patch_size))

    def initialize(self, module: nn.Module) -> None:
        """Applied to every module by nnU-Net's get_network_from_plans (``net.apply(net.initialize)``)."""
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, a=self.config.init_prelu_slope)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            init_transformer_weights(module)


register_architecture(ArchitectureSpec(
    name="pct_net",
    planner="nnssl.planning.pct_net.PCTNetPlanner",
    plans_name="nnsslPCTNetPlans",
    trainer="nnsslTrainer_PCTNet",
    description="PCT-Net (MIS-FM): conv embedding + 3-level parallel conv/Swin pyramid, deep supervision",
    presets={"tiny": {"arch_overrides": {"channels": (4, 8, 16, 16, 32), "heads": (1, 2, 2), "window_size": 4}}},
))
