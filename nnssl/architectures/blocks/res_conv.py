"""The convolution blocks of UNETR-style decoders (UNETR, UNETR++; SwinUNETR uses the same ones).

Module and parameter names follow MONAI's ``UnetResBlock`` / ``UnetrUpBlock`` (``conv1.conv``,
``norm1``, ``transp_conv.conv``, ``conv_block``, ...), so MONAI state dicts map onto them by key
prefix only (``nnssl/architectures/monai_keys.py``). The maths are MONAI's: bias-free convs with
"same" padding, transposed convs with kernel = stride, LeakyReLU(0.01), and instance norm without
affine parameters (``InstanceNorm3d``'s default, which is what MONAI's ``"instance"`` builds).
"""
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from torch import nn

from nnssl.architectures.blocks.conv import Kernel, to_3tuple

NORMS = ("instance", "batch")


def _elements(channels: int, size: Sequence[int]) -> int:
    return int(np.prod([channels, *size], dtype=np.int64))


def norm_layer(name: str, channels: int) -> nn.Module:
    """``"instance"``: InstanceNorm3d (no affine, no running stats); ``"batch"``: BatchNorm3d."""
    if name == "instance":
        return nn.InstanceNorm3d(channels)
    if name == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"norm '{name}' must be one of {NORMS}")


def conv(in_channels: int, out_channels: int, kernel: Kernel, stride: Kernel = 1) -> nn.Sequential:
    """Bias-free Conv3d, padding (k - s + 1) // 2 per axis, as ``.conv`` of a Sequential (MONAI's
    ``Convolution`` naming). x: [B, in, *S] -> [B, out, *S / stride]."""
    k, s = to_3tuple(kernel), to_3tuple(stride)
    pad = tuple((ki - si + 1) // 2 for ki, si in zip(k, s))
    return nn.Sequential(OrderedDict(conv=nn.Conv3d(in_channels, out_channels, k, stride=s, padding=pad, bias=False)))


def transposed_conv(in_channels: int, out_channels: int, kernel: Kernel) -> nn.Sequential:
    """Bias-free ConvTranspose3d with stride = kernel (each input voxel becomes a kernel-sized block),
    as ``.conv`` of a Sequential. x: [B, in, *S] -> [B, out, *S * kernel]."""
    k = to_3tuple(kernel)
    return nn.Sequential(OrderedDict(conv=nn.ConvTranspose3d(in_channels, out_channels, k, stride=k, bias=False)))


class ResConvBlock(nn.Module):
    """Residual block: act(norm2(conv2(act(norm1(conv1(x))))) + skip(x)), act = LeakyReLU(0.01);
    skip = norm3(conv3 1x1x1(x)) when the channel count changes, else x.

    x: [B, in, D, H, W] -> [B, out, D, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Kernel = 3, norm: str = "instance"):
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, kernel)
        self.conv2 = conv(out_channels, out_channels, kernel)
        self.lrelu = nn.LeakyReLU(0.01)
        self.norm1 = norm_layer(norm, out_channels)
        self.norm2 = norm_layer(norm, out_channels)
        if in_channels != out_channels:
            self.conv3 = conv(in_channels, out_channels, 1)
            self.norm3 = norm_layer(norm, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(x)))))
        skip = self.norm3(self.conv3(x)) if hasattr(self, "conv3") else x
        return self.lrelu(y + skip)

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        """Conv outputs (2 or 3) at ``size`` (nnU-Net counts conv outputs only)."""
        return (3 if hasattr(self, "conv3") else 2) * _elements(self.out_channels, size)


class UpCatBlock(nn.Module):
    """Transposed conv (kernel = stride = ``up``), concatenation with the skip, residual block.

    x: [B, in, *S], skip: [B, out, *S * up] -> [B, out, *S * up].
    """

    def __init__(self, in_channels: int, out_channels: int, up: Kernel = 2, kernel: Kernel = 3, norm: str = "instance"):
        super().__init__()
        self.transp_conv = transposed_conv(in_channels, out_channels, up)
        self.conv_block = ResConvBlock(2 * out_channels, out_channels, kernel, norm)
        self.up = to_3tuple(up)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([self.transp_conv(x), skip], dim=1))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> int:
        """``size``: the output size (the skip's)."""
        return _elements(self.out_channels, size) + self.conv_block.compute_conv_feature_map_size(size)
