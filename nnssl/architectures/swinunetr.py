"""SwinUNETR (Hatamizadeh et al., BrainLes 2021; the backbone of HybridMIM and LWI; SPEC §7.6).
Registers ``swinunetr``.

Layout (x: [B, C_in, D, H, W], every axis a multiple of 32; fs = feature size, default 48)::

    swinViT:    patch embedding Conv3d 2^3 / 2 -> h0 [fs, /2]
                4 stages of Swin blocks (depths 2, 2, 2, 2; heads 3, 6, 12, 24; window 7, every
                second block shifted by window // 2), each followed by 2x2x2 patch merging
                -> h1 [2fs, /4], h2 [4fs, /8], h3 [8fs, /16], h4 [16fs, /32]
                every h_i layer-normalised over channels without affine parameters (``normalize``)
    encoder1:   residual conv block on the input          e0 [fs,   /1]
    encoder2-4: residual conv blocks on h0, h1, h2        e1 [fs, /2], e2 [2fs, /4], e3 [4fs, /8]
    encoder10:  residual conv block on h4                 bottleneck [16fs, /32]
    decoder5-1: transposed conv (2), concat with h3, e3, e2, e1, e0, residual conv block
    out:        1x1x1 conv (``decoder.seg_layers[0]``)

``encoder(x)`` returns ``[e0, e1, e2, e3, h3, bottleneck]`` (highest resolution first, the network
contract of ``spec.py``); the decoder is convolutional only, so it also runs on centre-cropped
levels (capability ``cropped_decoder``). No deep supervision: with ``deep_supervision=True`` the
forward returns a one-element list (like ULKANet).

State-dict keys: MONAI's ``SwinUNETR`` names under ``encoder.`` / ``decoder.`` (:data:`MONAI_KEYS`,
``monai_keys.py``); the output conv is ``decoder.seg_layers.0`` (MONAI: ``out.conv.conv``), so the
"output convs are never transferred" rule holds. MONAI stores each block's relative-position index
(a constant) as a buffer; nnssl recomputes it, so :func:`load_monai_state_dict` checks and drops it.

Attention with padding (``attention_compat``): a Swin stage whose grid is not a multiple of the
window is zero-padded. Assumption (nnssl's default, "nnssl"): padded tokens are masked out as keys
(``blocks/swin.py``), so real outputs do not depend on the amount of padding. "monai" reproduces
MONAI exactly: padded tokens attend like real ones, and a window shrunk to a short axis reads the
top-left N x N block of the full window's bias index (MONAI's indexing) instead of the bias of its
own offsets. Use "monai" to run MONAI-trained weights as they were trained (at a 96^3 patch the last
stage's 6^3 grid shrinks the 7^3 window, and stages 1-3 are padded).

Patch merging (``legacy_patch_merging``): the default concatenates the 2x2x2 neighbours in the order of
MONAI >= 1.5 (:data:`MONAI_MERGE_ORDER`). MONAI <= 1.4 (MONAI PR #8285, issue #8284) took the offsets
(0, 1, 0) and (0, 0, 1) twice and (1, 1, 0), (0, 1, 1) never (:data:`MONAI_LEGACY_MERGE_ORDER`): weights
trained with it (the public Swin-UNETR SSL weights; HybridMIM, trained with MONAI 1.0) load strictly into
either mode but compute what they were trained to compute only with ``legacy_patch_merging=True``.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnssl.architectures.blocks.conv import to_3tuple
from nnssl.architectures.blocks.res_conv import NORMS, ResConvBlock, UpCatBlock
from nnssl.architectures.blocks.swin import PatchMerging, SwinBlock, WindowAttention, relative_position_index
from nnssl.architectures.monai_keys import from_monai
from nnssl.architectures.spec import EncoderDecoderNetwork, DEFAULT_CAPABILITIES, ArchitectureSpec, register_architecture
from nnssl.architectures.ulkanet import check_divisible, config_from_kwargs
from nnssl.errors import NnsslError

PATCH = 2  # patch embedding; the decoder's five x2 up blocks undo 2 x 2^4 = 32
TOTAL_STRIDE = (32, 32, 32)
COMPAT_MODES = ("nnssl", "monai")
MONAI_KEYS = (("encoder.swinViT.", "swinViT."),
              *((f"encoder.encoder{i}.", f"encoder{i}.layer.") for i in (1, 2, 3, 4, 10)),
              *((f"decoder.decoder{i}.", f"decoder{i}.") for i in (5, 4, 3, 2, 1)),
              ("decoder.seg_layers.0.", "out.conv.conv."))
MONAI_INDEX_KEY = "attn.relative_position_index"
# MONAI's merging ("merging", v1) concatenates the 2x2x2 neighbours in this (d, h, w) offset order (MONAI >= 1.5).
MONAI_MERGE_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
# MONAI <= 1.4's order: entries 5 and 6 repeat entries 2 and 3 (see the module docstring).
MONAI_LEGACY_MERGE_ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
# Tests and the demo: ~1 M parameters, same topology (total stride 32, shifted windows).
TINY = {"feature_size": 6, "num_heads": [1, 2, 4, 8], "window_size": 4}


@dataclass
class SwinUNETRConfig:
    """Hyper-parameters (MONAI ``SwinUNETR`` v1 defaults, feature size 48); plans' ``arch_kwargs`` override them."""
    feature_size: int = 48
    depths: Tuple[int, ...] = (2, 2, 2, 2)
    num_heads: Tuple[int, ...] = (3, 6, 12, 24)
    window_size: Union[int, Tuple[int, int, int]] = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0  # after the patch embedding, in the MLPs and after attention projections
    attn_drop_rate: float = 0.0
    dropout_path_rate: float = 0.0  # stochastic depth, linearly 0 -> this over the blocks
    normalize: bool = True  # LayerNorm (no affine) on every Swin output before the conv blocks
    norm: str = "instance"  # conv blocks' norm (MONAI: instance norm without affine)
    attention_compat: str = "nnssl"  # Assumption: see the module docstring ("monai": MONAI's maths)
    legacy_patch_merging: bool = False  # True: MONAI <= 1.4's merge order, for weights trained with it

    def __post_init__(self):
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        problems = []
        try:
            self.window_size = to_3tuple(self.window_size)
        except (TypeError, ValueError) as e:
            problems.append(f"window_size must be an int or 3 ints ({e})")
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            problems.append(f"depths {self.depths} and num_heads {self.num_heads} need 4 entries (4 Swin stages: the "
                            f"decoder has one up block per stage)")
        elif any(self.feature_size * 2 ** i % h for i, h in enumerate(self.num_heads)):
            problems.append(f"stage widths {[self.feature_size * 2 ** i for i in range(4)]} must be divisible by "
                            f"num_heads {self.num_heads}")
        if self.feature_size < 1 or min(self.depths, default=0) < 1:
            problems.append("feature_size and depths must be >= 1")
        if not problems and min(self.window_size) < 1:
            problems.append(f"window_size {self.window_size} must be >= 1")
        if not all(0 <= p < 1 for p in (self.drop_rate, self.attn_drop_rate, self.dropout_path_rate)):
            problems.append("drop_rate, attn_drop_rate and dropout_path_rate must be in [0, 1)")
        if self.norm not in NORMS:
            problems.append(f"norm '{self.norm}' must be one of {NORMS}")
        if self.attention_compat not in COMPAT_MODES:
            problems.append(f"attention_compat '{self.attention_compat}' must be one of {COMPAT_MODES}")
        if problems:
            raise NnsslError("Invalid SwinUNETR arch_kwargs (from the plans file or --set): " + "; ".join(problems)
                             + ". Fix the plans' architecture block or re-run planning.")


