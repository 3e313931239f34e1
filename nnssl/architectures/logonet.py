"""LoGoNet: local + global dual encoding with ULKANets (Masked LoGoNet paper §3.2, appendix 8;
SPEC §7.2). Registers ``logonet`` and ``logonet_large``.

x: [B, C_in, D, H, W]::

    global branch: ULKANet encoder + feature decoder on x              -> g: [B, W, D, H, W]
    local branch:  split_2x2x2(x) -> 8 cubes [B, C_in, D/2, H/2, W/2]; cube k goes through its
                   own ULKANet with the first ``local_blocks`` (= 2) encoder blocks and its
                   decoder; merge_2x2x2 puts the 8 outputs back in place  -> l: [B, W, D, H, W]
    fusion:        Conv3d(W -> W) -> BatchNorm3d -> GELU on g + l, then the 1x1x1 classifier
                   (``decoder.seg_layers[0]``)                          -> [B, num_classes, D, H, W]

Network interface: ``encoder`` holds the global and the 8 local encoders (so encoder-only
transfer covers both branches); ``decoder`` holds the 9 feature decoders, the fusion and the
classifier.

Patch constraint: each axis divisible by the global total stride (32 by default) and by twice
the local total stride (2 x 8), i.e. by lcm(32, 16) = 32 (``required_divisor``).

Assumptions (the paper does not fix them; config fields where they are hyper-parameters):
- Everything listed in ``ulkanet.py`` (patch embeddings, decoder widths, upsampling, init).
- The local ULKANets use the first ``local_blocks`` entries of ``dims``, ``depths``,
  ``mlp_ratios``, ``patch_kernels``, ``strides`` (the paper only says "two encoder blocks").
- The local decoders follow the halving rule but end at the global decoder's output width, since
  the two branch outputs must have the same shape to be summed (``local_decoder_dims``
  overrides them).
- The fusion conv is 3^3 (``fusion_kernel``), keeps the width and has no bias (BN follows).
- The split is into halves along each axis (N = 8 sub-volumes of B^3 voxels for a cube patch),
  with the cube order of :func:`split_2x2x2`.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import math
import torch
from torch import nn

from nnssl.architectures.spec import ArchitectureSpec, register_architecture
from nnssl.architectures.ulkanet import (TINY, VARIANTS, FeatureDecoder, ULKAEncoder, ULKANetConfig, config_from_kwargs,
                                         he_initialize)
from nnssl.errors import NnsslError

N_LOCAL = 8  # 2 x 2 x 2 sub-volumes


def split_2x2x2(x: torch.Tensor) -> List[torch.Tensor]:
    """x: [B, C, D, H, W] (even D, H, W) -> 8 views [B, C, D/2, H/2, W/2], index 4*i + 2*j + k
    for the half i along D, j along H, k along W."""
    d, h, w = (s // 2 for s in x.shape[2:])
    return [x[:, :, i * d:(i + 1) * d, j * h:(j + 1) * h, k * w:(k + 1) * w]
            for i in range(2) for j in range(2) for k in range(2)]


def merge_2x2x2(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`split_2x2x2`: 8 tensors [B, C, d, h, w] -> [B, C, 2d, 2h, 2w]."""
    if len(parts) != N_LOCAL:
        raise ValueError(f"merge_2x2x2 needs 8 parts, got {len(parts)}")
    rows = [torch.cat([parts[4 * i + 2 * j], parts[4 * i + 2 * j + 1]], dim=4) for i in range(2) for j in range(2)]
    slabs = [torch.cat([rows[2 * i], rows[2 * i + 1]], dim=3) for i in range(2)]
    return torch.cat(slabs, dim=2)


