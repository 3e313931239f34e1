"""QT-UNet: all-Swin 3D U-Net with encoder-decoder cross-attention (paper 001, SPEC §7.3).
Registers ``qt_unet_t``, ``qt_unet_s`` and ``qt_unet_b`` (embed dim C = 48 / 72 / 96).

Layout (x: [B, C_in, D, H, W], every axis divisible by 4 * 2^3 = 32; sizes for 96^3)::

    patch embedding  Conv3d k = s = 4 -> LayerNorm                         24^3 x C
    encoder stage i  depths[i] Swin blocks (heads[i]) -> e_i; PatchMerging  (i = 0, 1, 2)
                     e_0: 24^3 x C, e_1: 12^3 x 2C, e_2: 6^3 x 4C
    bottleneck       bottleneck_depth Swin blocks (heads[3])  -> e_3: 3^3 x 8C
    decoder stage i  PatchExpand (Linear -> 2x2x2 tokens of half the channels -> LN),
                     concat e_i, Linear 2C_i -> C_i, depths[i] QT decoder blocks whose
                     cross-attention takes keys/values from e_i (i = 2, 1, 0; heads mirrored)
    head             PatchExpand x4 (Linear C -> 64C -> 4x4x4 tokens of C -> LN), then the
                     1x1x1 conv classifier in ``decoder.seg_layers``

Windows are 7^3, shrunk to the grid where it is smaller (no shift on that axis), with padding +
masking where 7 does not divide the grid (``blocks/swin.py``); odd blocks of a stage shift by
window // 2 = 3. ``network.encoder(x)`` returns [e_0, e_1, e_2, e_3] channels-first
([B, C_i, d, h, w]); the decoder permutes them back to tokens.

Assumptions (the paper does not fix them; each is a config field):
- Encoder blocks are pre-norm Swin blocks (Video Swin, whose ImageNet weights the paper loads
  into QT-UNet-B) (``encoder_post_norm``); decoder blocks are post-norm, as the authors' code.
- Every encoder output e_i passes a LayerNorm (Swin's per-output norm) before it is returned, so
  the skips, the cross-attention keys/values and SSL heads see normalised features.
- Stochastic depth rises linearly from 0 to ``drop_path_rate`` = 0.1 over the encoder blocks
  (bottleneck included); each decoder stage reuses the rates of its encoder stage (Swin-Unet).
- The decoder has ``depths`` (2, 2, 2) blocks per stage, mirroring the encoder; this gives the
  paper's sizes (tests: T, S, B within 3 % of 6.6 M, 14.5 M, 25.5 M at 1 channel, 14 classes).
- Shift window // 2 = 3 (``shift_size``; SPEC §7.3 and Swin; the paper's text says 2 voxels).
- No deep supervision (the paper has one output): with ``deep_supervision=True`` the forward
  returns a one-element list.
- Init: truncated normal (std 0.02) linears, zero biases, unit LayerNorms (Swin); torch's
  default for the patch-embedding conv and the classifier.

Cross-attention keys/values (``cross_kv_source``): "encoder_output" (default, the paper's words,
§III-C: "generating keys and values from the output of the same-stage encoder") takes them from
e_i, the normalised output of encoder stage i. The authors' code (``Models/QT_UNet/components.py``:
the encoder keeps each stage's *input* in ``x_downsample``) takes them from what enters stage i:
the embedded patches for i = 0, the patch-merged output of stage i - 1 otherwise, before any
block of stage i; "encoder_input" does that, and is the one that reproduces the authors' numbers.
In both modes the skip concatenated in front of decoder stage i is e_i (the authors' code
concatenates the stage input there too: a difference that remains). In "encoder_input" mode
``encoder(x)`` returns :class:`QTFeatures`, the same list of e_i carrying the stage inputs in
``stage_inputs``, so the ``decoder(encoder(x))`` contract holds.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from nnssl.architectures.blocks.conv import to_3tuple
from nnssl.architectures.blocks.swin import PatchMerging, SwinBlock, init_transformer_weights
from nnssl.architectures.blocks.swin_cross import PatchExpand, QTDecoderBlock
from nnssl.architectures.spec import EncoderDecoderNetwork, ArchitectureSpec, register_architecture
from nnssl.architectures.ulkanet import config_from_kwargs
from nnssl.errors import NnsslError

Triple = Tuple[int, int, int]
CROSS_KV_SOURCES = ("encoder_output", "encoder_input")
EMBED_DIMS = {"t": 48, "s": 72, "b": 96}  # QT-UNet-T / -S / -B (paper §III-E)
# For tests and the demo: same topology, a few thousand parameters per block.
TINY = {"embed_dim": 8, "heads": (1, 1, 2, 2), "window_size": 4}


@dataclass
class QTUNetConfig:
    """Architecture hyper-parameters (QT-UNet-B); the plans' ``arch_kwargs`` override them."""
    embed_dim: int = 96  # C
    depths: Tuple[int, ...] = (2, 2, 2)  # Swin blocks per encoder stage (and per decoder stage)
    bottleneck_depth: int = 1
    heads: Tuple[int, ...] = (3, 6, 12, 24)  # per encoder stage, then the bottleneck
    window_size: Union[int, Tuple[int, int, int]] = 7
    shift_size: Optional[Union[int, Tuple[int, int, int]]] = None  # None: window // 2
    patch_size: int = 4  # M, patch embedding kernel = stride
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    qkv_bias: bool = True
    encoder_post_norm: bool = False  # Assumption: pre-norm encoder (Video Swin)
    # keys/values of decoder stage i: e_i (the paper) or the input of encoder stage i (the authors' code)
    cross_kv_source: str = "encoder_output"

    def __post_init__(self):
        self.depths = tuple(int(d) for d in self.depths)
        self.heads = tuple(int(h) for h in self.heads)
        problems = []
        try:
            self.window_size = to_3tuple(self.window_size)
            self.shift_size = (tuple(w // 2 for w in self.window_size) if self.shift_size is None
                               else to_3tuple(self.shift_size))
        except (TypeError, ValueError) as e:
            problems.append(f"window_size/shift_size must be an int or 3 ints ({e})")
        if len(self.depths) < 1 or min(self.depths) < 1 or self.bottleneck_depth < 1:
            problems.append(f"depths {self.depths} and bottleneck_depth {self.bottleneck_depth} must be >= 1")
        if len(self.heads) != len(self.depths) + 1:
            problems.append(f"heads {self.heads} needs one entry per stage plus the bottleneck "
                            f"({len(self.depths) + 1})")
        elif any(d % h for d, h in zip(self.dims, self.heads)):
            problems.append(f"stage widths {self.dims} (embed_dim x 2^i) must be divisible by heads {self.heads}")
        if self.embed_dim < 2 or self.embed_dim % 2:
            problems.append(f"embed_dim {self.embed_dim} must be even (patch expansion halves it)")
        if not problems and any(s >= w for s, w in zip(self.shift_size, self.window_size)):
            problems.append(f"shift_size {self.shift_size} must be smaller than window_size {self.window_size}")
        if self.cross_kv_source not in CROSS_KV_SOURCES:
            problems.append(f"cross_kv_source {self.cross_kv_source!r} must be one of {CROSS_KV_SOURCES} (the paper: "
                            f"encoder_output; the authors' code: encoder_input)")
        if self.patch_size < 1 or not 0 <= self.drop_path_rate < 1:
            problems.append("patch_size must be >= 1 and drop_path_rate in [0, 1)")
        if problems:
            raise NnsslError("Invalid QT-UNet arch_kwargs (from the plans file or --set): " + "; ".join(problems)
                             + ". Fix the 'arch_kwargs' of the plans' architecture block or re-run planning.")

    @property
    def dims(self) -> Tuple[int, ...]:
        """Token width per encoder stage and the bottleneck: C, 2C, 4C, 8C."""
        return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths) + 1))

    @property
    def divisor(self) -> int:
        """What every patch axis must be divisible by: the embedding stride times one 2 per merge."""
        return self.patch_size * 2 ** len(self.depths)

    def drop_path_rates(self) -> List[float]:
        n = sum(self.depths) + self.bottleneck_depth
        return [float(r) for r in np.linspace(0.0, self.drop_path_rate, n)]


