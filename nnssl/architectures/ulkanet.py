"""ULKANet: U-shaped network with a 3D large-kernel-attention encoder (Masked LoGoNet paper §3.1,
appendix 7-8, Table 9; SPEC §7.2). Registers ``ulkanet`` and ``ulkanet_large``.

Layout (defaults: 4 encoder blocks, strides 4, 2, 2, 2; x: [B, C_in, D, H, W])::

    encoder block i:  patch embedding (Conv3d kernel k_i, stride s_i, padding k_i//2 -> BN)
                      -> L_i LKA modules (blocks/lka.py) -> LayerNorm over channels   => e_i
                      e_0 .. e_3 at 1/4, 1/8, 1/16, 1/32 with dims[i] channels
    decoder block j:  3 x (Conv3d 3^3 -> BN -> LeakyReLU), then x2 upsampling
        j = 0 (bottleneck):  e_3                         1/32 -> 1/16
        j = 1, 2, 3:         cat(previous, e_{3-j})      1/16 -> 1/8 -> 1/4 -> 1/2
        j = 4:               previous (no encoder map at 1/2)   1/2 -> 1/1
    classifier:       1x1x1 conv in ``decoder.seg_layers``

So the decoder has one block per encoder block plus one at the bottleneck, and its five x2
upsamplings undo the total stride 32 exactly.

Assumptions (the paper does not fix them; each is a config field):
- Patch embedding kernel / stride 7 / 4 for the first block and 3 / 2 for the others
  (``patch_kernels``, ``strides``): VAN's overlapping patch embedding, which the LKA design
  comes from, and the only choice under which the paper's 5 x2 decoder upsamplings restore the
  input size. Entries may be ints or per-axis triples.
- Decoder widths (``decoder_dims``): each block outputs half of its input channels
  (e.g. 512 -> 256, 256+256 -> 256, 256+128 -> 192, 192+64 -> 128, 128 -> 64 for the normal
  variant). This rule puts ULKANet / LoGoNet and their large variants 2.6-4.0 % above the
  paper's parameter counts and within 16 % of its FLOPs (Table 10, read as multiply-adds;
  ``benchmarks/bench_logonet.py``).
- Decoder convs 3^3 (``decoder_kernel``), no bias before BN, LeakyReLU slope 0.01 (torch's and
  MONAI's default; ``decoder_negative_slope``); upsampling is parameter-free trilinear interpolation (``upsample_mode``).
- The first stride (4) is split over the last two decoder blocks (x2 each); for a first stride
  s the last two blocks upsample by 2 and s/2 (by 1 where s is odd).
- LKA details: see ``blocks/lka.py`` (``lka_kernel``, ``lka_dilated_kernel``, ``lka_dilation``,
  ``attn_projections``, ``lka_residual``).
- No deep supervision (the paper trains with one Dice+CE output): with
  ``deep_supervision=True`` the forward returns a one-element list.
- Weight init: He-normal convs (nnU-Net's ``InitWeights_He(1e-2)``), torch defaults for norms.
"""
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnssl.architectures.blocks.conv import to_3tuple
from nnssl.architectures.blocks.lka import RESIDUALS, LKABlock3d
from nnssl.architectures.spec import ArchitectureSpec, register_architecture
from nnssl.errors import NnsslError

Triple = Tuple[int, int, int]
UPSAMPLE_MODES = ("trilinear", "nearest")
# Table 9 of the paper: LKA modules per block, embedding dims, MLP ratios.
VARIANTS: Dict[str, Dict[str, tuple]] = {
    "normal": {"dims": (64, 128, 256, 512), "depths": (3, 4, 6, 3), "mlp_ratios": (8, 8, 4, 4)},
    "large": {"dims": (96, 192, 384, 768), "depths": (3, 3, 24, 3), "mlp_ratios": (8, 8, 4, 4)},
}
# For tests and the demo: well under 1 M parameters, same topology (total stride 32).
TINY = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "mlp_ratios": (2, 2, 2, 2),
        "lka_kernel": 3, "lka_dilated_kernel": 3, "lka_dilation": 2}