@dataclass
class LoGoNetConfig(ULKANetConfig):
    """ULKANet hyper-parameters of the global branch plus the local-branch fields."""
    local_blocks: int = 2  # encoder blocks of each local ULKANet (paper, appendix 8)
    local_decoder_dims: Optional[Tuple[int, ...]] = None  # None: halving rule ending at the global width
    fusion_kernel: int = 3  # Assumption

    def __post_init__(self):
        super().__post_init__()
        problems = []
        if not 1 <= self.local_blocks <= len(self.dims):
            problems.append(f"local_blocks {self.local_blocks} must be between 1 and the {len(self.dims)} encoder blocks")
        if self.fusion_kernel % 2 == 0:
            problems.append(f"fusion_kernel {self.fusion_kernel} must be odd")
        if self.local_decoder_dims is not None:
            self.local_decoder_dims = tuple(int(d) for d in self.local_decoder_dims)
        if problems:
            raise NnsslError("Invalid LoGoNet arch_kwargs (from the plans file or --set): " + "; ".join(problems)
                             + ". Fix the 'arch_kwargs' of the plans' architecture block or re-run planning.")
        width = self.decoder_widths()[-1]
        if self.local_decoder_dims is not None and (len(self.local_decoder_dims) != self.local_blocks + 1
                                                    or self.local_decoder_dims[-1] != width):
            raise NnsslError(f"Invalid LoGoNet arch_kwargs: local_decoder_dims {self.local_decoder_dims} needs "
                             f"{self.local_blocks + 1} entries ending with the global decoder's width {width} (the "
                             "branch outputs are summed). Fix the plans' arch_kwargs or re-run planning.")

    def local_config(self) -> ULKANetConfig:
        n = self.local_blocks
        return ULKANetConfig(dims=self.dims[:n], depths=self.depths[:n], mlp_ratios=self.mlp_ratios[:n],
                             patch_kernels=self.patch_kernels[:n], strides=self.strides[:n],
                             lka_kernel=self.lka_kernel, lka_dilated_kernel=self.lka_dilated_kernel,
                             lka_dilation=self.lka_dilation, attn_projections=self.attn_projections,
                             lka_residual=self.lka_residual, decoder_dims=self.local_decoder_dims,
                             decoder_kernel=self.decoder_kernel, decoder_negative_slope=self.decoder_negative_slope,
                             upsample_mode=self.upsample_mode)


def required_divisor(cfg: LoGoNetConfig) -> Tuple[int, int, int]:
    """Per axis: lcm(global total stride, 2 x local total stride)."""
    return tuple(math.lcm(g, 2 * l) for g, l in zip(cfg.total_stride, cfg.local_config().total_stride))


class LoGoFeatures(list):
    """What :class:`LoGoEncoder` returns: the global ULKANet's per-level features (a list, highest
    resolution first, as every nnssl encoder returns, so SSL methods read levels and bottleneck the
    same way on every network) carrying the 8 local encoders' feature lists in ``local``."""

    def __init__(self, global_skips: List[torch.Tensor], local: List[List[torch.Tensor]]):
        super().__init__(global_skips)
        self.local = local


