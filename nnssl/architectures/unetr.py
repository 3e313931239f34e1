"""UNETR (Hatamizadeh et al., WACV 2022; the LWI paper's fixed-size backbone; SPEC §7.5-7.6).
Registers ``unetr``.

Layout (x: [B, C_in, D, H, W], every axis a multiple of 16; defaults hidden 768, 12 layers,
12 heads, MLP 3072, feature size fs = 16)::

    ViT:      Conv3d 16^3/16 patch embedding + learned position embedding -> 12 pre-norm
              transformer blocks (MHSA, GELU MLP) -> final LayerNorm; tokens z_i: [B, N, 768]
    encoder1: residual conv block on the input                     [B, fs,  D,    H,    W]
    encoder2: z_a -> deconv (2), then 2 x (deconv -> residual block) [B, 2fs, D/2, ...]
    encoder3: z_b -> deconv (2), then 1 x (deconv -> residual block) [B, 4fs, D/4, ...]
    encoder4: z_c -> deconv (2)                                      [B, 8fs, D/8, ...]
    decoder5..2: deconv (2) of the coarser map, concat with encoder4..1, residual block
    out:      1x1x1 conv (``decoder.seg_layers[0]``)

Encoder levels (the network contract: ``encoder(x)`` returns them, highest resolution first):
``[encoder1(x), z_a, z_b, z_c, LayerNorm(z_12)]``, the z reshaped to [B, hidden, D/16, H/16,
W/16]. So ``network.encoder`` is the transformer plus the input conv block, and the projection
blocks encoder2-4 (deconvolutions, drawn on the decoder side in the UNETR paper's Fig. 2) belong
to ``network.decoder``. The four transformer maps are the "fixed-size representations" Z_i that
LWI's order prediction reads (paper 003, eq. 6): every level has a depth axis that follows the
input (D, then D/16 four times). The decoder is all convolutional and would accept consistently
cropped levels, but it does not declare ``cropped_decoder``: that is untested here.

Which hidden states: MONAI's UNETR (and so every MONAI-trained checkpoint) feeds the outputs of
transformer blocks 4, 7 and 10 (its 0-based list indices 3, 6, 9) to encoder2-4 and the final
LayerNorm of block 12's output to decoder5; nnssl follows it (``skip_blocks``), where the paper's
"z3, z6, z9" read 1-based would be blocks 3, 6, 9.

State-dict keys: MONAI's names under ``encoder.`` / ``decoder.`` (:data:`MONAI_KEYS`), the
output conv ``decoder.seg_layers.0`` <-> MONAI's ``out.conv.conv`` and the input block
``encoder.encoder1`` <-> ``encoder1.layer`` (MONAI wraps it once more; see ``monai_keys.py``);
MONAI's never-used ``norm_cross_attn`` LayerNorms are not built (:data:`MONAI_DROP`);
:func:`load_monai_state_dict` loads a MONAI checkpoint.

The position embedding is sized for the planned patch (``img_size``): another input size is
refused with the reason, as MONAI would fail on it.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnssl.architectures.blocks.res_conv import NORMS, ResConvBlock, UpCatBlock, transposed_conv
from nnssl.architectures.monai_keys import from_monai
from nnssl.architectures.spec import EncoderDecoderNetwork, ArchitectureSpec, register_architecture
from nnssl.architectures.ulkanet import config_from_kwargs
from nnssl.errors import NnsslError

VIT_PATCH = 16  # fixed by the decoder: four x2 deconvolutions from the tokens back to the voxels
MONAI_KEYS = (("encoder.vit.", "vit."), ("encoder.encoder1.", "encoder1.layer."),
              *((f"decoder.{m}.", f"{m}.") for m in ("encoder2", "encoder3", "encoder4",
                                                     "decoder5", "decoder4", "decoder3", "decoder2")),
              ("decoder.seg_layers.0.", "out.conv.conv."))
MONAI_DROP = ("norm_cross_attn",)
# Tests and the demo: ~0.2 M parameters; the planner's min patch 32^3 gives 2 tokens per axis.
TINY = {"hidden_size": 32, "mlp_dim": 64, "num_layers": 3, "num_heads": 2, "feature_size": 4, "skip_blocks": [0, 1, 2]}


def _elements(channels: int, size: Sequence[int]) -> int:
    return int(np.prod([channels, *size], dtype=np.int64))


def check_patch(shape: Sequence[int], planned: Sequence[int], what: str, divisor: Sequence[int]) -> None:
    """Refuse an input whose spatial shape is not the planned one (token-count-dependent weights)."""
    shape, planned = tuple(int(s) for s in shape), tuple(int(p) for p in planned)
    if any(s % d for s, d in zip(shape, divisor)):
        valid = [f"{max(d, s // d * d)} or {(s // d + 1) * d}" for s, d in zip(shape, divisor)]
        raise NnsslError(f"{what} input of spatial shape {shape} is not divisible by {tuple(divisor)}: valid sizes "
                         f"are multiples of it per axis (nearest here: {', '.join(valid)}). Use the planned patch "
                         f"{planned} (nnssl_plan_and_preprocess -a picks it).")
    if shape != planned:
        raise NnsslError(f"{what} was planned for patches of {planned} and got {shape}: its position embeddings (and "
                         f"spatial projections) are sized for the planned token grid, so the patch is fixed. Use the "
                         f"plans' patch size, or re-plan (nnssl_plan_and_preprocess) and pretrain again for another "
                         f"patch.")


@dataclass
class UNETRConfig:
    """Hyper-parameters (UNETR paper / MONAI defaults); the plans' ``arch_kwargs`` override them."""
    img_size: Tuple[int, int, int] = (96, 96, 96)  # the planned patch (sets the token grid)
    feature_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    skip_blocks: Tuple[int, int, int] = (3, 6, 9)  # 0-based blocks feeding encoder2-4 (MONAI's)
    dropout_rate: float = 0.0
    qkv_bias: bool = False
    norm: str = "instance"

    def __post_init__(self):
        self.img_size = tuple(int(s) for s in self.img_size)
        self.skip_blocks = tuple(int(b) for b in self.skip_blocks)
        problems = []
        if len(self.img_size) != 3 or any(s < VIT_PATCH or s % VIT_PATCH for s in self.img_size):
            problems.append(f"img_size {self.img_size} must be 3 multiples of the ViT patch {VIT_PATCH} "
                            f"(e.g. 96, 112, 128)")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if len(self.skip_blocks) != 3 or any(not 0 <= b < self.num_layers for b in self.skip_blocks):
            problems.append(f"skip_blocks {self.skip_blocks} must be 3 block indices in [0, {self.num_layers})")
        if min(self.feature_size, self.hidden_size, self.mlp_dim, self.num_layers) < 1:
            problems.append("feature_size, hidden_size, mlp_dim and num_layers must be >= 1")
        if not 0 <= self.dropout_rate < 1:
            problems.append(f"dropout_rate {self.dropout_rate} must be in [0, 1)")
        if self.norm not in NORMS:
            problems.append(f"norm '{self.norm}' must be one of {NORMS}")
        if problems:
            raise NnsslError("Invalid UNETR arch_kwargs (from the plans file or --set): " + "; ".join(problems)
                             + ". Fix the plans' architecture block or re-run planning.")

    @property
    def grid(self) -> Tuple[int, int, int]:
        """Tokens per axis."""
        return tuple(s // VIT_PATCH for s in self.img_size)


class PatchEmbedding(nn.Module):
    """x: [B, C_in, D, H, W] -> tokens [B, N, hidden] in raster order (d, h, w) + position embedding."""

    def __init__(self, in_channels: int, cfg: UNETRConfig):
        super().__init__()
        self.patch_embeddings = nn.Conv3d(in_channels, cfg.hidden_size, VIT_PATCH, stride=VIT_PATCH)
        self.position_embeddings = nn.Parameter(torch.zeros(1, int(np.prod(cfg.grid)), cfg.hidden_size))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02, a=-2.0, b=2.0)  # MONAI's init
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.patch_embeddings(x).flatten(2).transpose(1, 2) + self.position_embeddings)


