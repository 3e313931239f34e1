"""UNETR++ (Shaker et al., "UNETR++: Delving into Efficient and Accurate 3D Medical Image
Segmentation"; the LWI paper's hierarchical backbone, paper 003; SPEC §7.5-7.6). Registers ``unetr_pp``.

Layout (defaults; x: [B, C_in, D, H, W] = the planned patch, 64 x 128 x 128 on Synapse)::

    conv block  residual conv block (instance norm) on the input      c: [B, 16, D, H, W]
    stem        Conv3d k = s = (2, 4, 4) -> 32 ch, GroupNorm           [B, 32, D/2, H/4, W/4]
    stage i     3 EPA transformer blocks (blocks/epa.py)               s_i, i = 0..3
    down i      Conv3d k = s = 2 (32 -> 64 -> 128 -> 256), GroupNorm before stages 1-3
    up i        transposed conv 2 of the coarser map, ADD s_{i}, 3 EPA blocks (i = 2, 1, 0)
    last        transposed conv (2, 4, 4) -> 16 ch, ADD c, residual conv block
    outputs     1x1x1 convs (``decoder.seg_layers``): full resolution, and with deep supervision
                also on the up-0 output (D/2, H/4, W/4) and the up-1 output (D/4, H/8, W/8)

Spatial projections P: 64, 64, 64, 32 for encoder stages 0-3, 64 in the decoder; 4 heads.

Encoder levels (``encoder(x)``, highest resolution first): ``[c, s_0, s_1, s_2, s_3]``; every one
has a depth axis that follows the input (D, D/2, D/4, D/8, D/16), so P_dm = 16 along depth.
``s_0..s_3`` are the four hierarchical levels of LWI's order prediction (paper Table VIII's
t1..t4). The decoder is not declared to run on cropped features (its EPA blocks are tied to the
full token grid).

The token count is fixed: position embeddings ([1, N_i, C_i]) and spatial projections (N_i ->
P) are sized for the planned patch (``img_size``; 22.7 M of the 43.0 M parameters at 64 x 128 x
128). The planner writes ``img_size`` into the plans' arch_kwargs, so checkpoints record it, and
another input size is refused with the reason (``check_patch``).

Choices (the UNETR++ code is the reference where its paper is silent; the numbers are config fields):
- GroupNorm groups: C_in after the stem and C_{i-1} after down-sampling i, as the authors' code;
  Assumption: gcd(C_in, dims[0]) for the stem (C_in itself whenever it divides dims[0], e.g. 1 or
  4 channels), so inputs with a channel count that does not divide 32 still build.
- Dropout: 0.15 on both attention maps (``attn_dropout``), Dropout3d 0.1 before each block's
  output 1x1x1 conv (``conv_dropout``); layer scale 1e-6 (``layer_scale``).
- Init (``UNETRpp.initialize``, which nnU-Net applies when it builds the network): truncated
  normal (std 0.02) linear weights, zero biases, unit LayerNorms; zero position embeddings;
  torch's default for the convs.
"""
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnssl.architectures.blocks.conv import to_3tuple
from nnssl.architectures.blocks.epa import EPABlock
from nnssl.architectures.blocks.res_conv import NORMS, ResConvBlock, conv, transposed_conv
from nnssl.architectures.blocks.swin import init_transformer_weights
from nnssl.architectures.spec import EncoderDecoderNetwork, ArchitectureSpec, register_architecture
from nnssl.architectures.ulkanet import config_from_kwargs
from nnssl.architectures.unetr import check_patch
from nnssl.errors import NnsslError

Triple = Tuple[int, int, int]
# Tests and the demo: ~0.2 M parameters at 32^3 (the tiny preset's minimum patch).
TINY = {"dims": [8, 16, 32, 32], "depths": [1, 1, 1, 1], "num_heads": 2, "proj_sizes": [8, 8, 4, 2],
        "decoder_proj_size": 4, "decoder_depth": 1, "feature_size": 4}


def _elements(channels: int, size: Sequence[int]) -> int:
    return int(np.prod([channels, *size], dtype=np.int64))


def required_divisor(stem_stride: Sequence[int], n_stages: int) -> Triple:
    """What each patch axis must be divisible by: the stem stride times 2 per down-sampling."""
    return tuple(int(s) * 2 ** (n_stages - 1) for s in to_3tuple(stem_stride))


