"""Efficient paired attention (EPA) and the UNETR++ transformer block (Shaker et al., UNETR++).

EPA (tokens x: [B, N, C], ``heads`` heads of d = C / heads channels):

- one linear layer gives four maps: the shared query Q and key K, the channel-branch value V_c
  and the spatial-branch value V_s, each split into heads ([B, heads, d, N]);
- channel branch: Q and K L2-normalised along the tokens, A_c = softmax_last(Q K^T * t_c) over
  the d channels of a head ([B, heads, d, d]), output A_c V_c;
- spatial branch: K and V_s projected along the tokens N -> P by one shared linear layer (E),
  A_s = softmax_last(Q_norm^T E(K) * t_s) ([B, heads, N, P]), output A_s E(V_s)^T; this is
  linear in N, the point of EPA;
- each branch is projected to C / 2 channels and the two are concatenated (spatial first).

t_c and t_s are learned per-head temperatures (initialised to 1). As in the authors' released
code, the spatial branch uses the L2-normalised Q with its own temperature, and the projections
of K and V_s share their weights. The heads are gathered back as channel = head * d + i in both
branches.

Transformer block (x: [B, C, D, H, W], N = D * H * W tokens)::

    t = tokens(x) + pos_embed                     learned, [1, N, C] (tied to the token count)
    t = t + gamma * EPA(LayerNorm(t))             layer scale gamma, initialised to 1e-6
    s = map(t);  out = s + Conv1x1(Dropout3d(ResConvBlock_batchnorm(s)))
"""
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnssl.architectures.blocks.res_conv import ResConvBlock


class EfficientPairedAttention(nn.Module):
    """x: [B, N, C] -> [B, N, C] (see the module docstring)."""

    def __init__(self, tokens: int, channels: int, proj_size: int, heads: int, attn_dropout: float = 0.0,
                 qkv_bias: bool = False):
        super().__init__()
        if channels % heads or channels % 2:
            raise ValueError(f"EPA channels {channels} must be even and divisible by heads {heads}")
        self.heads = heads
        self.qkvv = nn.Linear(channels, 4 * channels, bias=qkv_bias)
        self.proj = nn.Linear(tokens, proj_size)  # E: tokens N -> P, shared by K and V_s
        self.temperature_channel = nn.Parameter(torch.ones(heads, 1, 1))
        self.temperature_spatial = nn.Parameter(torch.ones(heads, 1, 1))
        self.drop_channel = nn.Dropout(attn_dropout)
        self.drop_spatial = nn.Dropout(attn_dropout)
        self.out_spatial = nn.Linear(channels, channels // 2)
        self.out_channel = nn.Linear(channels, channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [4, B, heads, d, N]
        q, k, v_channel, v_spatial = self.qkvv(x).view(b, n, 4, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)
        k_proj, v_proj = self.proj(k), self.proj(v_spatial)  # [B, heads, d, P]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)

        attn_c = (q @ k.transpose(-2, -1) * self.temperature_channel).softmax(dim=-1)  # [B, heads, d, d]
        x_c = (self.drop_channel(attn_c) @ v_channel).permute(0, 3, 1, 2).reshape(b, n, c)  # [B, N, heads * d]

        attn_s = (q.transpose(-2, -1) @ k_proj * self.temperature_spatial).softmax(dim=-1)  # [B, heads, N, P]
        x_s = (self.drop_spatial(attn_s) @ v_proj.transpose(-2, -1)).transpose(1, 2).reshape(b, n, c)
        return torch.cat([self.out_spatial(x_s), self.out_channel(x_c)], dim=-1)


class EPABlock(nn.Module):
    """UNETR++ transformer block. x: [B, C, *grid] -> [B, C, *grid] (see the module docstring)."""

    def __init__(self, grid: Sequence[int], channels: int, proj_size: int, heads: int, attn_dropout: float,
                 conv_dropout: float, layer_scale: float):
        super().__init__()
        tokens = int(np.prod(grid))
        self.grid, self.channels, self.heads, self.proj_size = tuple(grid), channels, heads, proj_size
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, channels))
        self.norm = nn.LayerNorm(channels)
        self.epa = EfficientPairedAttention(tokens, channels, proj_size, heads, attn_dropout)
        self.gamma = nn.Parameter(layer_scale * torch.ones(channels))
        self.conv_block = ResConvBlock(channels, channels, 3, "batch")
        self.conv_out = nn.Sequential(nn.Dropout3d(conv_dropout), nn.Conv3d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        t = x.flatten(2).transpose(1, 2) + self.pos_embed
        t = t + self.gamma * self.epa(self.norm(t))
        s = t.transpose(1, 2).reshape(b, c, *x.shape[2:])
        return s + self.conv_out(self.conv_block(s))

    def compute_conv_feature_map_size(self) -> int:
        """Token maps (norm, 4 linear maps, 2 branch outputs, concat, residual), attention matrices
        (channel heads x d^2, spatial heads x N x P) and the conv outputs (3)."""
        n, c, d = int(np.prod(self.grid)), self.channels, self.channels // self.heads
        return 9 * n * c + self.heads * (d * d + n * self.proj_size) + 3 * n * c
