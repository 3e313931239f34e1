"""Pre-activation convolution blocks (BatchNorm -> PReLU -> [Dropout] -> Conv3d).

Used by PCT-Net (MIS-FM paper): a "2D" block is a 3D convolution with a 1x3x3 kernel, so
the whole network stays 5D (``x: [B, C, D, H, W]``) whatever the embedding.
"""
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

Kernel = Union[int, Sequence[int]]


def to_3tuple(v: Kernel) -> Tuple[int, int, int]:
    """An int or a length-3 sequence -> a 3-tuple of ints."""
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or 3 values, got {v!r}")
    return t


def same_conv(in_channels: int, out_channels: int, kernel: Kernel) -> nn.Conv3d:
    """A stride-1 Conv3d whose padding keeps the spatial size (odd kernels)."""
    k = to_3tuple(kernel)
    return nn.Conv3d(in_channels, out_channels, k, padding=tuple(i // 2 for i in k))


class PreActConv(nn.Module):
    """BN(in) -> PReLU -> [Dropout] -> Conv(in -> out, kernel), stride 1.

    x: [B, in, D, H, W] -> [B, out, D, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Kernel, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.BatchNorm3d(in_channels)
        # Assumption: one PReLU slope per layer (torch's default), not one per channel.
        self.act = nn.PReLU()
        # Assumption: element-wise dropout (nn.Dropout), as the paper just says "dropout layer".
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv = same_conv(in_channels, out_channels, kernel)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.drop(self.act(self.norm(x))))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        return int(np.prod([self.out_channels, *size], dtype=np.int64))


class ConvBlock(nn.Module):
    """Two pre-activation conv layers; dropout (if any) sits before the second conv.

    x: [B, in, D, H, W] -> [B, out, D, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Kernel, dropout: float = 0.0):
        super().__init__()
        self.conv1 = PreActConv(in_channels, out_channels, kernel)
        self.conv2 = PreActConv(out_channels, out_channels, kernel, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        return self.conv1.compute_conv_feature_map_size(size) + self.conv2.compute_conv_feature_map_size(size)