@dataclass
class UNETRppConfig:
    """Hyper-parameters (UNETR++ Synapse model); the plans' ``arch_kwargs`` override them."""
    img_size: Triple = (64, 128, 128)  # the planned patch (sets every token count)
    stem_stride: Triple = (2, 4, 4)
    dims: Tuple[int, ...] = (32, 64, 128, 256)
    depths: Tuple[int, ...] = (3, 3, 3, 3)
    proj_sizes: Tuple[int, ...] = (64, 64, 64, 32)  # P per encoder stage
    num_heads: int = 4
    feature_size: int = 16  # channels of the full-resolution conv block
    decoder_depth: int = 3  # EPA blocks per decoder stage
    decoder_proj_size: int = 64
    attn_dropout: float = 0.15
    conv_dropout: float = 0.1
    layer_scale: float = 1e-6
    norm: str = "instance"  # of the full-resolution conv blocks (the EPA blocks' conv blocks use batch norm)

    def __post_init__(self):
        self.img_size, self.stem_stride = to_3tuple(self.img_size), to_3tuple(self.stem_stride)
        self.dims, self.depths = tuple(int(d) for d in self.dims), tuple(int(d) for d in self.depths)
        self.proj_sizes = tuple(int(p) for p in self.proj_sizes)
        n, problems = len(self.dims), []
        if len(self.depths) != n or len(self.proj_sizes) != n or n < 2:
            problems.append(f"dims {self.dims}, depths {self.depths} and proj_sizes {self.proj_sizes} need one entry "
                            f"per stage (at least 2)")
        if any(d % (2 * self.num_heads) for d in self.dims):
            problems.append(f"every dim {self.dims} must be divisible by 2 x num_heads = {2 * self.num_heads}")
        if any(b % a for a, b in zip(self.dims, self.dims[1:])):
            problems.append(f"each dim {self.dims} must divide the next (GroupNorm groups = the previous dim)")
        if any(s % d for s, d in zip(self.img_size, self.divisor)):
            problems.append(f"img_size {self.img_size} must be divisible by {self.divisor} (stem stride "
                            f"{self.stem_stride} times 2^{n - 1})")
        if min(*self.depths, *self.proj_sizes, self.feature_size, self.decoder_depth, self.decoder_proj_size) < 1:
            problems.append("depths, proj_sizes, feature_size, decoder_depth and decoder_proj_size must be >= 1")
        if not (0 <= self.attn_dropout < 1 and 0 <= self.conv_dropout < 1):
            problems.append("attn_dropout and conv_dropout must be in [0, 1)")
        if self.norm not in NORMS:
            problems.append(f"norm '{self.norm}' must be one of {NORMS}")
        if problems:
            raise NnsslError("Invalid UNETR++ arch_kwargs (from the plans file or --set): " + "; ".join(problems)
                             + ". Fix the plans' architecture block or re-run planning.")

    @property
    def divisor(self) -> Triple:
        return required_divisor(self.stem_stride, len(self.dims))

    def grid(self, stage: int) -> Triple:
        """Token grid of stage ``stage`` (0 = after the stem)."""
        return tuple(s // (st * 2 ** stage) for s, st in zip(self.img_size, self.stem_stride))

    def blocks(self, stage: int, depth: int, proj_size: int) -> nn.Sequential:
        return nn.Sequential(*(EPABlock(self.grid(stage), self.dims[stage], proj_size, self.num_heads,
                                        self.attn_dropout, self.conv_dropout, self.layer_scale) for _ in range(depth)))


class UNETRppEncoder(nn.Module):
    """x: [B, C_in, *img_size] -> [c: [B, fs, D, H, W], s_0, ..., s_3: [B, dims[i], *grid(i)]]."""

    def __init__(self, in_channels: int, cfg: UNETRppConfig):
        super().__init__()
        self.cfg = cfg
        self.conv_block = ResConvBlock(in_channels, cfg.feature_size, 3, cfg.norm)
        ins = (in_channels, *cfg.dims[:-1])
        groups = (math.gcd(in_channels, cfg.dims[0]), *cfg.dims[:-1])
        strides = (cfg.stem_stride,) + ((2, 2, 2),) * (len(cfg.dims) - 1)
        self.downsample = nn.ModuleList(nn.Sequential(conv(i, o, s, s), nn.GroupNorm(g, o))
                                        for i, o, g, s in zip(ins, cfg.dims, groups, strides))
        self.stages = nn.ModuleList(cfg.blocks(i, d, p) for i, (d, p) in enumerate(zip(cfg.depths, cfg.proj_sizes)))
        self.output_channels = [cfg.feature_size, *cfg.dims]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        check_patch(x.shape[2:], self.cfg.img_size, "UNETR++", self.cfg.divisor)
        features, h = [self.conv_block(x)], x
        for down, stage in zip(self.downsample, self.stages):
            h = stage(down(h))
            features.append(h)
        return features

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        total = self.conv_block.compute_conv_feature_map_size(patch_size)
        for i, stage in enumerate(self.stages):
            total += _elements(self.cfg.dims[i], self.cfg.grid(i))
            total += sum(b.compute_conv_feature_map_size() for b in stage)
        return total


class UpAddBlock(nn.Module):
    """Transposed conv of the coarser map, addition of the skip, then ``blocks``.
    x: [B, in, *S], skip: [B, out, *S * up] -> [B, out, *S * up]."""

    def __init__(self, in_channels: int, out_channels: int, up: Sequence[int], blocks: nn.Module):
        super().__init__()
        self.transp_conv = transposed_conv(in_channels, out_channels, up)
        self.blocks = blocks

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.transp_conv(x) + skip)