def _elements(channels: int, size: Sequence[int]) -> int:
    return int(np.prod([channels, *size], dtype=np.int64))


def _channels_last_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of x: [B, C, D, H, W], no affine parameters (MONAI's ``proj_out``)."""
    return F.layer_norm(x.permute(0, 2, 3, 4, 1), [x.shape[1]]).permute(0, 4, 1, 2, 3)


class MonaiBiasAttention(WindowAttention):
    """Window attention whose shrunk windows index the bias table as MONAI does: the top-left
    N x N block of the full window's index (``attention_compat="monai"``)."""

    def position_bias(self, window) -> torch.Tensor:
        n = int(np.prod(window))
        index = self.relative_position_index[:n, :n]
        return self.relative_position_bias_table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


class LinearMlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout, with MONAI's names (``linear1``, ``linear2``)."""

    def __init__(self, dim: int, ratio: float, drop: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.linear1 = nn.Linear(dim, hidden)
        self.fn = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.linear2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(self.fn(self.linear1(x)))))


class SwinUNETRBlock(SwinBlock):
    """A pre-norm Swin block (``blocks/swin.py``) with MONAI's module names and, in ``"monai"``
    compat mode, MONAI's padding and shrunk-window maths. x: [B, D, H, W, C] -> same."""

    def __init__(self, dim: int, heads: int, window: Sequence[int], shift: Sequence[int], cfg: SwinUNETRConfig,
                 drop_path: float):
        monai = cfg.attention_compat == "monai"
        super().__init__(dim, heads, window=window, shift=shift, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                         drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate, drop_path=drop_path, mask_padding=not monai)
        # Replaced after SwinBlock built its own: same maths (and parameter shapes), MONAI's names/indexing.
        if monai:
            self.attn = MonaiBiasAttention(dim, heads, self.window, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        self.mlp = LinearMlp(dim, cfg.mlp_ratio, cfg.drop_rate)


class MonaiPatchMerging(PatchMerging):
    """2x2x2 patch merging with MONAI's (v1) neighbour order (``legacy``: MONAI <= 1.4's).

    x: [B, D, H, W, C] -> [B, D/2, H/2, W/2, 2C].
    """

    def __init__(self, dim: int, legacy: bool = False):
        super().__init__(dim)
        self.order = MONAI_LEGACY_MERGE_ORDER if legacy else MONAI_MERGE_ORDER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % 2 for s in x.shape[1:4]):
            raise ValueError(f"patch merging needs even grid sizes, got {tuple(x.shape[1:4])}")
        x = torch.cat([x[:, a::2, b::2, c::2] for a, b, c in self.order], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Swin blocks (every second one shifted) then patch merging; MONAI's ``BasicLayer``.

    x: [B, C, D, H, W] -> [B, 2C, D/2, H/2, W/2].
    """

    def __init__(self, dim: int, depth: int, heads: int, cfg: SwinUNETRConfig, drop_paths: Sequence[float]):
        super().__init__()
        window = cfg.window_size
        shift = tuple(w // 2 for w in window)
        self.blocks = nn.ModuleList(
            SwinUNETRBlock(dim, heads, window, (0, 0, 0) if i % 2 == 0 else shift, cfg, drop_paths[i])
            for i in range(depth))
        self.downsample = MonaiPatchMerging(dim, legacy=cfg.legacy_patch_merging)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        for block in self.blocks:
            x = block(x)
        return self.downsample(x).permute(0, 4, 1, 2, 3)

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        """``size``: the stage's input grid; block activations, the 8C concatenation and the 2C output."""
        dim = self.downsample.dim
        half = [s // 2 for s in size]
        return sum(b.compute_conv_feature_map_size(size) for b in self.blocks) + _elements(10 * dim, half)


class SwinViT(nn.Module):
    """x: [B, C_in, D, H, W] -> [h0, ..., h4], h_i: [B, fs * 2^i, *(size / 2^(i+1))]."""

    def __init__(self, input_channels: int, cfg: SwinUNETRConfig):
        super().__init__()
        fs = cfg.feature_size
        self.normalize = cfg.normalize
        self.patch_embed = nn.Sequential(OrderedDict(proj=nn.Conv3d(input_channels, fs, PATCH, stride=PATCH)))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = np.linspace(0, cfg.dropout_path_rate, sum(cfg.depths)).tolist()
        starts = np.cumsum((0,) + cfg.depths)
        for i in range(4):  # MONAI's names: layers1 .. layers4, each a one-element ModuleList
            stage = SwinStage(fs * 2 ** i, cfg.depths[i], cfg.num_heads[i], cfg, rates[starts[i]:starts[i + 1]])
            self.add_module(f"layers{i + 1}", nn.ModuleList([stage]))

    def stages(self) -> List[SwinStage]:
        return [getattr(self, f"layers{i + 1}")[0] for i in range(4)]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.pos_drop(self.patch_embed(x))
        outs = [x]
        for stage in self.stages():
            x = stage(x)
            outs.append(x)
        return [_channels_last_norm(o) for o in outs] if self.normalize else outs

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        size = [p // PATCH for p in patch_size]
        total = _elements(self.stages()[0].downsample.dim, size)
        for stage in self.stages():
            total += stage.compute_conv_feature_map_size(size)
            size = [s // 2 for s in size]
        return total


class SwinUNETREncoder(nn.Module):
    """x: [B, C_in, D, H, W] -> [e0, e1, e2, e3, h3, bottleneck] (see the module docstring)."""

    def __init__(self, input_channels: int, cfg: SwinUNETRConfig):
        super().__init__()
        fs = cfg.feature_size
        self.swinViT = SwinViT(input_channels, cfg)
        self.encoder1 = ResConvBlock(input_channels, fs, 3, cfg.norm)
        self.encoder2 = ResConvBlock(fs, fs, 3, cfg.norm)
        self.encoder3 = ResConvBlock(2 * fs, 2 * fs, 3, cfg.norm)
        self.encoder4 = ResConvBlock(4 * fs, 4 * fs, 3, cfg.norm)
        self.encoder10 = ResConvBlock(16 * fs, 16 * fs, 3, cfg.norm)
        self.output_channels = [fs, fs, 2 * fs, 4 * fs, 8 * fs, 16 * fs]
        # per level, relative to the previous one (as dynamic_network_architectures' encoders)
        self.strides = [1, 2, 2, 2, 2, 2]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        h = self.swinViT(x)
        return [self.encoder1(x), self.encoder2(h[0]), self.encoder3(h[1]), self.encoder4(h[2]), h[3],
                self.encoder10(h[4])]

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        blocks = (self.encoder1, self.encoder2, self.encoder3, self.encoder4, None, self.encoder10)
        total = self.swinViT.compute_conv_feature_map_size(patch_size)
        for block, stride in zip(blocks, np.cumprod(self.strides)):
            if block is not None:
                total += block.compute_conv_feature_map_size([p // stride for p in patch_size])
        return total


class SwinUNETRDecoder(nn.Module):
    """[e0, e1, e2, e3, h3, bottleneck] (or the same levels centre-cropped) -> [B, num_classes, *e0 size]."""

    def __init__(self, cfg: SwinUNETRConfig, num_classes: int, deep_supervision: bool):
        super().__init__()
        fs = cfg.feature_size
        self.decoder5 = UpCatBlock(16 * fs, 8 * fs, 2, 3, cfg.norm)
        self.decoder4 = UpCatBlock(8 * fs, 4 * fs, 2, 3, cfg.norm)
        self.decoder3 = UpCatBlock(4 * fs, 2 * fs, 2, 3, cfg.norm)
        self.decoder2 = UpCatBlock(2 * fs, fs, 2, 3, cfg.norm)
        self.decoder1 = UpCatBlock(fs, fs, 2, 3, cfg.norm)
        self.seg_layers = nn.ModuleList([nn.Conv3d(fs, num_classes, 1)])
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes

    def ups(self) -> List[UpCatBlock]:
        return [self.decoder5, self.decoder4, self.decoder3, self.decoder2, self.decoder1]

    def forward(self, features: Sequence[torch.Tensor]):
        x = features[-1]
        for block, skip in zip(self.ups(), reversed(features[:-1])):
            x = block(x, skip)
        y = self.seg_layers[0](x)
        return [y] if self.deep_supervision else y

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        total = _elements(self.num_classes, patch_size)
        for block, stride in zip(self.ups(), (16, 8, 4, 2, 1)):
            total += block.compute_conv_feature_map_size([p // stride for p in patch_size])
        return total


class SwinUNETR(EncoderDecoderNetwork):
    """SwinUNETR. x: [B, C_in, D, H, W] (each axis a multiple of 32) -> [B, num_classes, D, H, W]
    (a one-element list of it with deep supervision).

    Memory estimate (``compute_conv_feature_map_size``): elements per sample of the conv outputs, Swin
    activations and attention maps (nnU-Net's VRAM proxy).
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs):
        super().__init__()
        self.config = config_from_kwargs(SwinUNETRConfig, arch_kwargs, "SwinUNETR")
        self.encoder = SwinUNETREncoder(input_channels, self.config)
        self.decoder = SwinUNETRDecoder(self.config, num_classes, deep_supervision)

    def forward(self, x: torch.Tensor):
        check_divisible(x.shape[2:], TOTAL_STRIDE, "SwinUNETR")
        return super().forward(x)

    def set_drop_rate(self, rate: float) -> None:
        """Every dropout that ``drop_rate`` builds (after the patch embedding, after each attention
        projection, in each MLP) drops with probability ``rate`` from now on, as if built with
        ``drop_rate=rate``; dropout holds no weights, so the state dict is unchanged (HybridMIM's
        dropout contrastive term uses it on networks planned without dropout)."""
        vit = self.encoder.swinViT
        layers = [vit.pos_drop]
        for stage in vit.stages():
            for block in stage.blocks:
                layers += [block.attn.proj_drop, block.mlp.drop1, block.mlp.drop2]
        for layer in layers:
            layer.p = float(rate)


def load_monai_state_dict(network: SwinUNETR, state_dict: dict, strict: bool = True):
    """Load a MONAI ``SwinUNETR`` state dict (v1, ``downsample="merging"``) into ``network``.

    Weights trained with MONAI <= 1.4 need a network built with ``legacy_patch_merging=True`` (the
    keys are the same, so nothing here can tell).

    MONAI's constant relative-position indices are checked against nnssl's (a mismatch means another
    window size) and dropped; every other key is renamed by :data:`MONAI_KEYS`. Returns
    ``load_state_dict``'s result.
    """
    table_window = network.config.window_size
    expected = relative_position_index(table_window)
    for key, value in state_dict.items():
        if key.endswith(MONAI_INDEX_KEY) and not torch.equal(value.cpu(), expected):
            raise NnsslError(f"MONAI state dict key {key}: its relative-position index is not the one of a "
                             f"{table_window} window; build the network with MONAI's window_size.")
    return network.load_state_dict(from_monai(state_dict, MONAI_KEYS, drop=(MONAI_INDEX_KEY,)), strict=strict)


register_architecture(ArchitectureSpec(
    name="swinunetr",
    planner="nnssl.planning.swinunetr.SwinUNETRPlanner",
    plans_name="nnsslSwinUNETRPlans",
    trainer="nnsslTrainer_SwinUNETR",
    description="SwinUNETR (Swin encoder, feature size 48, depths 2-2-2-2, window 7) + residual conv decoder",
    presets={"tiny": {"arch_overrides": dict(TINY)}},
    # The decoder is transposed convs + concatenation + conv blocks: it runs on consistently
    # centre-cropped levels (HybridMIM's partial region prediction).
    capabilities=DEFAULT_CAPABILITIES | {"cropped_decoder"},
))