def check_patch(shape: Sequence[int], divisor: int, what: str = "QT-UNet input") -> None:
    """NnsslError naming the nearest valid sizes when an axis is not divisible by ``divisor``."""
    bad = [(a, int(s)) for a, s in enumerate(shape) if int(s) % divisor or int(s) < divisor]
    if bad:
        hints = "; ".join(f"axis {a}: {s} -> {max(divisor, s // divisor * divisor)} or "
                          f"{-(-s // divisor) * divisor}" for a, s in bad)
        raise NnsslError(f"{what} of spatial size {tuple(int(s) for s in shape)} is not divisible by {divisor} "
                         f"(patch embedding 4 x three 2x2x2 merges) on every axis. Nearest valid sizes: {hints}. "
                         f"Use such a patch size (the nnssl QT-UNet planner picks one).")


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 4, 1)  # [B, C, D, H, W] -> [B, D, H, W, C]


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 4, 1, 2, 3)  # [B, D, H, W, C] -> [B, C, D, H, W]


def _n(size: Sequence[int]) -> int:
    return int(np.prod(size, dtype=np.int64))


class QTFeatures(list):
    """What :class:`QTUNetEncoder` returns with ``cross_kv_source`` = "encoder_input": the list
    [e_0, ..., e_bottleneck] carrying ``stage_inputs`` [s_0, ..., s_{n-1}], s_i [B, C * 2^i, d_i, h_i, w_i]
    the tokens entering encoder stage i (channels-first), the decoder's keys/values."""

    def __init__(self, features: List[torch.Tensor], stage_inputs: List[torch.Tensor]):
        super().__init__(features)
        self.stage_inputs = stage_inputs


