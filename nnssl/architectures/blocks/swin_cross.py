"""Window cross-attention and the blocks of QT-UNet's decoder (paper 001 §III-C, SPEC §7.3).

Tokens live in channels-last grids ``[B, D, H, W, C]`` as in :mod:`blocks.swin`, whose windowing
(shrink rule, padding mask, shifted-window mask, relative position bias) is reused unchanged:
in cross-attention the queries come from the decoder grid and the keys/values from the
same-stage encoder grid (its output e_i, or the stage's input: QT-UNet's ``cross_kv_source``), both cut into the same (shifted) windows, so a decoder token attends
the encoder tokens of its own window only.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnssl.architectures.blocks.conv import to_3tuple
from nnssl.architectures.blocks.swin import (DropPath, Mlp, WindowAttention, effective_window, padded_size,
                                             window_apply)

Triple = Tuple[int, int, int]


class WindowCrossAttention(WindowAttention):
    """Multi-head attention within windows: queries from ``x``, keys and values from ``context``.

    The inherited ``qkv`` Linear (3C outputs) is used in two parts: its first C outputs project
    the queries from x, its last 2C the keys and values from the context, so the module has
    exactly the parameters of separate q / kv projections (and the same state-dict layout as
    self-attention). x, context: [B * nW, N, C] -> [B * nW, N, C].
    """

    def forward(self, x: torch.Tensor, context: torch.Tensor, window: Optional[Triple] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        bw, n, c = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x, weight[:c], None if bias is None else bias[:c])
        kv = F.linear(context, weight[c:], None if bias is None else bias[c:])
        q = q.reshape(bw, n, self.heads, c // self.heads).transpose(1, 2)
        kv = kv.reshape(bw, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.attend(q, kv[0], kv[1], window, mask)


class QTDecoderBlock(nn.Module):
    """QT decoder block, post-norm (the authors' code):

        x = LN(x + W-MSA(x));  x = LN(x + W-MCA(x, enc));  x = LN(x + MLP(x))

    with (shifted) windows for both attentions and keys/values of the cross-attention from the
    same-stage encoder tokens ``enc`` (the stage's output or input, chosen by the caller: QT-UNet's
    ``cross_kv_source``). x, enc: [B, D, H, W, C] -> [B, D, H, W, C].
    """

    def __init__(self, dim: int, heads: int, window: Sequence[int] = (7, 7, 7), shift: Sequence[int] = (0, 0, 0),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.dim, self.heads, self.mlp_ratio = dim, heads, mlp_ratio
        self.window, self.shift = to_3tuple(window), to_3tuple(shift)
        if any(s >= w for s, w in zip(self.shift, self.window)):
            raise ValueError(f"shift {self.shift} must be smaller than the window {self.window}")
        self.self_attn = WindowAttention(dim, heads, self.window, qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = WindowCrossAttention(dim, heads, self.window, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.norm3 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        if enc.shape != x.shape:
            raise ValueError(f"encoder tokens {tuple(enc.shape)} must match decoder tokens {tuple(x.shape)}")
        sa = window_apply(lambda w, _, win, mask: self.self_attn(w, win, mask), x, self.window, self.shift)
        x = self.norm1(x + self.drop_path(sa))
        ca = window_apply(lambda w, ctx, win, mask: self.cross_attn(w, ctx, win, mask), x, self.window, self.shift,
                          context=enc)
        x = self.norm2(x + self.drop_path(ca))
        return self.norm3(x + self.drop_path(self.mlp(x)))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        """Stored elements per sample: qkv/q/kv and proj outputs and both attention maps on the
        padded grid, MLP hidden and output and the three norms on the real grid."""
        window, _ = effective_window(size, self.window, self.shift)
        n_pad = int(np.prod(padded_size(size, window), dtype=np.int64))
        n = int(np.prod(size, dtype=np.int64))
        per_attention = 4 * self.dim + self.heads * int(np.prod(window))  # q, k, v, proj + attention map
        return 2 * n_pad * per_attention + n * (int(self.dim * self.mlp_ratio) + 4 * self.dim)


class PatchExpand(nn.Module):
    """Patch expansion: each token becomes s x s x s tokens of ``out_dim`` channels, then LayerNorm.

    x: [B, D, H, W, C] -> [B, s*D, s*H, s*W, out_dim] via Linear(C, s^3 * out_dim) (no bias)
    rearranged so the s x s x s new tokens of a voxel take consecutive slices of the output, in
    raster order of their (d, h, w) offsets (the inverse layout of ``PatchMerging``'s concat).
    QT-UNet: s = 2, out_dim = C/2 (Linear C -> 4C); the final expansion s = 4, out_dim = C.
    """

    def __init__(self, dim: int, out_dim: int, scale: int = 2):
        super().__init__()
        self.dim, self.out_dim, self.scale = dim, out_dim, scale
        self.expand = nn.Linear(dim, scale ** 3 * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.rearrange(self.expand(x)))

    def rearrange(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, H, W, s^3 * C'] -> [B, s*D, s*H, s*W, C'] (no parameters)."""
        b, d, h, w, _ = x.shape
        s, c = self.scale, self.out_dim
        x = x.reshape(b, d, h, w, s, s, s, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, d * s, h * s, w * s, c)