class LoGoEncoder(nn.Module):
    """x: [B, C_in, D, H, W] -> :class:`LoGoFeatures` (global skips; ``.local``: skips of cube k, k in 0..7)."""

    def __init__(self, input_channels: int, cfg: LoGoNetConfig):
        super().__init__()
        self.global_encoder = ULKAEncoder(input_channels, cfg)
        self.local_encoders = nn.ModuleList(ULKAEncoder(input_channels, cfg.local_config()) for _ in range(N_LOCAL))

    def forward(self, x: torch.Tensor):
        cubes = split_2x2x2(x)
        return LoGoFeatures(self.global_encoder(x), [enc(c) for enc, c in zip(self.local_encoders, cubes)])

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        half = tuple(p // 2 for p in patch_size)
        return (self.global_encoder.compute_conv_feature_map_size(patch_size)
                + sum(e.compute_conv_feature_map_size(half) for e in self.local_encoders))


class LoGoDecoder(nn.Module):
    """:class:`LoGoFeatures` -> fusion -> classifier: [B, num_classes, D, H, W]."""

    def __init__(self, cfg: LoGoNetConfig, num_classes: int, deep_supervision: bool):
        super().__init__()
        self.global_decoder = FeatureDecoder(cfg)
        width = self.global_decoder.out_channels
        self.local_decoders = nn.ModuleList(FeatureDecoder(cfg.local_config(), final_width=width)
                                            for _ in range(N_LOCAL))
        k = cfg.fusion_kernel
        self.fusion = nn.Sequential(nn.Conv3d(width, width, k, padding=k // 2, bias=False), nn.BatchNorm3d(width),
                                    nn.GELU())
        self.seg_layers = nn.ModuleList([nn.Conv3d(width, num_classes, 1)])
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes

    def features(self, skips: LoGoFeatures) -> torch.Tensor:
        g = self.global_decoder(list(skips))
        local = merge_2x2x2([dec(s) for dec, s in zip(self.local_decoders, skips.local)])
        return self.fusion(g + local)

    def forward(self, skips: LoGoFeatures):
        y = self.seg_layers[0](self.features(skips))
        return [y] if self.deep_supervision else y  # single scale, like ULKANet

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        half = tuple(p // 2 for p in patch_size)
        voxels = math.prod(patch_size)
        return (self.global_decoder.compute_conv_feature_map_size(patch_size)
                + sum(d.compute_conv_feature_map_size(half) for d in self.local_decoders)
                + (self.global_decoder.out_channels + self.num_classes) * voxels)


class LoGoNet(nn.Module):
    """LoGoNet. x: [B, C_in, D, H, W] (each axis divisible by ``divisor``) -> [B, num_classes, D, H, W]
    (a one-element list of it with deep supervision)."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs):
        super().__init__()
        self.config = config_from_kwargs(LoGoNetConfig, arch_kwargs, "LoGoNet")
        self.divisor = required_divisor(self.config)
        self.encoder = LoGoEncoder(input_channels, self.config)
        self.decoder = LoGoDecoder(self.config, num_classes, deep_supervision)

    def _check(self, x: torch.Tensor) -> None:
        bad = [s for s, d in zip(x.shape[2:], self.divisor) if s % d]
        if bad:
            raise NnsslError(
                f"LoGoNet input of spatial shape {tuple(x.shape[2:])} is not divisible by {self.divisor}: the global "
                f"ULKANet needs multiples of its total stride {self.config.total_stride}, and the 2x2x2 split gives "
                f"each local ULKANet half the patch, which must be a multiple of its total stride "
                f"{self.config.local_config().total_stride}. Use a patch size divisible by {self.divisor} (the nnssl "
                "LoGoNet planner picks one).")

    def forward(self, x: torch.Tensor):
        self._check(x)
        return self.decoder(self.encoder(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The fused map before the classifier: [B, decoder width, D, H, W] (for SSL heads)."""
        self._check(x)
        return self.decoder.features(self.encoder(x))

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        """Elements per sample of every conv output, LKA product and upsampled map (nnU-Net's VRAM proxy)."""
        return (self.encoder.compute_conv_feature_map_size(patch_size)
                + self.decoder.compute_conv_feature_map_size(patch_size))

    initialize = staticmethod(he_initialize)


for _name, _variant, _planner, _plans in (("logonet", "normal", "LoGoNetPlanner", "nnsslLoGoNetPlans"),
                                          ("logonet_large", "large", "LoGoNetLargePlanner", "nnsslLoGoNetLargePlans")):
    register_architecture(ArchitectureSpec(
        name=_name,
        planner=f"nnssl.planning.ulkanet.{_planner}",
        plans_name=_plans,
        trainer="nnsslTrainer_LoGoNet",
        description=f"LoGoNet ({_variant}, Masked LoGoNet paper): global ULKANet + 8 local 2-block ULKANets on a "
                    f"2x2x2 split, fused by conv-BN-GELU (dims {VARIANTS[_variant]['dims']})",
        presets={"tiny": {"arch_overrides": dict(TINY)}},
    ))