class QTUNetEncoder(nn.Module):
    """x: [B, C_in, D, H, W] -> [e_0, ..., e_bottleneck], e_i: [B, C * 2^i, D / (4 * 2^i), ...]
    (a :class:`QTFeatures` with the stage inputs when ``cross_kv_source`` = "encoder_input")."""

    def __init__(self, input_channels: int, cfg: QTUNetConfig):
        super().__init__()
        self.cfg = cfg
        dims, rates = cfg.dims, cfg.drop_path_rates()
        self.output_channels = list(dims)
        self.patch_embed = nn.Conv3d(input_channels, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.embed_norm = nn.LayerNorm(cfg.embed_dim)
        depths = list(cfg.depths) + [cfg.bottleneck_depth]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(nn.ModuleList(
                SwinBlock(dims[i], cfg.heads[i], cfg.window_size, cfg.shift_size if j % 2 else (0, 0, 0),
                          cfg.mlp_ratio, cfg.qkv_bias, drop_path=rates[first + j], post_norm=cfg.encoder_post_norm)
                for j in range(depth)))
        self.merges = nn.ModuleList(PatchMerging(dims[i]) for i in range(len(cfg.depths)))
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        check_patch(x.shape[2:], self.cfg.divisor)
        t = self.embed_norm(_tokens(self.patch_embed(x)))
        features, inputs = [], []
        for i, stage in enumerate(self.stages):
            if i > 0:
                t = self.merges[i - 1](t)
            inputs.append(_channels_first(t))
            for block in stage:
                t = block(t)
            features.append(_channels_first(self.out_norms[i](t)))
        if self.cfg.cross_kv_source == "encoder_input":
            return QTFeatures(features, inputs[:-1])  # the bottleneck's input feeds no cross-attention
        return features

    def grid_sizes(self, patch_size: Sequence[int]) -> List[Triple]:
        first = tuple(int(p) // self.cfg.patch_size for p in patch_size)
        return [tuple(s // 2 ** i for s in first) for i in range(len(self.stages))]

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        sizes = self.grid_sizes(patch_size)
        total = 2 * _n(sizes[0]) * self.cfg.embed_dim  # embedding conv + its norm
        for i, stage in enumerate(self.stages):
            n, c = _n(sizes[i]), self.output_channels[i]
            if i > 0:  # merge: concat (8 C_prev = 4C) and its norm, then the C-wide linear output
                total += 9 * n * c
            total += sum(b.compute_conv_feature_map_size(sizes[i]) for b in stage) + n * c
        return total


class QTUNetDecoder(nn.Module):
    """[e_0, ..., e_bottleneck] -> logits [B, num_classes, D, H, W] (a one-element list with deep supervision)."""

    def __init__(self, cfg: QTUNetConfig, num_classes: int, deep_supervision: bool):
        super().__init__()
        self.cfg, self.num_classes, self.deep_supervision = cfg, num_classes, deep_supervision
        dims, rates, n = cfg.dims, cfg.drop_path_rates(), len(cfg.depths)
        self.expands = nn.ModuleList(PatchExpand(dims[i + 1], dims[i], 2) for i in range(n))
        self.concat_back = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(n))
        self.stages = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            first = sum(cfg.depths[:i])
            self.stages.append(nn.ModuleList(
                QTDecoderBlock(dims[i], cfg.heads[i], cfg.window_size, cfg.shift_size if j % 2 else (0, 0, 0),
                               cfg.mlp_ratio, cfg.qkv_bias, drop_path=rates[first + j]) for j in range(depth)))
        self.final_expand = PatchExpand(cfg.embed_dim, cfg.embed_dim, cfg.patch_size)
        self.seg_layers = nn.ModuleList([nn.Conv3d(cfg.embed_dim, num_classes, 1)])

    def keys_values(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """The cross-attention context of every decoder stage (channels-first): e_i, or the encoder's
        stage inputs (``cross_kv_source``)."""
        if self.cfg.cross_kv_source == "encoder_output":
            return list(features[:len(self.stages)])
        inputs = getattr(features, "stage_inputs", None)
        if inputs is None:
            raise ValueError("QT-UNet: cross_kv_source='encoder_input' needs the encoder's stage inputs; pass the "
                             "QTFeatures that network.encoder(x) returns to the decoder unchanged.")
        return list(inputs)

    def forward(self, features: List[torch.Tensor]):
        context = self.keys_values(features)
        x = _tokens(features[-1])
        for i in reversed(range(len(self.stages))):
            skip, kv = _tokens(features[i]), _tokens(context[i])
            x = self.concat_back[i](torch.cat([self.expands[i](x), skip], dim=-1))
            for block in self.stages[i]:
                x = block(x, kv)
        y = self.seg_layers[0](_channels_first(self.final_expand(x)))
        return [y] if self.deep_supervision else y

    def compute_conv_feature_map_size(self, patch_size: Sequence[int]) -> int:
        first = tuple(int(p) // self.cfg.patch_size for p in patch_size)
        total = 0
        for i, stage in enumerate(self.stages):
            size = tuple(s // 2 ** i for s in first)
            n, c = _n(size), self.cfg.dims[i]
            total += n * (c + c + 2 * c + c)  # expand linear + its norm, concat, concat_back
            total += sum(b.compute_conv_feature_map_size(size) for b in stage)
        full = _n(patch_size)
        return total + full * (2 * self.cfg.embed_dim + self.num_classes)  # final expand + norm, logits


class QTUNet(EncoderDecoderNetwork):
    """QT-UNet. x: [B, C_in, D, H, W] (every axis divisible by ``config.divisor`` = 32) ->
    [B, num_classes, D, H, W].

    Memory estimate (``compute_conv_feature_map_size``): stored activation elements for one sample, counted
    from the token grids (nnU-Net's VRAM proxy).
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs):
        super().__init__()
        self.config = config_from_kwargs(QTUNetConfig, arch_kwargs, "QT-UNet")
        self.encoder = QTUNetEncoder(input_channels, self.config)
        self.decoder = QTUNetDecoder(self.config, num_classes, deep_supervision)

    # Applied to every module by nnU-Net's get_network_from_plans (``net.apply``): Swin's initialization.
    initialize = staticmethod(init_transformer_weights)


for _v, _dim in EMBED_DIMS.items():
    register_architecture(ArchitectureSpec(
        name=f"qt_unet_{_v}",
        planner=f"nnssl.planning.qt_unet.QTUNet{_v.upper()}Planner",
        plans_name=f"nnsslQTUNet{_v.upper()}Plans",
        trainer="nnsslTrainer_QTUNet",
        description=f"QT-UNet-{_v.upper()} (embed dim {_dim}): all-Swin U-Net, decoder cross-attention to the "
                    f"same-stage encoder output",
        presets={"tiny": {"arch_overrides": dict(TINY)}},
    ))