class SelfAttention(nn.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(d_head)) v; qkv laid out [3, heads, d_head].
    x: [B, N, C] -> [B, N, C]."""

    def __init__(self, hidden: int, heads: int, dropout: float, qkv_bias: bool):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden, hidden)
        self.heads, self.dropout = heads, dropout
        self.drop_output = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.drop_output(self.out_proj(y.transpose(1, 2).reshape(b, n, c)))


class MLP(nn.Module):
    """linear1 -> GELU -> dropout -> linear2 -> dropout. x: [B, N, C] -> [B, N, C]."""

    def __init__(self, hidden: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(hidden, mlp_dim), nn.Linear(mlp_dim, hidden)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(F.gelu(self.linear1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(.)). x: [B, N, C] -> [B, N, C]."""

    def __init__(self, cfg: UNETRConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.hidden_size), nn.LayerNorm(cfg.hidden_size)
        self.attn = SelfAttention(cfg.hidden_size, cfg.num_heads, cfg.dropout_rate, cfg.qkv_bias)
        self.mlp = MLP(cfg.hidden_size, cfg.mlp_dim, cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """x: [B, C_in, *img_size] -> (LayerNorm(last block output), [output of every block]), tokens [B, N, C]."""

    def __init__(self, in_channels: int, cfg: UNETRConfig):
        super().__init__()
        self.patch_embedding = PatchEmbedding(in_channels, cfg)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        x = self.patch_embedding(x)
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return self.norm(x), hidden


class UNETREncoder(nn.Module):
    """x: [B, C_in, *img_size] -> [encoder1(x): [B, fs, D, H, W], z_a, z_b, z_c, LayerNorm(z_last)],
    each z: [B, hidden, D/16, H/16, W/16] (see the module docstring)."""

    def __init__(self, in_channels: int, cfg: UNETRConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = ViT(in_channels, cfg)
        self.encoder1 = ResConvBlock(in_channels, cfg.feature_size, 3, cfg.norm)
        self.output_channels = [cfg.feature_size] + [cfg.hidden_size] * 4

    def tokens_to_map(self, z: torch.Tensor) -> torch.Tensor:
        """[B, N, C] (raster order d, h, w) -> [B, C, d, h, w]."""
        return z.transpose(1, 2).reshape(z.shape[0], z.shape[2], *self.cfg.grid)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        check_patch(x.shape[2:], self.cfg.img_size, "UNETR", (VIT_PATCH,) * 3)
        last, hidden = self.vit(x)
        return [self.encoder1(x)] + [self.tokens_to_map(z) for z in (*(hidden[i] for i in self.cfg.skip_blocks), last)]

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        """Embedding, per block the token maps (norms, qkv, attention out, MLP) and the attention
        matrices (heads x N^2), the final norm, and encoder1's convs."""
        cfg, n = self.cfg, int(np.prod(self.cfg.grid))
        per_block = n * (7 * cfg.hidden_size + cfg.mlp_dim) + cfg.num_heads * n * n
        return (2 * n * cfg.hidden_size + cfg.num_layers * per_block
                + self.encoder1.compute_conv_feature_map_size(patch_size))


class ProjectionBlock(nn.Module):
    """Hidden-state map to a higher resolution: deconv (2), then ``n`` x (deconv (2) -> residual block).
    x: [B, hidden, *S] -> [B, out, *S * 2^(n + 1)]."""

    def __init__(self, in_channels: int, out_channels: int, n: int, norm: str):
        super().__init__()
        self.transp_conv_init = transposed_conv(in_channels, out_channels, 2)
        self.blocks = nn.ModuleList(nn.Sequential(transposed_conv(out_channels, out_channels, 2),
                                                  ResConvBlock(out_channels, out_channels, 3, norm)) for _ in range(n))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv_init(x)
        for block in self.blocks:
            x = block(x)
        return x

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        """``size``: the input size."""
        total, size = 0, tuple(size)
        for i in range(len(self.blocks) + 1):
            size = tuple(2 * s for s in size)
            total += _elements(self.out_channels, size)
            if i:
                total += self.blocks[i - 1][1].compute_conv_feature_map_size(size)
        return total


class UNETRDecoder(nn.Module):
    """[enc1, z_a, z_b, z_c, z_last] -> [B, num_classes, D, H, W] (a one-element list of it with deep supervision)."""

    def __init__(self, cfg: UNETRConfig, num_classes: int, deep_supervision: bool):
        super().__init__()
        fs, hid = cfg.feature_size, cfg.hidden_size
        self.encoder2 = ProjectionBlock(hid, 2 * fs, 2, cfg.norm)
        self.encoder3 = ProjectionBlock(hid, 4 * fs, 1, cfg.norm)
        self.encoder4 = ProjectionBlock(hid, 8 * fs, 0, cfg.norm)
        self.decoder5 = UpCatBlock(hid, 8 * fs, 2, 3, cfg.norm)
        self.decoder4 = UpCatBlock(8 * fs, 4 * fs, 2, 3, cfg.norm)
        self.decoder3 = UpCatBlock(4 * fs, 2 * fs, 2, 3, cfg.norm)
        self.decoder2 = UpCatBlock(2 * fs, fs, 2, 3, cfg.norm)
        self.seg_layers = nn.ModuleList([nn.Conv3d(fs, num_classes, 1)])
        self.deep_supervision = deep_supervision  # no deep supervision: see ``forward``
        self.grid, self.num_classes = cfg.grid, num_classes

    def forward(self, features: List[torch.Tensor]):
        enc1, za, zb, zc, last = features
        x = self.decoder5(last, self.encoder4(zc))
        x = self.decoder4(x, self.encoder3(zb))
        x = self.decoder3(x, self.encoder2(za))
        y = self.seg_layers[0](self.decoder2(x, enc1))
        return [y] if self.deep_supervision else y  # one output; nnU-Net expects a list when DS is on

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        g = self.grid
        total = sum(p.compute_conv_feature_map_size(g) for p in (self.encoder2, self.encoder3, self.encoder4))
        for i, block in enumerate((self.decoder5, self.decoder4, self.decoder3, self.decoder2)):
            total += block.compute_conv_feature_map_size(tuple(s * 2 ** (i + 1) for s in g))
        return total + _elements(self.num_classes, patch_size)


class UNETR(EncoderDecoderNetwork):
    """UNETR. x: [B, C_in, *img_size] -> [B, num_classes, *img_size].

    Memory estimate (``compute_conv_feature_map_size``): elements per sample of the token maps, attention
    matrices and conv outputs (nnU-Net's VRAM proxy).
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs):
        super().__init__()
        self.config = config_from_kwargs(UNETRConfig, arch_kwargs, "UNETR")
        self.encoder = UNETREncoder(input_channels, self.config)
        self.decoder = UNETRDecoder(self.config, num_classes, deep_supervision)


def load_monai_state_dict(network: UNETR, state_dict: dict, strict: bool = True):
    """Load a MONAI ``UNETR`` state dict into ``network`` (keys renamed by :data:`MONAI_KEYS`, MONAI's
    unused ``norm_cross_attn`` LayerNorms dropped). Returns ``load_state_dict``'s result."""
    return network.load_state_dict(from_monai(state_dict, MONAI_KEYS, MONAI_DROP), strict=strict)


register_architecture(ArchitectureSpec(
    name="unetr",
    planner="nnssl.planning.unetr.UNETRPlanner",
    plans_name="nnsslUNETRPlans",
    trainer="nnsslTrainer_UNETR",
    description="UNETR: ViT-B/16 encoder (hidden 768, 12 layers) + deconvolution decoder, MONAI key names",
    presets={"tiny": {"arch_overrides": dict(TINY), "min_patch_size": (32, 32, 32)}},
))