class UNETRppDecoder(nn.Module):
    """[c, s_0, ..., s_3] -> logits [B, num_classes, D, H, W]; with deep supervision a list
    [full resolution, grid(0), grid(1)] (nnU-Net's order, finest first)."""

    def __init__(self, cfg: UNETRppConfig, num_classes: int, deep_supervision: bool):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        n = len(cfg.dims)
        # ups[j] takes stage n-1-j to stage n-2-j; the last one goes to full resolution.
        self.ups = nn.ModuleList(UpAddBlock(cfg.dims[i + 1], cfg.dims[i], (2, 2, 2),
                                            cfg.blocks(i, cfg.decoder_depth, cfg.decoder_proj_size))
                                 for i in range(n - 2, -1, -1))
        self.ups.append(UpAddBlock(cfg.dims[0], cfg.feature_size, cfg.stem_stride,
                                   ResConvBlock(cfg.feature_size, cfg.feature_size, 3, cfg.norm)))
        self.seg_layers = nn.ModuleList(nn.Conv3d(c, num_classes, 1)
                                        for c in (cfg.feature_size, cfg.dims[0], cfg.dims[1]))
        self.deep_supervision = deep_supervision

    def forward(self, features: List[torch.Tensor]):
        x, outs = features[-1], []
        for up, skip in zip(self.ups, features[-2::-1]):
            x = up(x, skip)
            outs.append(x)
        if not self.deep_supervision:
            return self.seg_layers[0](outs[-1])
        return [head(o) for head, o in zip(self.seg_layers, outs[::-1])]

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        cfg, total = self.cfg, 0
        for j, up in enumerate(self.ups[:-1]):
            stage = len(cfg.dims) - 2 - j
            total += _elements(cfg.dims[stage], cfg.grid(stage)) + sum(b.compute_conv_feature_map_size()
                                                                       for b in up.blocks)
        total += _elements(cfg.feature_size, patch_size) + self.ups[-1].blocks.compute_conv_feature_map_size(patch_size)
        return total + _elements(self.num_classes, patch_size)


class UNETRpp(EncoderDecoderNetwork):
    """UNETR++. x: [B, C_in, *img_size] -> [B, num_classes, *img_size] (a list of 3 with deep supervision).

    Memory estimate (``compute_conv_feature_map_size``): elements per sample of token maps, attention matrices
    and conv outputs (nnU-Net's VRAM proxy).
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs):
        super().__init__()
        self.config = config_from_kwargs(UNETRppConfig, arch_kwargs, "UNETR++")
        self.encoder = UNETRppEncoder(input_channels, self.config)
        self.decoder = UNETRppDecoder(self.config, num_classes, deep_supervision)

    # Applied by nnU-Net's get_network_from_plans: truncated normal linears, unit LayerNorms (see above).
    initialize = staticmethod(init_transformer_weights)


def deep_supervision_scales(cfg: UNETRppConfig) -> List[List[float]]:
    """Per-axis scale of each deep-supervision output relative to the input, in output order."""
    return [[1.0] * 3] + [[1.0 / (s * 2 ** i) for s in cfg.stem_stride] for i in (0, 1)]


register_architecture(ArchitectureSpec(
    name="unetr_pp",
    planner="nnssl.planning.unetr_pp.UNETRppPlanner",
    plans_name="nnsslUNETRppPlans",
    trainer="nnsslTrainer_UNETRpp",
    description="UNETR++: efficient paired attention encoder (dims 32-64-128-256) and decoder, patch fixed at "
                "planning",
    presets={"tiny": {"arch_overrides": dict(TINY), "min_patch_size": (32, 32, 32)}},
))