@dataclass
class ULKANetConfig:
    """Architecture hyper-parameters (paper's normal variant); the plans' ``arch_kwargs`` override them."""
    dims: Tuple[int, ...] = VARIANTS["normal"]["dims"]
    depths: Tuple[int, ...] = VARIANTS["normal"]["depths"]
    mlp_ratios: Tuple[float, ...] = VARIANTS["normal"]["mlp_ratios"]
    patch_kernels: Tuple = (7, 3, 3, 3)  # Assumption: VAN's patch embedding
    strides: Tuple = (4, 2, 2, 2)  # Assumption: VAN's patch embedding
    lka_kernel: int = 5  # Assumption: common 3D LKA choice
    lka_dilated_kernel: int = 7
    lka_dilation: int = 3
    attn_projections: bool = True  # Assumption: VAN's 1x1x1 projections around the LKA
    lka_residual: str = "pre_norm"  # Assumption: x + Attn(BN(x)) (SPEC); "normed_input": BN(x) + Attn(BN(x))
    decoder_dims: Optional[Tuple[int, ...]] = None  # None: each block halves its input width
    decoder_kernel: int = 3  # Assumption
    decoder_negative_slope: float = 0.01  # Assumption: the decoder LeakyReLU's slope (torch's / MONAI's default)
    upsample_mode: str = "trilinear"  # Assumption

    def __post_init__(self):
        n = len(self.dims)
        self.dims = tuple(int(d) for d in self.dims)
        self.depths = tuple(int(d) for d in self.depths)
        self.mlp_ratios = tuple(float(r) for r in self.mlp_ratios)
        problems = []
        try:
            self.patch_kernels = tuple(to_3tuple(k) for k in self.patch_kernels)
            self.strides = tuple(to_3tuple(s) for s in self.strides)
        except (TypeError, ValueError) as e:
            problems.append(f"patch_kernels/strides entries must be ints or 3 ints ({e})")
        if n < 1:
            problems.append("dims needs at least one encoder block")
        for name in ("depths", "mlp_ratios", "patch_kernels", "strides"):
            if len(getattr(self, name)) != n:
                problems.append(f"{name} {getattr(self, name)} needs one entry per encoder block ({n}, from dims)")
        if not problems:
            if any(k % 2 == 0 or k < 1 for kk in self.patch_kernels for k in kk):
                problems.append(f"patch_kernels {self.patch_kernels} must be odd (padding k//2 keeps size/stride)")
            if any(s < 1 for ss in self.strides for s in ss):
                problems.append(f"strides {self.strides} must be >= 1")
        if any(v < 1 for v in (*self.dims, *self.depths)) or any(r <= 0 for r in self.mlp_ratios):
            problems.append("dims and depths must be >= 1, mlp_ratios > 0")
        if self.lka_kernel % 2 == 0 or self.lka_dilated_kernel % 2 == 0 or self.lka_dilation < 1:
            problems.append("lka_kernel and lka_dilated_kernel must be odd, lka_dilation >= 1")
        if self.decoder_kernel % 2 == 0:
            problems.append(f"decoder_kernel {self.decoder_kernel} must be odd")
        if self.lka_residual not in RESIDUALS:
            problems.append(f"lka_residual '{self.lka_residual}' must be one of {RESIDUALS}")
        if self.decoder_dims is not None:
            self.decoder_dims = tuple(int(d) for d in self.decoder_dims)
            if len(self.decoder_dims) != n + 1:
                problems.append(f"decoder_dims {self.decoder_dims} needs {n + 1} entries (one per decoder block)")
        if self.upsample_mode not in UPSAMPLE_MODES:
            problems.append(f"upsample_mode '{self.upsample_mode}' must be one of {UPSAMPLE_MODES}")
        if problems:
            raise NnsslError("Invalid ULKANet/LoGoNet arch_kwargs (from the plans file or --set): " + "; ".join(problems)
                             + ". Fix the 'arch_kwargs' of the plans' architecture block or re-run planning.")

    @property
    def total_stride(self) -> Triple:
        """What each patch axis must be divisible by."""
        return tuple(int(v) for v in np.prod(np.array(self.strides), axis=0))

    @property
    def up_factors(self) -> List[Triple]:
        """Upsampling of decoder blocks 0 (bottleneck) .. n: strides n-1 .. 1, then the first stride split in two."""
        first = self.strides[0]
        a = tuple(2 if s % 2 == 0 else 1 for s in first)
        return list(self.strides[:0:-1]) + [a, tuple(s // f for s, f in zip(first, a))]

    def decoder_widths(self, final: Optional[int] = None) -> List[int]:
        """Output channels of decoder blocks 0 .. n; ``final`` overrides the last one."""
        if self.decoder_dims is not None:
            widths = list(self.decoder_dims)
        else:
            widths, c_in = [], self.dims[-1]
            for j in range(len(self.dims) + 1):
                widths.append(max(1, c_in // 2))
                skip = len(self.dims) - 2 - j  # encoder map concatenated to the next block's input
                c_in = widths[-1] + (self.dims[skip] if skip >= 0 else 0)
        if final is not None:
            widths[-1] = int(final)
        return widths


def config_from_kwargs(cls, arch_kwargs: dict, what: str):
    """Build a config dataclass, naming unknown kwargs in an :class:`NnsslError`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(arch_kwargs) - known)
    if unknown:
        raise NnsslError(f"Unknown {what} arch_kwargs {unknown} (from the plans file or --set). Allowed: "
                         f"{sorted(known)}; fix the plans' architecture block or re-run planning.")
    return cls(**arch_kwargs)


def config_to_kwargs(cfg) -> dict:
    """JSON-friendly arch_kwargs (lists, not tuples), as nnU-Net reads them back from the plans."""
    def plain(v):
        return [plain(i) for i in v] if isinstance(v, (tuple, list)) else v
    return {k: plain(v) for k, v in asdict(cfg).items()}


def check_divisible(shape: Sequence[int], divisor: Sequence[int], what: str) -> None:
    bad = [s for s, d in zip(shape, divisor) if s % d]
    if bad:
        raise NnsslError(f"{what} input of spatial shape {tuple(shape)} is not divisible by {tuple(divisor)} "
                         "(the product of the patch-embedding strides). Use a patch size that is (the nnssl "
                         "planner for this architecture picks one).")


def _elements(channels: int, size: Sequence[int]) -> int:
    return int(np.prod([channels, *size], dtype=np.int64))


class LayerNormChannels3d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map. x: [B, C, D, H, W] -> same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class EncoderBlock(nn.Module):
    """Patch embedding (Algorithm 1: conv k/s, padding k//2 -> BN) -> LKA modules -> LayerNorm.

    x: [B, C_in, D, H, W] -> [B, dim, D/s, H/s, W/s].
    """

    def __init__(self, in_channels: int, dim: int, depth: int, mlp_ratio: float, kernel: Triple, stride: Triple,
                 cfg: ULKANetConfig):
        super().__init__()
        # No conv bias: the BatchNorm right after removes it.
        self.embed = nn.Sequential(
            nn.Conv3d(in_channels, dim, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=False),
            nn.BatchNorm3d(dim))
        self.blocks = nn.ModuleList(
            LKABlock3d(dim, mlp_ratio, cfg.lka_kernel, cfg.lka_dilated_kernel, cfg.lka_dilation, cfg.attn_projections,
                       cfg.lka_residual)
            for _ in range(depth))
        self.norm = LayerNormChannels3d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        """``size``: this block's output size."""
        dim = self.norm.normalized_shape[0]
        return _elements(dim, size) + sum(b.compute_conv_feature_map_size(size) for b in self.blocks)


class ULKAEncoder(nn.Module):
    """x: [B, C_in, D, H, W] -> [e_0, ..., e_{n-1}], e_i: [B, dims[i], *(size / cumulative stride i)]."""

    def __init__(self, input_channels: int, cfg: ULKANetConfig):
        super().__init__()
        self.output_channels = list(cfg.dims)
        self.strides = list(cfg.strides)  # relative to the previous map, as in dynamic_network_architectures
        ins = [input_channels, *cfg.dims[:-1]]
        self.stages = nn.ModuleList(
            EncoderBlock(c_in, d, n, r, k, s, cfg)
            for c_in, d, n, r, k, s in zip(ins, cfg.dims, cfg.depths, cfg.mlp_ratios, cfg.patch_kernels, cfg.strides))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        total, size = 0, tuple(patch_size)
        for stage, stride in zip(self.stages, self.strides):
            size = tuple(p // s for p, s in zip(size, stride))
            total += stage.compute_conv_feature_map_size(size)
        return total


class DecoderBlock(nn.Module):
    """3 x (Conv3d -> BN -> LeakyReLU), then upsampling by ``up``. x: [B, c_in, *S] -> [B, c_out, *(S * up)]."""

    def __init__(self, c_in: int, c_out: int, kernel: int, up: Triple, mode: str, negative_slope: float = 0.01):
        super().__init__()
        layers = []
        for i in range(3):
            layers += [nn.Conv3d(c_in if i == 0 else c_out, c_out, kernel, padding=kernel // 2, bias=False),
                       nn.BatchNorm3d(c_out), nn.LeakyReLU(negative_slope, inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.up_factor = tuple(up)
        if any(f != 1 for f in up):
            self.up = nn.Upsample(scale_factor=tuple(float(f) for f in up), mode=mode,
                                  **({"align_corners": False} if mode == "trilinear" else {}))
        else:
            self.up = nn.Identity()
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.convs(x))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        """``size``: the block's input size; 3 conv outputs, plus the upsampled map if it upsamples."""
        total = 3 * _elements(self.out_channels, size)
        if not isinstance(self.up, nn.Identity):
            total += _elements(self.out_channels, [s * f for s, f in zip(size, self.up_factor)])
        return total


class FeatureDecoder(nn.Module):
    """Decoder blocks without a classifier: [e_0, ..., e_{n-1}] -> [B, widths[-1], *input size]."""

    def __init__(self, cfg: ULKANetConfig, final_width: Optional[int] = None):
        super().__init__()
        n = len(cfg.dims)
        widths = cfg.decoder_widths(final_width)
        self.blocks = nn.ModuleList()
        for j, (w, up) in enumerate(zip(widths, cfg.up_factors)):
            skip = n - 1 - j  # encoder map concatenated to this block's input (none for j = n)
            c_in = cfg.dims[-1] if j == 0 else widths[j - 1] + (cfg.dims[skip] if skip >= 0 else 0)
            self.blocks.append(DecoderBlock(c_in, w, cfg.decoder_kernel, up, cfg.upsample_mode,
                                            cfg.decoder_negative_slope))
        self.out_channels = widths[-1]
        self.total_stride = cfg.total_stride

    def forward(self, skips: List[torch.Tensor]) -> torch.Tensor:
        x = self.blocks[0](skips[-1])
        for j in range(1, len(self.blocks)):
            skip = len(skips) - 1 - j
            x = self.blocks[j](torch.cat([x, skips[skip]], dim=1) if skip >= 0 else x)
        return x

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        size = tuple(p // s for p, s in zip(patch_size, self.total_stride))
        total = 0
        for block in self.blocks:
            total += block.compute_conv_feature_map_size(size)
            size = tuple(s * f for s, f in zip(size, block.up_factor))
        return total


class ULKANetDecoder(nn.Module):
    """Feature decoder + 1x1x1 classifier (``seg_layers[0]``). skips -> [B, num_classes, *input size]."""

    def __init__(self, cfg: ULKANetConfig, num_classes: int, deep_supervision: bool):
        super().__init__()
        self.features = FeatureDecoder(cfg)
        self.seg_layers = nn.ModuleList([nn.Conv3d(self.features.out_channels, num_classes, 1)])
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes

    def forward(self, skips: List[torch.Tensor]):
        y = self.seg_layers[0](self.features(skips))
        return [y] if self.deep_supervision else y  # single scale: see the module docstring

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        return self.features.compute_conv_feature_map_size(patch_size) + _elements(self.num_classes, patch_size)


def he_initialize(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2) for convs; norms keep torch's defaults (weight 1, bias 0)."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ULKANet(nn.Module):
    """ULKANet. x: [B, C_in, D, H, W] (each axis divisible by ``config.total_stride``) ->
    [B, num_classes, D, H, W] (a one-element list of it with deep supervision)."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs):
        super().__init__()
        self.config = config_from_kwargs(ULKANetConfig, arch_kwargs, "ULKANet")
        self.encoder = ULKAEncoder(input_channels, self.config)
        self.decoder = ULKANetDecoder(self.config, num_classes, deep_supervision)

    def forward(self, x: torch.Tensor):
        check_divisible(x.shape[2:], self.config.total_stride, "ULKANet")
        return self.decoder(self.encoder(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder output before the classifier: [B, decoder width, D, H, W] (for SSL heads)."""
        check_divisible(x.shape[2:], self.config.total_stride, "ULKANet")
        return self.decoder.features(self.encoder(x))

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        """Elements per sample of every conv output, LKA product and upsampled map (nnU-Net's VRAM proxy)."""
        return (self.encoder.compute_conv_feature_map_size(patch_size)
                + self.decoder.compute_conv_feature_map_size(patch_size))

    initialize = staticmethod(he_initialize)


for _name, _variant, _planner, _plans in (("ulkanet", "normal", "ULKANetPlanner", "nnsslULKANetPlans"),
                                          ("ulkanet_large", "large", "ULKANetLargePlanner", "nnsslULKANetLargePlans")):
    register_architecture(ArchitectureSpec(
        name=_name,
        planner=f"nnssl.planning.ulkanet.{_planner}",
        plans_name=_plans,
        trainer="nnsslTrainer_LoGoNet",
        description=f"ULKANet ({_variant}, Masked LoGoNet paper): LKA encoder (dims "
                    f"{VARIANTS[_variant]['dims']}, depths {VARIANTS[_variant]['depths']}) + conv decoder",
        presets={"tiny": {"arch_overrides": dict(TINY)}},
    ))
